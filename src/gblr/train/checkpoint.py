"""Checkpoints that lose nothing and never run code: every tensor (model, optimizer state, RNG states) in
one safetensors file, every other value (steps, schedules, controller, data position) in JSON. Both are
written to temporary names and renamed, JSON last, so a killed write leaves the previous checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "load_model_state", "CHECKPOINT"]

CHECKPOINT = "checkpoint"


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(directory, model, optimizer, scheduler, meta: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Everything is written from the CPU, so a run saved on a GPU resumes on a CPU and the other way round.
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    optimizer_tensors, optimizer_meta = _split_optimizer(optimizer.state_dict())
    tensors.update({k: v.cpu().contiguous() for k, v in optimizer_tensors.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = dict(meta, optimizer=optimizer_meta, scheduler=scheduler.state_dict())
    tmp_tensors, tmp_meta = directory / f"{CHECKPOINT}.safetensors.tmp", directory / f"{CHECKPOINT}.json.tmp"
    save_file(tensors, str(tmp_tensors))
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_tensors, directory / f"{CHECKPOINT}.safetensors")
    os.replace(tmp_meta, directory / f"{CHECKPOINT}.json")


def read_checkpoint(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON metadata and all tensors of the checkpoint in ``directory``."""
    directory = Path(directory)
    meta_path, tensor_path = directory / f"{CHECKPOINT}.json", directory / f"{CHECKPOINT}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise ValueError(f"no checkpoint in {directory} (expected {meta_path.name} and {tensor_path.name})")
    try:
        return json.loads(meta_path.read_text()), load_file(str(tensor_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise ValueError(f"checkpoint in {directory} is corrupt: {error}") from None


def load_model_state(directory, model, tensors: dict[str, torch.Tensor]) -> None:
    """Load the ``model.*`` tensors of a checkpoint into ``model``; a missing or misshapen one is an error naming it."""
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for key, value in model.state_dict().items():
        if key not in model_state:
            raise ValueError(f"checkpoint in {directory} does not match the model: tensor {key!r} is missing")
        if model_state[key].shape != value.shape:
            raise ValueError(f"checkpoint in {directory} does not match the model: tensor {key!r} has shape "
                             f"{tuple(model_state[key].shape)}, the model {tuple(value.shape)}")
    model.load_state_dict(model_state)


def load_checkpoint(directory, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and the torch RNG; returns the JSON metadata."""
    meta, tensors = read_checkpoint(directory)
    load_model_state(directory, model, tensors)
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta
