"""The ResNet recipe and fine-tuning a finished dense run into a structured one (train.init_from / --init-from)."""

import hashlib

import pytest
import torch

from gblr.cli import main
from gblr.structured import StructuredConv2d
from gblr.train import load_config, load_trained, train

VIT = ['data.name="digits"', "model.dim=32", "model.depth=2", "model.heads=2", "train.batch_size=64", "train.lr=3e-3"]
RESNET = ['data.name="digits"', 'model.name="resnet"', "model.dim=8", "model.depth=1", "train.batch_size=64",
          "train.lr=3e-3"]


def _digests(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    train(load_config(None, VIT + ["train.epochs=6"]), out, progress=False)
    return out


@pytest.mark.parametrize("family", ["gblr", "lowrank"])
def test_fine_tuning_from_dense_holds_the_budget_and_leaves_the_source_alone(family, dense_run, tmp_path):
    before = _digests(dense_run)
    overrides = VIT + [f'structure.family="{family}"', "structure.budget=0.3", "train.max_steps=20",
                       f'train.init_from="{dense_run}"']
    report = train(load_config(None, overrides), tmp_path / "ft", progress=False)
    assert report["structured_fraction"] <= 0.3
    if family == "gblr":  # the learner holds it (low-rank's cost moves in steps of a whole rank)
        assert report["structured_fraction"] >= 0.3 * 0.97
    assert report["conversion"]["replaced"][0]["relative_error"] is not None  # fitted, not random
    assert report["test"]["accuracy"] > 0.5  # started from a trained model: far above chance after 20 steps
    assert _digests(dense_run) == before
    # the run comes back (and resumes) without the source run: its structure is in the checkpoint
    model, config, data = load_trained(tmp_path / "ft")
    x, y = data["test"]
    with torch.no_grad():
        assert float((model(x).argmax(-1) == y).float().mean()) == pytest.approx(report["test"]["accuracy"])


def test_init_from_errors_are_one_line_and_write_nothing(dense_run, tmp_path, capsys):
    structured = tmp_path / "structured"
    train(load_config(None, VIT + ['structure.family="lowrank"', "structure.budget=0.5", "train.max_steps=3"]),
          structured, progress=False)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    cases = [
        ([], unfinished, "is not a finished run"),
        ([], structured, "is a lowrank run; it must be a dense run"),
        (["model.dim=64"], dense_run, "was trained with model.dim=32, this config has 64"),
        (['data.name="mnist5k"'], dense_run, "was trained with data.name='digits'"),
    ]
    before = _digests(dense_run)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for extra, source, message in cases:
        out = tmp_path / "out"
        argv = ["train", str(empty), *VIT, 'structure.family="gblr"', "structure.budget=0.3", *extra,
                "--init-from", str(source), "--out", str(out), "--quiet"]
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error, error
        assert not out.exists()
    assert _digests(dense_run) == before
    with pytest.raises(ValueError, match="needs a structured family"):
        load_config(None, VIT + [f'train.init_from="{dense_run}"'])
    with pytest.raises(ValueError, match="structure.rank and structure.tile must be 1"):
        load_config(None, VIT + ['structure.family="gblr"', "structure.tile=4", f'train.init_from="{dense_run}"'])


@pytest.mark.parametrize("layout", ["matrix", "taps"])
def test_resnet_recipe_structures_the_block_convolutions_at_the_budget(layout, tmp_path):
    overrides = RESNET + ['structure.family="gblr"', "structure.budget=0.5", f'structure.conv_layout="{layout}"',
                          "train.max_steps=30"]
    report = train(load_config(None, overrides), tmp_path, progress=False)
    # the budget is a share of the convolutions' FLOPs, which see different numbers of output pixels
    assert 0.5 * 0.97 <= report["structured_fraction"] <= 0.5
    assert {layer["name"].split(".linears")[0] for layer in report["layers"]} == {
        f"blocks.{i}.conv{j}" for i in range(3) for j in (1, 2)}
    model, _, data = load_trained(tmp_path)
    assert isinstance(model.blocks[0].conv1, StructuredConv2d) and model.blocks[0].conv1.layout == layout
    x, y = data["test"]
    with torch.no_grad():
        assert float((model(x).argmax(-1) == y).float().mean()) == pytest.approx(report["test"]["accuracy"])
