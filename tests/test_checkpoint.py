"""A checkpoint save interrupted between any two of its file operations leaves a checkpoint that reads
back exactly as the previous or the new one, never a mixture; damaged files are refused."""

import json

import pytest
import torch
from torch import nn

from gblr.train import checkpoint, load_config, train
from gblr.train.checkpoint import read_checkpoint, save_checkpoint


class Interrupted(Exception):
    """Stands for the process being killed."""


def count_operations(monkeypatch, fail_at: int | None) -> list[str]:
    """Record the save's file operations; raise before the ``fail_at``-th (0-based)."""
    done: list[str] = []
    for name in ("_write_bytes", "_replace", "_remove"):
        real = getattr(checkpoint, name)

        def operation(*args, real=real, name=name):
            if fail_at is not None and len(done) == fail_at:
                raise Interrupted
            done.append(name)
            return real(*args)

        monkeypatch.setattr(checkpoint, name, operation)
    return done


def state(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def snapshot(directory):
    meta, tensors = read_checkpoint(directory)
    return meta["step"], {k: v.clone() for k, v in tensors.items() if k.startswith("model.")}


def test_an_interrupted_save_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch):
    old, new = state(0), state(1)
    with monkeypatch.context() as patch:
        operations = count_operations(patch, None)
        save_checkpoint(tmp_path / "probe", *old, {"step": 1})
        save_checkpoint(tmp_path / "probe", *new, {"step": 2})
    assert len(operations) == 2 * 5  # per save: tensors, JSON, commit, the two other tensor names removed
    for fail_at in range(6):  # before each operation of the second save, and after the last
        directory = tmp_path / f"stop-{fail_at}"
        save_checkpoint(directory, *old, {"step": 1})
        expected_old = snapshot(directory)
        with monkeypatch.context() as patch:
            count_operations(patch, fail_at)
            try:
                save_checkpoint(directory, *new, {"step": 2})
            except Interrupted:
                pass
        step, tensors = snapshot(directory)
        expected_step, expected = (1, expected_old[1]) if fail_at <= 2 else (2, {f"model.{k}": v for k, v in new[0].state_dict().items()})
        assert step == expected_step, fail_at
        assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
        save_checkpoint(directory, *new, {"step": 3})  # and the next save works
        assert snapshot(directory)[0] == 3
        assert sorted(f.name for f in directory.iterdir()) in (
            ["checkpoint.a.safetensors", "checkpoint.json"], ["checkpoint.b.safetensors", "checkpoint.json"])


def test_damaged_or_mismatched_tensors_are_refused(tmp_path):
    save_checkpoint(tmp_path, *state(0), {"step": 4})
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    tensors = tmp_path / meta["tensors"]["file"]
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the digest"):
        read_checkpoint(tmp_path)
    save_checkpoint(tmp_path, *state(0), {"step": 4})
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta["step"] = 5  # a JSON from another save, with a digest that matches
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds step 4"):
        read_checkpoint(tmp_path)
    meta["tensors"]["file"] = "../elsewhere.safetensors"
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="field 'tensors'"):
        read_checkpoint(tmp_path)
    absent = next(n for n in ("checkpoint.a.safetensors", "checkpoint.b.safetensors") if not (tmp_path / n).exists())
    meta["tensors"]["file"], meta["step"] = absent, 4
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is missing"):
        read_checkpoint(tmp_path)


TINY = ['data.name="digits"', "model.dim=16", "model.depth=1", "model.heads=2", "train.batch_size=64",
        'structure.family="gblr"', "structure.budget=0.5", "train.max_steps=12", "train.checkpoint_every=4"]


@pytest.mark.parametrize("fail_at", range(5))  # before each of the five file operations
def test_a_run_interrupted_while_saving_resumes_bit_exact(tmp_path, monkeypatch, fail_at):
    config = load_config(None, TINY)
    train(config, tmp_path / "whole", progress=False)
    saves = {"n": 0}
    real_save = checkpoint.save_checkpoint

    def second_save_interrupted(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] != 2:
            return real_save(*args, **kwargs)
        with monkeypatch.context() as patch:
            count_operations(patch, fail_at)
            real_save(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("gblr.train.trainer.save_checkpoint", second_save_interrupted)
        with pytest.raises(Interrupted):
            train(config, tmp_path / "cut", progress=False)
    train(config, tmp_path / "cut", resume=True, progress=False)
    whole, cut = read_checkpoint(tmp_path / "whole")[1], read_checkpoint(tmp_path / "cut")[1]
    model_keys = [k for k in whole if k.startswith("model.")]
    assert model_keys and all(torch.equal(whole[k], cut[k]) for k in model_keys)
