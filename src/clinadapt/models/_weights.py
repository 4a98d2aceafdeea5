"""Find pretrained weights: explicit path, model dir, Hugging Face cache, then the hub if online.

Nothing here lets a library talk to the hub on its own: files are resolved to local paths first,
so an offline machine fails at once with a message that says what to fetch and where to put it,
instead of waiting through huggingface_hub's retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from clinadapt.env import env_flag
from clinadapt.errors import ClinadaptError, IncompatibleError, WeightsUnavailableError

OFFLINE_ENV = ("CLINADAPT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")
PROBE_TIMEOUT_S = 2.0
_PROBE_TTL_S = 600.0
_probe_cache: dict[tuple[str, int], tuple[bool, float]] = {}
_probe_lock = threading.Lock()


@dataclass(frozen=True)
class WeightsRequest:
    """The files one model needs, and where they are published."""

    model: str
    dir_name: str
    repo: str | None
    # Required files; each entry is a group of alternatives, the first preferred.
    files: tuple[tuple[str, ...], ...]
    optional: tuple[str, ...] = ()
    url: str | None = None
    # What follows the repo id in `hf download`; default: the first file of each group.
    download_args: str | None = None
    # A directory whose only weights file has another name may stand in for a weights group
    # (true for single-file loaders, false for transformers which wants its own file names).
    any_weights_file: bool = True


@dataclass(frozen=True)
class ResolvedWeights:
    """Local paths of the required files (one per group) and where they were found."""

    files: tuple[Path, ...]
    directory: Path | None
    source: str
    optional: Mapping[str, Path] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.files[0]


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def model_dir_root() -> Path:
    """``$CLINADAPT_MODEL_DIR``, default ``~/.cache/clinadapt/models``."""
    return Path(os.environ.get("CLINADAPT_MODEL_DIR") or "~/.cache/clinadapt/models").expanduser()


def model_dir(dir_name: str) -> Path:
    return model_dir_root() / dir_name


def _probe_target() -> tuple[str, int]:
    # Behind a proxy the hub is reached through it, so the proxy is what must answer.
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    default = 443 if url.scheme in ("https", "") else 80
    return url.hostname or "huggingface.co", url.port or default


def _probe(host: str, port: int, timeout: float) -> bool:
    ok: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            ok.append(False)

    # A thread bounds the whole probe, DNS included (create_connection's timeout does not).
    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


def offline_reason() -> str | None:
    """Why the hub counts as unreachable now, or ``None`` when it can be used."""
    for var in OFFLINE_ENV:
        if env_flag(var):
            return f"{var}={os.environ[var]} is set"
    host, port = _probe_target()
    with _probe_lock:
        hit = _probe_cache.get((host, port))
        if hit is None or time.monotonic() - hit[1] > _PROBE_TTL_S:
            hit = (_probe(host, port, PROBE_TIMEOUT_S), time.monotonic())
            _probe_cache[(host, port)] = hit
    return None if hit[0] else f"{host}:{port} cannot be reached"


def is_online() -> bool:
    """True when the hub may be used: no offline variable set and huggingface.co answers."""
    return offline_reason() is None


def reset_online_cache() -> None:
    """Forget the cached result of the network probe."""
    with _probe_lock:
        _probe_cache.clear()


def _is_weights_name(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def _shards(index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _group_text(group: tuple[str, ...]) -> str:
    return group[0] if len(group) == 1 else f"{group[0]} (or {' or '.join(group[1:])})"


def _scan_dir(d: Path, request: WeightsRequest) -> tuple[tuple[Path, ...], list[str]]:
    found: list[Path] = []
    missing: list[str] = []
    for group in request.files:
        hit = None
        for alt in group:
            p = d / alt
            if p.is_file() and (
                not alt.endswith(".index.json") or all((d / s).is_file() for s in _shards(p))
            ):
                hit = p
                break
        if hit is None and request.any_weights_file and all(map(_is_weights_name, group)):
            candidates = [
                f for f in sorted(d.iterdir()) if f.is_file() and _is_weights_name(f.name)
            ]
            if len(candidates) == 1:
                hit = candidates[0]
        if hit is None:
            missing.append(_group_text(group))
        else:
            found.append(hit)
    return tuple(found), missing


def _optional_in_dir(d: Path, request: WeightsRequest) -> dict[str, Path]:
    return {n: d / n for n in request.optional if (d / n).is_file()}


def _from_cache(request: WeightsRequest, cache: Path) -> ResolvedWeights | None:
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> Path | None:
        r = try_to_load_from_cache(request.repo, name, cache_dir=cache)
        return Path(r) if isinstance(r, str) else None

    found: list[Path] = []
    for group in request.files:
        hit = None
        for alt in group:
            p = cached(alt)
            if (
                p is not None
                and alt.endswith(".index.json")
                and not all(cached(s) is not None for s in _shards(p))
            ):
                continue  # an index whose shards are not all cached
            if p is not None:
                hit = p
                break
        if hit is None:
            return None
        found.append(hit)
    optional = {n: p for n in request.optional if (p := cached(n)) is not None}
    directory = found[0].parent
    return ResolvedWeights(tuple(found), directory, f"hf cache: {directory}", optional)


def _download(request: WeightsRequest) -> ResolvedWeights:
    if request.repo is None:
        assert request.url is not None
        import torch.hub

        dest = model_dir(request.dir_name) / Path(urlparse(request.url).path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(request.url, str(dest))
        except Exception as e:
            raise WeightsUnavailableError(
                f"downloading the weights of {request.model!r} from {request.url} failed: {e}"
            ) from e
        return ResolvedWeights((dest,), dest.parent, f"url: {request.url} -> {dest}")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    cache = hf_cache_dir()

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(request.repo, name, cache_dir=cache))

    found: list[Path] = []
    try:
        for group in request.files:
            for alt in group:
                try:
                    p = fetch(alt)
                except EntryNotFoundError:
                    continue  # this alternative is not published; try the next one
                for shard in _shards(p) if alt.endswith(".index.json") else []:
                    fetch(shard)
                found.append(p)
                break
            else:
                raise WeightsUnavailableError(
                    f"hub repo {request.repo} has none of {', '.join(group)} "
                    f"(needed by {request.model!r})"
                )
        optional: dict[str, Path] = {}
        for name in request.optional:
            with contextlib.suppress(EntryNotFoundError):  # optional files may not be published
                optional[name] = fetch(name)
    except WeightsUnavailableError:
        raise
    except Exception as e:
        raise WeightsUnavailableError(
            f"downloading the weights of {request.model!r} from hub repo {request.repo} failed: "
            f"{e}\n{fetch_instructions(request)}"
        ) from e
    directory = found[0].parent
    return ResolvedWeights(tuple(found), directory, f"hub: {request.repo} -> {directory}", optional)


def fetch_instructions(request: WeightsRequest) -> str:
    """The commands that put this model's files where :func:`resolve_weights` looks."""
    target = model_dir(request.dir_name)
    lines = ["To fix it, on a machine with network run:"]
    if request.repo:
        args = request.download_args or " ".join(g[0] for g in request.files)
        lines.append(f"  hf download {request.repo} {args} --local-dir {target}")
        lines.append(
            "  (older huggingface_hub: `huggingface-cli download` with the same arguments)"
        )
    elif request.url:
        name = Path(urlparse(request.url).path).name
        lines.append(f"  mkdir -p {target} && curl -L -o {target}/{name} {request.url}")
    lines.append(
        f"then copy {target} to the same path on this machine (the root is $CLINADAPT_MODEL_DIR, "
        f"default ~/.cache/clinadapt/models), or pass the folder or file as weights=PATH "
        "(CLI: --weights PATH). pretrained=False (CLI: --set pretrained=false) builds the model "
        "with random weights instead."
    )
    return "\n".join(lines)


def resolve_weights(
    request: WeightsRequest, weights: str | os.PathLike[str] | None = None
) -> ResolvedWeights:
    """Find the files of ``request``: (a) ``weights``, (b) the model dir, (c) the HF cache, (d) the hub."""
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_file():
            if len(request.files) != 1:
                need = ", ".join(_group_text(g) for g in request.files)
                raise WeightsUnavailableError(
                    f"weights={p} is a single file, but {request.model!r} needs a directory "
                    f"holding {need}"
                )
            return ResolvedWeights((p,), None, f"file: {p}")
        if p.is_dir():
            found, missing = _scan_dir(p, request)
            if missing:
                held = ", ".join(sorted(f.name for f in p.iterdir())[:20]) or "nothing"
                raise WeightsUnavailableError(
                    f"weights directory {p} for {request.model!r} lacks {', '.join(missing)} "
                    f"(it holds: {held})"
                )
            return ResolvedWeights(found, p, f"local dir: {p}", _optional_in_dir(p, request))
        raise WeightsUnavailableError(f"weights={p} for {request.model!r} does not exist")

    looked: list[str] = []
    mdir = model_dir(request.dir_name)
    if mdir.is_dir():
        found, missing = _scan_dir(mdir, request)
        if not missing:
            return ResolvedWeights(
                found, mdir, f"model dir: {mdir}", _optional_in_dir(mdir, request)
            )
        looked.append(f"{mdir} (exists but lacks {', '.join(missing)})")
    else:
        looked.append(f"{mdir} (does not exist)")

    if request.repo:
        cache = hf_cache_dir()
        hit = _from_cache(request, cache)
        if hit is not None:
            return hit
        looked.append(f"the Hugging Face cache {cache} (not cached)")

    reason = offline_reason()
    if reason is None and (request.repo or request.url):
        return _download(request)
    if reason is None:
        reason = "no download source is known"
    raise WeightsUnavailableError(unavailable_message(request, looked, reason))


def blocked_pickle(error: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a file for holding more than tensors."""
    return "weights_only" in str(error) or type(error).__name__ == "UnpicklingError"


def torch_load_tensors(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain values only, so a
    crafted pickle is refused before any of it runs; torch's note on the pickle protocol of a
    file it then refuses is not shown."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


@contextlib.contextmanager
def loading_weights(weights: str | os.PathLike[str] | None, what: str) -> Iterator[None]:
    """Around building a model from ``weights``: torch's note on the pickle protocol of a file
    it then refuses is not shown, and when ``weights`` were given, any failure that is not
    already a clinadapt error becomes one IncompatibleError line naming the file (a foreign,
    truncated or malicious file is not a traceback)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            yield
    except ClinadaptError:
        raise
    except Exception as e:
        if weights is None:
            raise
        raise IncompatibleError(load_failure(weights, what, e)) from e


def weights_fingerprint(weights: str | None) -> str | None:
    """A digest of the local weights file (or of every file of a weights folder) by path, size
    and modification time in ns (a rewrite of the same size is seen however soon it comes);
    None for hub weights, objects and paths that are not there."""
    if not weights or weights.startswith("object:"):
        return None
    path = Path(os.fspath(weights)).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_failure(path: str | os.PathLike[str], what: str, error: BaseException) -> str:
    """One line for a file that exists but could not be loaded as ``what`` (e.g. "weights of
    'resnet50'"): say which file and why."""
    if blocked_pickle(error):
        return (
            f"{path}: refused to load it as {what}: it is a pickle holding more "
            "than tensors, which torch.load(weights_only=True) blocks because unpickling it could "
            "run code. Load only files you trust; save weights as safetensors (or a plain state "
            "dict of tensors)"
        )
    flat = " ".join(str(error).split())  # one line, however the library formats its message
    if len(flat) > 300:
        flat = flat[:300] + "..."
    return f"{path}: cannot load it as {what}: {type(error).__name__}: {flat}"


def unavailable_message(request: WeightsRequest, looked: list[str], reason: str) -> str:
    """Say which files are missing, where they were looked for, and how to fetch them."""
    lines = [
        f"pretrained weights for model {request.model!r} are not available offline ({reason})."
    ]
    if request.repo:
        lines.append(f"  hub repo:     {request.repo}")
    if request.url:
        lines.append(f"  download url: {request.url}")
    files = ", ".join(_group_text(g) for g in request.files)
    lines.append(f"  files needed: {files}")
    if request.optional:
        lines.append(f"  also used if present: {', '.join(request.optional)}")
    lines.append(f"  looked in:    {'; '.join(looked)}")
    lines.append(fetch_instructions(request))
    return "\n".join(lines)
