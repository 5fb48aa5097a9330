"""Bad input, table-driven: through the Python API a ValueError whose one-line message names what is
wrong; through the command line exit code 2 and one line on stderr, nothing written. Each case is an
input a user could plausibly type."""

import json

import pytest
import torch
from torch import nn

from gblr import GBLRLinear
from gblr.calibration import damped
from gblr.cli import main
from gblr.compact import CompactGBLRLinear
from gblr.compress import compress_
from gblr.convert import ConvertConfig, convert_
from gblr.device import check_precision, resolve_device
from gblr.fit import fit_gblr, structured_from_dense
from gblr.io import load, save
from gblr.learn import SigmaSchedule, StructureLearner, param_groups
from gblr.structured import make_structured
from gblr.train import load_config, load_trained
from gblr.train.checkpoint import read_checkpoint

W = torch.randn(12, 16)
NAN = W.clone().index_fill_(0, torch.tensor([3]), float("nan"))


def model():
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def saved_model(tmp_path):
    net = model()
    convert_(net, ConvertConfig("gblr", 0.5))
    save(net, tmp_path / "saved")
    return tmp_path / "saved"


def tampered_structure(tmp_path, change):
    directory = saved_model(tmp_path)
    path = directory / "structure.json"
    structure = json.loads(path.read_text())
    change(structure)
    path.write_text(json.dumps(structure))
    return directory


def optimizer_for(net):
    return torch.optim.AdamW(param_groups(net, lr=1e-3))


API_CASES = {
    "in_features 0": (lambda p: GBLRLinear(0, 4), "in_features"),
    "out_features negative": (lambda p: GBLRLinear(4, -1), "out_features"),
    "rank 0": (lambda p: GBLRLinear(8, 8, rank=0), "rank"),
    "num_components 0": (lambda p: GBLRLinear(8, 8, num_components=0), "num_components"),
    "num_components huge": (lambda p: GBLRLinear(8, 8, num_components=10**7), "num_components"),
    "sigma tiny": (lambda p: GBLRLinear(8, 8, sigma=1e-170), "sigma"),
    "sigma nan": (lambda p: GBLRLinear(8, 8, sigma=float("nan")), "sigma"),
    "tile 0": (lambda p: GBLRLinear(8, 8, tile=0), "tile"),
    "width_init unknown": (lambda p: GBLRLinear(8, 8, width_init="bogus"), "width_init"),
    "forward wrong width": (lambda p: GBLRLinear(8, 8)(torch.randn(2, 7)), "8"),
    "dense fit of an empty matrix": (lambda p: structured_from_dense("gblr", torch.empty(0, 4), 0.5), "weight"),
    "dense fit of a NaN matrix": (lambda p: structured_from_dense("gblr", NAN, 0.5), "finite"),
    "low-rank fit of a NaN matrix": (lambda p: structured_from_dense("lowrank", NAN, 0.5), "finite"),
    "dense fit of a vector": (lambda p: structured_from_dense("gblr", torch.randn(5), 0.5), "weight"),
    "budget 0": (lambda p: structured_from_dense("lowrank", W, 0.0), "budget"),
    "budget above 1": (lambda p: structured_from_dense("lowrank", W, 1.5), "budget"),
    "budget nan": (lambda p: structured_from_dense("gblr", W, float("nan")), "budget"),
    "unknown family": (lambda p: structured_from_dense("butterfly", W, 0.5), "butterfly"),
    "make_structured unknown family": (lambda p: make_structured("nope", 8, 8, 0.5), "nope"),
    "fit steps negative": (lambda p: fit_gblr(W, 0.5, steps=-1), "steps"),
    "fit sweeps negative": (lambda p: fit_gblr(W, 0.5, steps=0, sweeps=-2), "sweeps"),
    "ConvertConfig family": (lambda p: ConvertConfig("xyz", 0.5), "xyz"),
    "ConvertConfig budget": (lambda p: ConvertConfig("gblr", -1.0), "budget"),
    "ConvertConfig unknown option": (lambda p: convert_(model(), ConvertConfig("gblr", 0.5, options={"bogus": 1})), "bogus"),
    "ConvertConfig init": (lambda p: ConvertConfig("gblr", 0.5, init="magic"), "init"),
    "compress allocation": (lambda p: compress_(model(), "gblr", 0.5, "sideways"), "allocation"),
    "compress budget": (lambda p: compress_(model(), "gblr", 2.0), "budget"),
    "param_groups lr negative": (lambda p: param_groups(model(), lr=-1.0), "lr"),
    "param_groups lr nan": (lambda p: param_groups(model(), lr=float("nan")), "lr"),
    "param_groups weight_decay": (lambda p: param_groups(model(), lr=1e-3, weight_decay=-0.1), "weight_decay"),
    "param_groups lr a bool": (lambda p: param_groups(model(), lr=True), "lr"),
    "learner target 0": (lambda p: _learner(target=0.0), "target"),
    "learner l1 a string": (lambda p: StructureLearner(nn.Sequential(GBLRLinear(8, 8)), None, 0.5, 100, l1="0.1"), "l1"),
    "damping 0": (lambda p: damped(torch.eye(4), damping=0.0), "damping"),
    "learner total_steps 0": (lambda p: _learner(total_steps=0), "total_steps"),
    "learner without GBLR layers": (lambda p: StructureLearner(model(), optimizer_for(model()), 0.5, 100), "GBLR"),
    "sigma schedule reversed": (lambda p: SigmaSchedule(1.0, 100.0, 10, 5), "start_step"),
    "compact of a Linear": (lambda p: CompactGBLRLinear(nn.Linear(4, 4)), "GBLRLinear"),
    "compact unknown execution": (lambda p: CompactGBLRLinear(GBLRLinear(8, 8).eval(), calibrate=False).run(torch.randn(2, 8), "fast"), "execution"),
    "compact wrong width": (lambda p: CompactGBLRLinear(GBLRLinear(8, 8).eval(), calibrate=False)(torch.randn(2, 9)), "8"),
    "load garbage structure.json": (lambda p: load(_garbage(saved_model(p) / "structure.json").parent, model()), "structure.json"),
    "load a structure of another shape": (lambda p: load(tampered_structure(p, _widen), model()), "the base model's is 16->12"),
    "load a structure with huge components": (lambda p: load(tampered_structure(p, _huge), model()), "num_components"),
    "load into another base model": (lambda p: load(saved_model(p), nn.Sequential(nn.Linear(16, 12))), "does not exist"),
    "config file missing": (lambda p: load_config(p / "nope.toml"), "nope.toml"),
    "config file not TOML": (lambda p: load_config(_garbage(p / "bad.toml")), "bad.toml"),
    "load_trained of a non-run": (lambda p: load_trained(p), "checkpoint"),
    "checkpoint of garbage": (lambda p: read_checkpoint(_garbage(p / "checkpoint.json").parent), "corrupt"),
    "device tpu": (lambda p: resolve_device("tpu"), "device"),
    "precision fp8": (lambda p: check_precision("fp8", torch.device("cpu")), "precision"),
}


def _learner(target=0.5, total_steps=100):
    net = nn.Sequential(GBLRLinear(8, 8))
    return StructureLearner(net, optimizer_for(net), target, total_steps)


def _garbage(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ this is not [ valid")
    return path


def _widen(structure):
    layer = next(iter(structure["layers"].values()))
    layer["out_features"] = layer["out_features"] + 16


def _huge(structure):
    layer = next(iter(structure["layers"].values()))
    layer["options"]["num_components"] = 10**7


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_bad_input_is_one_clear_value_error(case, tmp_path):
    call, names = API_CASES[case]
    with pytest.raises(ValueError) as raised:
        call(tmp_path)
    message = str(raised.value)
    assert names in message and "\n" not in message, message


def _empty_config(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    return str(path)


def _users_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "report.md").write_text("my own notes")
    return folder


def _a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


QUICK = ['data.name="digits"', "model.dim=16", "model.depth=1", "model.heads=2", "train.max_steps=2"]
CLI_CASES = {  # name: (arguments given the test's folder, message, the path that must stay as it was)
    "train: config file missing": (lambda p: ["train", str(p / "nope.toml")], "nope.toml", None),
    "train: config not TOML": (lambda p: ["train", str(_garbage(p / "bad.toml"))], "bad.toml", None),
    "train: --out holds the user's files": (
        lambda p: ["train", _empty_config(p), *QUICK, "--out", str(_users_folder(p)), "--quiet"], "not empty", "mine"),
    "train: --resume of nothing": (
        lambda p: ["train", _empty_config(p), *QUICK, "--resume", "--out", str(p / "none"), "--quiet"], "nothing to resume", "none"),
    "train: --out is a file": (lambda p: ["train", _empty_config(p), *QUICK, "--out", str(_a_file(p)), "--quiet"], "a-file", "a-file"),
    "compress: budget 2": (lambda p: ["compress", "--model", "minilm", "--budget", "2", "--out", str(p / "c")], "budget", "c"),
    "compress: unknown family": (lambda p: ["compress", "--model", "minilm", "--family", "nope", "--out", str(p / "c")], "nope", "c"),
    "compress: --out holds the user's files": (
        lambda p: ["compress", "--model", "minilm", "--out", str(_users_folder(p))], "not empty", "mine"),
    "compress: device tpu": (lambda p: ["compress", "--model", "minilm", "--device", "tpu", "--out", str(p / "c")], "device", "c"),
    "compress: negative fit steps": (
        lambda p: ["compress", "--model", "minilm", "--fit-steps", "-1", "--out", str(p / "c")], "--fit-steps", "c"),
    "compress: lr 0": (lambda p: ["compress", "--model", "minilm", "--lr", "0", "--out", str(p / "c")], "--lr", "c"),
    "compress: recovery batch 0": (
        lambda p: ["compress", "--model", "minilm", "--finetune-batch", "0", "--out", str(p / "c")], "--finetune-batch", "c"),
    "compress: model folder without config": (
        lambda p: ["compress", "--model", str(p), "--out", str(p / "c")], "config.json", "c"),
    "compress: calibrate with uniform allocation": (
        lambda p: ["compress", "--model", "minilm", "--calibrate", "--allocation", "uniform", "--out", str(p / "c")], "--calibrate", "c"),
    "report: not a run": (lambda p: ["report", str(p)], "not found", None),
    "train: an override after --out": (
        lambda p: ["train", _empty_config(p), "--out", str(p / "run"), *QUICK, "train.lr=-1.0"], "train.lr", "run"),
    "train: --out where no folder can be made": (
        lambda p: ["train", _empty_config(p), *QUICK, "--out", "/proc/gblr-run/x", "--quiet"], "gblr-run", None),
    "compress: a damaged config.json": (
        lambda p: ["compress", "--model", str(_garbage(p / "model" / "config.json").parent), "--out", str(p / "c")],
        "cannot be loaded", "c"),
    "train: a tampered checkpoint": (
        lambda p: ["train", _empty_config(p), *QUICK, "--resume", "--out", str(_tampered_run(p)), "--quiet"],
        "field 'position'", "run"),
    "train: a budget no layer can reach": (
        lambda p: ["train", _empty_config(p), *QUICK, 'structure.family="lowrank"', "structure.budget=0.01",
                   "--out", str(p / "run"), "--quiet"], "cannot be lowrank at budget 0.01", "run"),
}


def _tampered_run(p):
    assert main(["train", _empty_config(p), *QUICK, "--out", str(p / "run"), "--quiet"]) == 0
    meta = json.loads((p / "run" / "checkpoint.json").read_text())
    meta["position"] = 10**6
    (p / "run" / "checkpoint.json").write_text(json.dumps(meta))
    return p / "run"


def _contents(path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    arguments, message, kept = CLI_CASES[case]
    arguments = arguments(tmp_path)
    before = _contents(tmp_path / kept) if kept else None
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    if kept:
        assert _contents(tmp_path / kept) == before
