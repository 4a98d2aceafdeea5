"""Registries declared as data: listings import no torch, and the declarations are true."""

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import clinadapt
from clinadapt._registry import Registry
from clinadapt.catalog import KINDS, _registry, listing
from clinadapt.errors import RegistryError
from clinadapt.models.registry import MODELS, read_specs
from clinadapt.models.spec import ModelSpec

SRC = Path(clinadapt.__file__).parent


def _import_everything() -> None:
    for info in pkgutil.walk_packages([str(SRC)], "clinadapt."):
        if info.name != "clinadapt.__main__":
            importlib.import_module(info.name)


def test_listings_and_help_import_no_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from clinadapt.cli import app\n"
        "r = CliRunner()\n"
        "for args in (['--help'], ['--version'], ['models'], ['datasets'], ['methods'],\n"
        "             ['targets', '--json'], ['shifts'], ['corruptions'], ['run', '--help']):\n"
        "    res = r.invoke(app, args)\n"
        "    assert res.exit_code == 0, (args, res.output)\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'timm', 'transformers') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", KINDS)
def test_every_declared_entry_is_registered_by_its_module(kind):
    reg = _registry(kind)
    declared = {e.name: e for e in reg.entries()}
    for name, obj in reg.load_all().items():
        assert obj is not None
        assert declared[name].module is not None
    if kind == "methods":  # the declared kind (first tag) is the class's own
        for e in reg.entries():
            assert e.tags[0] == e.obj.kind, e.name
    if kind == "corruptions":
        for e in reg.entries():
            assert e.obj.modalities == e.tags, e.name


def test_no_module_registers_an_undeclared_name():
    declared = {kind: {r["name"] for r in listing(kind)} for kind in KINDS}
    _import_everything()
    for kind in KINDS:
        assert {r["name"] for r in listing(kind)} == declared[kind], kind


def test_lazy_registry_contract(tmp_path, monkeypatch):
    pkg = tmp_path / "lazypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(
        "from lazypkg.reg import REG\n@REG.register('alpha')\ndef alpha():\n    return 1\n"
    )
    (pkg / "silent.py").write_text("")
    (pkg / "index.json").write_text(
        json.dumps(
            {
                "alpha": {"module": "lazypkg.good", "help": "first", "tags": ["x"]},
                "beta": {"module": "lazypkg.silent", "help": "never registered"},
            }
        )
    )
    (pkg / "reg.py").write_text(
        "from pathlib import Path\nfrom clinadapt._registry import Registry\n"
        "REG = Registry('thing', Path(__file__).with_name('index.json'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = importlib.import_module("lazypkg.reg").REG
    assert reg.names() == ["alpha", "beta"] and "lazypkg.good" not in sys.modules
    assert reg.entry("alpha").help == "first" and reg.entry("alpha").tags == ("x",)
    assert reg.get("alpha")() == 1 and "lazypkg.good" in sys.modules
    with pytest.raises(RegistryError, match=r"lazypkg\.silent, which does not register it"):
        reg.get("beta")
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha", lambda: 2)
    with pytest.raises(RegistryError, match="declared in"):
        reg.register("beta", lambda: 3, help="another text")
    with pytest.raises(RegistryError, match="Did you mean 'alpha'"):
        reg.get("alpah")
    code_only = Registry("thing")
    code_only.register("gamma", lambda: 4, help="made in code")
    assert code_only.entry("gamma").help == "made in code" and code_only.get("gamma")() == 4
    with pytest.raises(RegistryError, match="lowercase"):
        code_only.register("Gamma", lambda: 5)


def test_model_specs_are_data(tmp_path):
    tiny = MODELS.get("tiny-vit")
    assert tiny.family == "timm" and tiny.tiny and tiny.preprocess.image_size == (32, 32)
    assert tiny.kwargs["embed_dim"] == 64 and tiny.seed == 1
    assert ModelSpec.from_dict(tiny.to_dict()) == tiny
    families = {e.tags[0] for e in MODELS.entries()}
    assert families == {"timm", "open_clip", "hf", "volume"}
    bad = tmp_path / "x_family.json"
    bad.write_text(json.dumps([{"name": "m", "arch": "a", "pretrained": None, "description": ""}]))
    assert read_specs(bad, "timm")[0].family == "timm"
    bad.write_text(json.dumps([{"name": "m", "arch": "a", "colour": 1}]))
    with pytest.raises(RegistryError, match=r"x_family\.json"):
        read_specs(bad, "timm")


@pytest.mark.parametrize("kind", ["shifts", "datasets"])
def test_declared_option_descriptions_match_the_signatures(kind):
    from clinadapt.catalog import details

    for entry in _registry(kind).entries():
        described = set(entry.info.get("options", {}))
        shown = details(kind, entry.name)["options"]
        assert {o["name"] for o in shown} == described, entry.name
        assert all(o["description"] for o in shown), entry.name
