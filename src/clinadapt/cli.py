"""The ``clinadapt`` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clinadapt.errors import ClinadaptError, ConfigError, clip_message

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Adapt foundation models to medical images and measure how they hold up under clinical shift.",
)
# Off a terminal rich assumes 80 columns, which wraps the results tables; logs and pipes get 120.
# markup=False: names, paths and messages are printed as they are (a "[x]" in a path is text)
console = Console(
    stderr=False,
    width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120,
    markup=False,
)


def _bold(text: object) -> Text:
    return Text(str(text), style="bold")


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or status lines")]
AsJson = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
Device = Annotated[
    str | None,
    typer.Option(help="torch device: auto (the default: cuda, else mps, else cpu), cpu, cuda, mps"),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        help="fp32 (default), or mixed precision: bf16 (CPU or GPU) or fp16 (GPU, loss scaled)"
    ),
]
Settings = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-o",
        help="KEY=VALUE for any field of the configuration, dotted for nested fields "
        "(method_options.epochs=5); VALUE is read as YAML. Repeatable.",
    ),
]


def _version(value: bool) -> None:
    if value:
        from clinadapt import __version__

        print(f"clinadapt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Adapt foundation models to medical images and measure how they hold up under clinical shift."""


def _plain_table(title: str, header: list[str], rows: list[list[Any]]) -> Table:
    """A table whose cells are plain text (so "[fit]" or a path with brackets prints as is)."""
    table = Table(title=Text(title))
    for i, h in enumerate(header):
        table.add_column(Text(h), style="bold" if i == 0 else None)
    for row in rows:
        table.add_row(*[Text(str(c)) for c in row])
    return table


def _catalog(kind: str, name: str | None, as_json: bool, title: str, describe_row) -> None:
    from clinadapt.catalog import details, listing

    if name is not None:
        info = details(kind, name)
        if as_json:
            print(json.dumps(info, indent=2, default=str))
            return
        console.print(Text(f"{kind[:-1]} {info['name']}: {info['help']}"))
        for key in ("kind", "default_target", "modalities", "severity_parameters"):
            if key in info:
                console.print(Text(f"{key.replace('_', ' ')}: {info[key]}"))
        if "options" in info:
            rows = [
                [o["name"], o["type"], json.dumps(o["default"], default=str), o["description"]]
                for o in info["options"]
            ]
            if rows:
                header = ["option", "type", "default", "description"]
                console.print(_plain_table("options", header, rows))
            else:
                console.print("options: none")
        shown = ("name", "help", "tags", "kind", "default_target", "options", "doc")
        for key, value in info.items():
            if key not in shown and key not in ("modalities", "severity_parameters"):
                console.print(Text(f"{key}: {json.dumps(value, default=str)}"))
        return
    entries = listing(kind)
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    rows = [[e["name"], describe_row(e)] for e in entries]
    console.print(_plain_table(title, ["name", "description"], rows))


Name = Annotated[str | None, typer.Argument(help="show one entry with its options")]


@app.command()
def models(name: Name = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """List the registered models (tiny-* ones are randomly initialised test configurations)."""
    _catalog("models", name, as_json, "models", lambda e: e["help"])


@app.command()
def datasets(name: Name = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """List the registered datasets (paths to folders, CSVs, .npz and NIfTI also work)."""
    _catalog("datasets", name, as_json, "datasets", lambda e: e["help"])


@app.command()
def methods(name: Name = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """List the registered methods (how to adapt), or one method's options."""
    _catalog("methods", name, as_json, "methods", lambda e: f"[{e['kind']}] {e['help']}")


@app.command()
def targets(name: Name = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """List the registered targets (what to adapt), or one target's options."""
    _catalog("targets", name, as_json, "targets", lambda e: e["help"])


@app.command()
def segmenters(name: Name = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """List the promptable segmenters (SAM, MedSAM, SAM 2; tiny-* are random test ones)."""
    _catalog("segmenters", name, as_json, "segmenters", lambda e: e["help"])


@app.command()
def segment(
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="an image file (repeatable); NIfTI too")
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="a folder of images")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="a segmentation dataset (name or path): prompts derived from its masks"),
    ] = None,
    derive: Annotated[
        str, typer.Option(help="with --data: box, points, box+points or mask (per class)")
    ] = "box",
    jitter: Annotated[
        int, typer.Option(help="with --data: box jitter in pixels (MedSAM: 20)")
    ] = 20,
    limit: Annotated[int | None, typer.Option(help="with --data: the first N images")] = None,
    seed: Annotated[int, typer.Option(help="with --data: seed of the derived prompts")] = 0,
    model: Annotated[
        str | None,
        typer.Option(help="segmenter (clinadapt segmenters); default: the adapted file's base"),
    ] = None,
    box: Annotated[
        list[str] | None, typer.Option("--box", help="x1,y1,x2,y2 in pixels, one per object")
    ] = None,
    point: Annotated[
        list[str] | None, typer.Option("--point", help="x,y of a foreground point")
    ] = None,
    negative: Annotated[
        list[str] | None, typer.Option("--negative", help="x,y of a background point")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="prompts per image file name: .json or .csv (see the README)"),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="base weights (folder or checkpoint) or clinadapt adapted weights"),
    ] = None,
    modality: Annotated[
        str | None, typer.Option(help="ct: window raw HU at level 40 / width 400 (MedSAM)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for masks and overlays")] = Path(
        "clinadapt-masks"
    ),
    device: Device = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Segment images with a promptable model; write label masks (PNG or NIfTI) and overlays."""
    import dataclasses

    from clinadapt.errors import ConfigError
    from clinadapt.progress import set_quiet
    from clinadapt.segmentation.apply import (
        list_images,
        load_for_inference,
        segment_dataset,
        segment_files,
    )

    set_quiet(quiet or as_json)
    files: list[Path] = list(image or [])
    if images is not None:
        files += list_images(images)
    if bool(files) == bool(data):
        raise ConfigError("give --image FILE (repeatable) / --images FOLDER, or --data DATASET")
    # every argument is checked before the model loads (minutes for SAM on a CPU)
    from clinadapt.compute import resolve_device
    from clinadapt.errors import DataError
    from clinadapt.preflight import check_out_dir
    from clinadapt.segmentation.apply import NO_PROMPT, parse_numbers
    from clinadapt.segmentation.prompts import prompt_spec

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such image file")
    for what, values, n in (("--box", box, 4), ("--point", point, 2), ("--negative", negative, 2)):
        for text in values or ():
            parse_numbers(text, n, what)
    if prompts is not None and not prompts.is_file():
        raise DataError(f"prompts file {str(prompts)!r} does not exist")
    if data is None and prompts is None and not (box or point or negative) and weights is None:
        raise ConfigError(NO_PROMPT)  # only adapted weights bring a default prompt
    if modality is not None and modality.lower() != "ct":
        raise ConfigError(
            f"--modality {modality!r}: only ct changes the preprocessing (raw HU windowed at "
            "level 40, width 400); other images are scaled by their own range, without it"
        )
    spec = prompt_spec(kind=derive, jitter=jitter) if data is not None else None
    check_out_dir(out)
    resolved = resolve_device(device)
    if model is None and weights is None:
        model = "medsam"
    seg = load_for_inference(model, weights, resolved)

    def show(item: Any) -> None:
        if not (quiet or as_json):
            console.print(f"{item.image}: {item.objects} object(s) -> {item.mask}")

    if data is not None:
        from clinadapt.data import load_dataset

        ds = load_dataset(data)
        done = segment_dataset(seg, ds, out, spec, limit=limit, seed=seed, on_done=show)
        if as_json:
            print(json.dumps([dataclasses.asdict(d) for d in done], indent=2))
        return
    done = segment_files(
        seg,
        files,
        out,
        prompts_file=None if prompts is None else str(prompts),
        boxes=box or (),
        points=point or (),
        negatives=negative or (),
        modality=modality,
        on_done=show,
    )
    if as_json:
        print(json.dumps([dataclasses.asdict(d) for d in done], indent=2))


@app.command()
def shifts(name: Name = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """List the registered shift protocols, or one protocol's options."""
    _catalog("shifts", name, as_json, "shift protocols", lambda e: e["help"])


@app.command()
def corruptions(name: Name = None, quiet: Quiet = False, as_json: AsJson = False) -> None:
    """List the acquisition artefacts of the corruption shift, with the modalities they fit."""
    _catalog(
        "corruptions",
        name,
        as_json,
        "corruptions (severities 1-5)",
        lambda e: f"{e['help']} ({', '.join(e['tags'])})",
    )


def print_results(records: list[dict[str, Any]], metric: str | None = None) -> None:
    from clinadapt.evaluation.report import results_table
    from clinadapt.tasks.base import headline_metric

    metric = metric or headline_metric(records)

    header, rows = results_table(records, metric)
    table = Table(title=f"{metric.replace('_', ' ')} per test set")
    for h in header:
        table.add_column(h, justify="left" if h == "run" else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML run configuration (optional)")] = None,
    model: Annotated[
        str | None, typer.Option(help="model name, e.g. tiny-resnet, resnet50, clip-vit-b16")
    ] = None,
    data: Annotated[str | None, typer.Option(help="dataset name or path")] = None,
    target: Annotated[
        str | None, typer.Option(help="what to adapt, e.g. head, full, lora+head")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="how to adapt, e.g. finetune, linear-probe, bn")
    ] = None,
    shift: Annotated[str | None, typer.Option(help="shift protocol, e.g. domain, none")] = None,
    seed: Annotated[int | None, typer.Option(help="seed")] = None,
    weights: Annotated[str | None, typer.Option(help="local weights file or directory")] = None,
    device: Device = None,
    precision: PrecisionOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="directory for result records")] = None,
    option: Settings = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Run one experiment and write one JSON result record (no arguments: the built-in default)."""
    from clinadapt.config import load_config
    from clinadapt.progress import set_quiet
    from clinadapt.runner import run_experiment

    set_quiet(quiet or as_json)
    overrides: dict[str, Any] = {
        "model": model,
        "data": data,
        "target": target,
        "method": method,
        "shift": shift,
        "seed": seed,
        "weights": weights,
        "device": device,
        "precision": precision,
        "out_dir": out,
    }
    cfg = load_config(config, option or [], **overrides)
    record = run_experiment(cfg)
    path = Path(cfg.out_dir) / f"{record['run_id']}.json"
    if as_json:
        print(
            json.dumps(
                {"record": str(path), "metrics": record["metrics"], "summary": record["summary"]},
                indent=2,
            )
        )
        return
    print_results([record])
    target = record["target"]
    trained = f"trainable parameters: {target['trainable']:,} of {target['total']:,}"
    if target["trainable"] == 0 and target.get("changes"):
        trained += f" (changes: {target['changes']})"
    console.print(trained)
    console.print("result record:", _bold(path))


def _check_metric_name(metric: str) -> None:
    """Refuse a ``--metric`` no classification task computes, with the closest name."""
    from clinadapt.evaluation.metrics import metric_names
    from clinadapt.evaluation.replicates import AT_THRESHOLD, SELECTIVE
    from clinadapt.validate import did_you_mean

    tasks = (("multiclass", 3), ("binary", 2), ("multilabel", 3))
    known = sorted({m for t, k in tasks for m in metric_names(t, k)} | {*AT_THRESHOLD, *SELECTIVE})
    if metric not in known:
        raise ConfigError(
            f"--metric {metric!r} is not a metric{did_you_mean(metric, known)} "
            f"(known: {', '.join(known)})"
        )


@app.command()
def fewshot(
    shots: Annotated[str, typer.Option(help="shot counts, comma-separated")] = "1,2,4,8,16",
    seeds: Annotated[
        str, typer.Option(help="number of seeds (0..N-1) or a comma-separated list")
    ] = "5",
    model: Annotated[str, typer.Option(help="model name (a CLIP-like one adds zero-shot)")] = (
        "tiny-clip"
    ),
    data: Annotated[str, typer.Option(help="dataset name or path")] = "clinical-shift",
    methods: Annotated[
        str, typer.Option(help="frozen-feature methods, comma-separated")
    ] = "prototype,knn,tip-adapter,linear-probe",
    shift: Annotated[str, typer.Option(help="shift protocol, e.g. domain, none")] = "domain",
    metric: Annotated[str, typer.Option(help="metric of the printed table")] = "balanced_accuracy",
    view: Annotated[
        str, typer.Option(help="table column values: shifted, in_domain, worst or a test set name")
    ] = "shifted",
    weights: Annotated[str | None, typer.Option(help="local weights file or directory")] = None,
    device: Device = None,
    precision: PrecisionOpt = None,
    out: Annotated[str, typer.Option("--out", help="directory for result records")] = (
        "clinadapt-fewshot"
    ),
    option: Settings = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Few-shot sweep on frozen features: one embedding pass, one record per (method, shots, seed).

    --set sets fields of the base run configuration; each method's options are keyed by its
    name: --set method_options.knn.k=10.
    """
    from clinadapt.config import load_config
    from clinadapt.fewshot_sweep import (
        check_view,
        parse_int_list,
        parse_seeds,
        run_fewshot_sweep,
        sweep_table,
    )
    from clinadapt.progress import set_quiet

    set_quiet(quiet or as_json)
    _check_metric_name(metric)  # a typo fails now, not after the whole sweep has run
    names = [m.strip() for m in methods.split(",") if m.strip()]
    overrides: dict[str, Any] = {
        "model": model,
        "data": data,
        "shift": shift,
        "weights": weights,
        "device": device,
        "precision": precision,
        "out_dir": out,
    }
    base = load_config(None, option or [], **overrides)
    per_method = base.method_options
    if any(not isinstance(v, dict) for v in per_method.values()):
        raise ConfigError(
            "a few-shot sweep runs several methods: key method_options by method name, e.g. "
            f"--set method_options.knn.k=10 (methods: {', '.join(names)})"
        )
    base = base.model_copy(update={"method_options": {}})
    seed_list = parse_seeds(seeds)
    check_view(base, view, seed_list[0])  # a typo fails now, not after the whole sweep has run
    result = run_fewshot_sweep(base, names, parse_int_list(shots, "--shots"), seed_list, per_method)
    header, rows = sweep_table(result.records, metric, view)
    if as_json:
        print(
            json.dumps(
                {
                    "records": [r["run_id"] for r in result.records],
                    "reused": result.skipped,
                    "feature_cache": result.cache,
                    "table": {"header": header, "rows": rows},
                },
                indent=2,
            )
        )
        return
    where = "shifted, or in-domain without a shift" if view == "shifted" else view
    table = Table(title=f"{metric.replace('_', ' ')} ({where}), mean ± SD over seeds")
    for h in header:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print(
        Text.assemble(
            f"{len(result.records)} result records in ",
            _bold(out),
            f" ({result.skipped} reused); images embedded: "
            f"{result.cache.get('embedded_images', 0)}",
        )
    )


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="sweep YAML: a base config and lists to combine")],
    workers: Annotated[int, typer.Option(help="parallel worker processes on this machine")] = 1,
    use_ray: Annotated[bool, typer.Option("--ray", help="run each run as a Ray task")] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Ray cluster to run on (implies --ray; default: $RAY_ADDRESS, else a local "
            "Ray instance)",
        ),
    ] = None,
    ray_cpus: Annotated[float, typer.Option("--ray-cpus", help="CPUs per run on Ray")] = 1.0,
    ray_gpus: Annotated[
        float | None,
        typer.Option(
            "--ray-gpus",
            help="GPUs per run on Ray (default: 1 when the runs use a GPU and the cluster has one)",
        ),
    ] = None,
    out: Annotated[str | None, typer.Option("--out", help="directory for result records")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list the runs and which are done; run nothing")
    ] = False,
    with_report: Annotated[
        bool, typer.Option("--report/--no-report", help="write the report when done")
    ] = True,
    option: Settings = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Run every combination of a sweep file once; skips runs with records, so it resumes.

    --set KEY=VALUE applies to every run, after the base and the grid.
    """
    from clinadapt.progress import set_quiet
    from clinadapt.sweep import describe, load_sweep, run_sweep

    set_quiet(quiet or as_json)
    spec = load_sweep(config, out_dir=out, settings=option or [])
    if dry_run:
        rows = describe(spec)
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            runs = [[r["run_id"], "done" if r["done"] else "to run"] for r in rows]
            console.print(_plain_table("runs", ["run", "status"], runs))
        return
    result = run_sweep(
        spec,
        workers=workers,
        use_ray=use_ray,
        ray_address=ray_address,
        ray_cpus=ray_cpus,
        ray_gpus=ray_gpus,
    )
    summary: dict[str, Any] = {"out_dir": spec.out_dir, **result.to_dict()}
    if with_report and (result.ran or result.skipped) and not _other_process():
        from clinadapt.evaluation.report import write_report

        summary["report"] = str(write_report(spec.out_dir).html)
    if result.failed:
        message = (
            f"{len(result.failed)} of {result.total} runs failed (see failed/ in {spec.out_dir})"
        )
        summary["error"] = {"type": "RunFailed", "message": message}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(
            f"sweep: {result.total} runs, {len(result.ran)} ran, {len(result.skipped)} already "
            f"done, {len(result.failed)} failed; records in",
            _bold(spec.out_dir),
        )
        if "report" in summary:
            console.print("report:", _bold(summary["report"]))
    if result.failed:
        for run_id, error in result.failed.items():
            _print_error("RunFailed", f"{run_id} failed: {error}", False)
        raise typer.Exit(1)


@app.command()
def report(
    runs_dir: Annotated[Path, typer.Argument(help="directory of result records")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="directory for the report files (default: RUNS_DIR)"),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(help="headline metric of tables and figures (default: the task's own)"),
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Write an HTML and a Markdown report, results.csv and figures (PNG, SVG, PDF, CSV) from a
    directory of result records; prints where each file went."""
    from clinadapt.evaluation.report import write_report
    from clinadapt.progress import set_quiet

    set_quiet(quiet or as_json)

    files = write_report(runs_dir, out_dir=out, metric=metric)
    if as_json:
        print(json.dumps(files.to_dict(), indent=2))
        return
    for what, path in files.all():
        print(f"{what}: {path}")
    print(f"report: {files.html}")


@app.command()
def demo(
    out: Annotated[
        str, typer.Option("--out", help="directory for records and the report")
    ] = "clinadapt-demo",
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """The whole loop offline: train on one site, shift to the others, test-time adapt, report."""
    from clinadapt.demo import Stopwatch, demo_configs
    from clinadapt.evaluation.report import write_report
    from clinadapt.preflight import check_out_dir
    from clinadapt.progress import set_quiet, status
    from clinadapt.runner import run_experiment

    clock = Stopwatch()  # counts from the start of the command, imports included
    set_quiet(quiet or as_json)
    check_out_dir(out)  # a bad --out is the only line printed, before the banner
    status(
        "clinadapt demo: built-in clinical-shift data (4 simulated sites), a tiny ResNet trained "
        "on site-a, tested on every site and on X-ray acquisition artefacts, with and without "
        "test-time adaptation"
    )
    records = [run_experiment(cfg) for cfg in demo_configs(out, seed)]
    path = write_report(out, formats=("png",)).html  # `clinadapt report` adds SVG and PDF
    elapsed = clock.seconds()
    if as_json:
        print(
            json.dumps(
                {"report": str(path), "runs": [r["run_id"] for r in records], "seconds": elapsed},
                indent=2,
            )
        )
        return
    print_results([r for r in records if r["config"]["shift"] == "domain"])
    corr = [r for r in records if r["config"]["shift"] == "corruption"]
    table = Table(
        title="balanced accuracy under X-ray artefacts (site-a test set, mean over kinds)"
    )
    table.add_column("run", justify="left")
    severities = sorted({int(s.rsplit("@", 1)[1]) for r in corr for s in r["metrics"] if "@" in s})
    table.add_column("clean", justify="right")
    for sev in severities:
        table.add_column(f"severity {sev}", justify="right")
    for r in corr:
        m = r["metrics"]
        row = [r["config"]["method"], f"{m['clean']['balanced_accuracy']:.3f}"]
        for sev in severities:
            vals = [v["balanced_accuracy"] for k, v in m.items() if k.endswith(f"@{sev}")]
            row.append(f"{sum(vals) / len(vals):.3f}")
        table.add_row(*row)
    console.print(table)
    console.print(
        "finetune/source: the site-a model as it is; bn: test-batch normalisation statistics; "
        "tent: entropy minimisation of the norm layers on the unlabelled stream."
    )
    console.print(f"done in {elapsed:.0f} s (wall time of the command). report:", _bold(path))


@app.command()
def pretrain(
    method: Annotated[
        str,
        typer.Option(
            help="self-supervised method: simclr, dino or mae (volumes: mae-3d, simclr-3d)"
        ),
    ],
    model: Annotated[str, typer.Option(help="model to pre-train, e.g. tiny-vit, mae-vit-b16")],
    data: Annotated[str, typer.Option(help="dataset name or path (its labels are not used)")],
    init_from: Annotated[
        str | None,
        typer.Option("--from", help="continue from these weights (file, folder or earlier run)"),
    ] = None,
    out: Annotated[
        str, typer.Option("--out", help="folder for checkpoint, weights and summary")
    ] = "clinadapt-pretrain",
    max_steps: Annotated[int, typer.Option(help="optimiser steps")] = 200,
    max_minutes: Annotated[
        float | None, typer.Option(help="stop (resumably) after this much training time")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="unlabelled images per step")] = 64,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    scratch: Annotated[
        bool, typer.Option("--scratch", help="random initialisation instead of published weights")
    ] = False,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    device: Device = None,
    precision: PrecisionOpt = None,
    option: Settings = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Self-supervised (continued) pre-training on unlabelled images; resumes from --out.

    Under torchrun --nproc-per-node N the processes split every global batch of --batch-size
    images and train what one process trains; process 0 writes and evaluates.

    --set sets any pre-training field: method_options.temperature=0.2,
    data_options.patients_per_site=30.
    """
    from clinadapt.config import apply_settings
    from clinadapt.progress import set_quiet
    from clinadapt.ssl import make_config
    from clinadapt.ssl import pretrain as run_pretrain

    set_quiet(quiet or as_json)
    fields: dict[str, Any] = {
        "method": method,
        "model": model,
        "data": data,
        "init_from": init_from,
        "out_dir": out,
        "max_steps": max_steps,
        "max_minutes": max_minutes,
        "batch_size": batch_size,
        "lr": lr,
        "pretrained": not scratch,
        "seed": seed,
        "device": device,
        "precision": precision,
    }
    fields = apply_settings({k: v for k, v in fields.items() if v is not None}, option or [])
    summary = run_pretrain(make_config(**fields))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{method} pre-training of {model}: frozen-feature test balanced accuracy")
    for h in ("backbone", "linear probe", "k-NN"):
        table.add_column(h, justify="left" if h == "backbone" else "right")
    for label, key in (("before", "eval_baseline"), ("after", "eval")):
        if key in summary:
            ev = summary[key]
            table.add_row(
                label,
                f"{ev['linear_probe']['balanced_accuracy']:.3f}",
                f"{ev['knn']['balanced_accuracy']:.3f}",
            )
    console.print(table)
    if "eval" in summary:
        seen = summary["eval"]["evaluated_on"]
        pool = summary["data"]["pool"]
        console.print(
            f"probe on the {seen['split']} split ({seen['images']} images, "
            + (
                f"{pool['test_images']} of them pre-trained on: transductive)"
                if pool["transductive"]
                else "none of them pre-trained on)"
            )
        )
    console.print(
        f"{summary['steps']} steps, loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}"
    )
    console.print(
        Text.assemble(
            "weights: ", _bold(summary["weights"]), f"  (load_model({model!r}, weights=...))"
        )
    )


@app.command()
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="a result record (<run_id>.json), an adapted-weights file (.safetensors), or a "
            "run id in --runs"
        ),
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="timm, open_clip, transformers or peft (default: the model's own library)",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="folder to write (default: <source>-<format> beside it)"),
    ] = None,
    runs: Annotated[Path, typer.Option("--runs", help="where to look up a run id")] = Path(
        "clinadapt-runs"
    ),
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Write an adapted model in its library's own format (LoRA merged, or a PEFT adapter), with
    the class names, the head and the preprocessing in its metadata."""
    from clinadapt.export import export_model
    from clinadapt.progress import set_quiet

    set_quiet(quiet or as_json)
    path = Path(source)
    if not path.exists() and (runs / f"{source}.json").is_file():
        path = runs / f"{source}.json"
    meta = export_model(path, fmt, out)
    if as_json:
        print(json.dumps(meta, indent=2, default=str))
        return
    console.print(
        f"exported {meta['base_model']['name']} ({meta['format']}) to", _bold(meta["folder"])
    )
    for file in meta["files"]:
        console.print(f"  {file}", soft_wrap=True)
    console.print(f"load with: {meta['load']}", soft_wrap=True)
    if "features" in meta:  # the head sits beside the model: what it takes, as code
        console.print(f"head input: {meta['features']}", soft_wrap=True)


def _print_error(kind: str, message: str, as_json: bool) -> None:
    """One error as plain text on stderr (never Rich markup: paths hold brackets) and, with
    ``--json``, as a JSON object on stdout."""
    message = clip_message(message)
    if as_json:
        print(json.dumps({"error": {"type": kind, "message": message}}))
    label = "\x1b[1;31merror:\x1b[0m" if sys.stderr.isatty() else "error:"
    sys.stderr.write(f"{label} {message}\n")
    sys.stderr.flush()


def _other_process() -> bool:
    """Whether torchrun started this process as one of several and not as rank 0 (which
    alone prints and writes)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def main(argv: list[str] | None = None) -> None:
    """The ``clinadapt`` entry point: errors end as one plain message, never a traceback.

    With ``--json`` every failure (usage errors too) also prints ``{"error": {"type",
    "message"}}`` on stdout.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in args
    if _other_process():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (under torchrun process 0 speaks)
    try:
        if not as_json:  # typer shows usage errors and help itself
            app(args=args, prog_name="clinadapt")
            return
        code = app(args=args, prog_name="clinadapt", standalone_mode=False)
    except ClinadaptError as e:
        _print_error(type(e).__name__, str(e), as_json)
        sys.exit(2)
    except typer.TyperException as e:  # --json: unknown option, bad value, missing argument
        _print_error(type(e).__name__, e.format_message(), as_json)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        _print_error("Abort", "aborted", as_json)
        sys.exit(1)
    except Exception as e:  # a defect: keep the traceback, but --json still gets its object
        if as_json:
            payload = {"type": type(e).__name__, "message": clip_message(str(e))}
            print(json.dumps({"error": payload}))
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
