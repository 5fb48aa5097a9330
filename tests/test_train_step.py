import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gblr.cli import main
from gblr.convert import ConvertConfig, convert_
from gblr.learn import SigmaSchedule, StructureLearner
from gblr.models import ViT, paper_filter
from gblr.profiling import count_ops
from gblr.train import load_config, train
from gblr.train.checkpoint import read_checkpoint
from gblr.step import make_optimizer, training_step
from run_helpers import kill_after_first_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has no GPU)")


def vit_step(family, device="cpu", batch=32, precision="fp32"):
    """The trainer's step on the small Fashion-MNIST ViT; GBLR starts at full cost with a 0.3 budget."""
    torch.manual_seed(0)
    model = ViT(28, 4, 1, 10, dim=128, depth=4, heads=4)
    if family == "gblr":
        convert_(model, ConvertConfig("gblr", 1.0, init="random"), paper_filter)
    model.to(device)
    optimizer = make_optimizer(model, 1e-3, 0.05, 5e-3)
    learner = None
    if family == "gblr":
        learner = StructureLearner(model, optimizer, 0.3, 100, ramp=(0.05, 0.5), sigma=SigmaSchedule(1.0, 100.0, 0, 80))
    x, y = torch.randn(batch, 28, 28, device=device), torch.randint(0, 10, (batch,), device=device)
    parameters = list(model.parameters())

    def step():
        return training_step(lambda: F.cross_entropy(model(x), y), optimizer, None, learner, parameters, 1.0,
                             torch.device(device), precision)

    return step, learner


def test_gblr_step_dispatches_at_most_twice_the_dense_operations():
    # A GPU step is launch-bound when it dispatches many small operations; the count is the same on
    # every device. Pins the batched masks, the batched products and the on-device controller.
    dense_step, _ = vit_step("dense")
    gblr_step, learner = vit_step("gblr")
    for _ in range(2):
        dense_step(), gblr_step()
    dense = count_ops(dense_step).total
    ramp = count_ops(gblr_step).total
    learner.step_count = 60  # the holding phase runs the controller twice per step
    gblr_step()
    holding = count_ops(gblr_step).total
    assert max(ramp, holding) <= 2.0 * dense, (dense, ramp, holding)
    assert count_ops(learner.step).total <= 200


@pytest.mark.slow
def test_controller_cost_matches_the_layers_and_stays_within_budget():
    step, learner = vit_step("gblr", batch=8)
    for _ in range(60):
        _, stats = step()
        budget = stats["budget_fraction"]
        assert float(stats["cost_fraction"]) == pytest.approx(learner.cost_fraction(), abs=1e-12)
        assert learner.cost_fraction() <= budget + 1e-12
    assert learner.cost_fraction() == pytest.approx(0.3, rel=0.02)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_step_never_waits_for_the_host(precision):
    for family in ("dense", "gblr"):
        step, learner = vit_step(family, "cuda", precision=precision)
        for _ in range(3):  # warm-up: the learner reads the starting cost once and builds its constants
            step()
        if learner is not None:
            learner.step_count = 60
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


TINY = ['data.name="digits"', "model.dim=32", "model.depth=2", "model.heads=2", "train.batch_size=64",
        'structure.family="gblr"', "structure.budget=0.4"]


@pytest.mark.parametrize(
    "override, message",
    [
        ('train.device="tpu"', "device must be"),
        ('train.device="cuda:99"', "cuda"),
        ('train.precision="fp16"', "train.precision"),
        ("train.log_every=0", "train.log_every"),
        ("model.heads=0", "model.heads"),
        ("model.patch=0", "model.patch"),
        ("model.dim=-4", "model.dim"),
        ("structure.rank=0", "structure.rank"),
        ("structure.tile=0", "structure.tile"),
        ('structure.controller="pid"', "structure.controller"),
        ('structure.controller="mean_width"', "structure.l1"),
        ('structure.allocation="evenly"', "structure.allocation"),
        ("structure.sigma_end=1e200", "structure.sigma_end"),
        ("train.eval_batch_size=0", "train.eval_batch_size"),
        ("train.clip=-1.0", "train.clip"),
        ("train.lr=nan", "train.lr"),
        ("data.limit=-100", "data.limit"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
        ('name="../../escape"', "'name'"),
        ("train.batch_size.x=1", "train.batch_size"),
    ],
)
def test_bad_run_settings_are_a_one_line_error_before_anything_is_written(override, message, tmp_path, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    out = tmp_path / "run"
    assert main(["train", str(empty), *TINY, override, "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no usable CUDA GPU"):
        train(load_config(None, TINY + ['train.device="cuda"']), "unused", progress=False)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    config = load_config(None, TINY + ["train.max_steps=20", 'train.precision="bf16"', "train.log_every=5"])
    report = train(config, tmp_path, progress=False)
    assert report["test"]["accuracy"] > 0.2


def _train_command(tmp_path, out, *extra):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    # Fashion-MNIST (a GPU machine may lack scikit-learn's digits), a slice of it.
    settings = TINY + ['data.name="fashion_mnist"', "data.limit=3000", "train.epochs=20", "train.max_steps=150",
                       "train.checkpoint_every=20"]
    return [sys.executable, "-m", "gblr.cli", "train", str(empty), *settings, *extra, "--out", str(out), "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("cpu", "auto")] + [
    pytest.param("cuda", "cpu", marks=needs_cuda), pytest.param("cpu", "cuda", marks=needs_cuda)])
def test_resume_on_another_device(first, then, tmp_path):
    out = tmp_path / "run"
    killed_at = kill_after_first_checkpoint(_train_command(tmp_path, out, f'train.device="{first}"'), out, timeout=300)
    assert killed_at < 150, "the run finished before it could be killed"
    subprocess.run(_train_command(tmp_path, out, f'train.device="{then}"', "--resume"), check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 150
    assert report["test"]["accuracy"] > 0.3  # it learned (chance is 0.1) after resuming


@pytest.mark.slow
def test_compiled_training_run(tmp_path):
    config = load_config(None, TINY + ["train.max_steps=4", "train.compile=true", "model.depth=1"])
    report = train(config, tmp_path, progress=False)
    assert report["structured_fraction"] <= 1.0 and (tmp_path / "checkpoint.json").exists()


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from gblr.train import trainer

    calls = {"n": 0}
    real_loss = trainer._loss

    def loss_that_diverges(model, x, y):
        calls["n"] += 1
        loss = real_loss(model, x, y)
        return loss * float("nan") if calls["n"] > 7 else loss

    monkeypatch.setattr(trainer, "_loss", loss_that_diverges)
    config = load_config(None, TINY + ["train.max_steps=20", "train.checkpoint_every=5", "train.log_every=1"])
    with pytest.raises(trainer.TrainingDiverged, match="diverged at step 8"):
        train(config, tmp_path, progress=False)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["step"] == 5
    assert all(torch.isfinite(t).all() for t in read_checkpoint(tmp_path)[1].values()
               if t.is_floating_point())
    # the command line gives a diverged run its own exit status, so that callers need not parse the message
    from gblr.cli import EXIT_DIVERGED, main

    calls["n"] = 0
    (tmp_path / "empty.toml").write_text("")
    status = main(["train", str(tmp_path / "empty.toml"), *TINY, "train.max_steps=20", "train.log_every=1",
                   "--out", str(tmp_path / "cli"), "--quiet"])
    assert status == EXIT_DIVERGED and "gblr train: training diverged at step 8" in capsys.readouterr().err
