"""Checkpoints that lose nothing, never run code and are committed in one step: every tensor (model,
optimizer state, RNG states) in one safetensors file, every other value (steps, schedules, controller,
data position) in ``checkpoint.json``, which also names the tensor file and holds its SHA-256 digest.

A save writes the tensors to whichever of two file names the current JSON does not reference, then the
new JSON under a temporary name, and renames it over ``checkpoint.json``: that rename is the commit. A
save killed before it leaves the previous checkpoint as it was; after it, the new one is complete.
Reading checks the digest and the step stored in both files, so a damaged or mismatched tensor file is
refused rather than resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "load_model_state", "CHECKPOINT"]

CHECKPOINT = "checkpoint"
TENSOR_FILES = (f"{CHECKPOINT}.a.safetensors", f"{CHECKPOINT}.b.safetensors")
LEGACY_TENSOR_FILE = f"{CHECKPOINT}.safetensors"  # written before digests existed; read without one


# The file operations of a save, one function each (a test interrupts a save between any two of them).
def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _replace(source: Path, target: Path) -> None:
    os.replace(source, target)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _referenced_tensor_file(directory: Path) -> str | None:
    try:
        return json.loads((directory / f"{CHECKPOINT}.json").read_text())["tensors"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_checkpoint(directory, model, optimizer, scheduler, meta: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Everything is written from the CPU, so a run saved on a GPU resumes on a CPU and the other way round.
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    optimizer_tensors, optimizer_meta = _split_optimizer(optimizer.state_dict())
    tensors.update({k: v.cpu().contiguous() for k, v in optimizer_tensors.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    data = save(tensors, metadata={"step": str(meta["step"])})
    new = TENSOR_FILES[1] if _referenced_tensor_file(directory) == TENSOR_FILES[0] else TENSOR_FILES[0]
    meta = dict(meta, optimizer=optimizer_meta, scheduler=scheduler.state_dict(),
                tensors={"file": new, "sha256": hashlib.sha256(data).hexdigest()})
    _write_bytes(directory / new, data)  # not referenced yet: a partial file is harmless
    _write_bytes(directory / f"{CHECKPOINT}.json.tmp", json.dumps(meta, indent=1).encode())
    _replace(directory / f"{CHECKPOINT}.json.tmp", directory / f"{CHECKPOINT}.json")  # the commit
    for stale in sorted({*TENSOR_FILES, LEGACY_TENSOR_FILE} - {new}):
        _remove(directory / stale)


def read_checkpoint(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON metadata and all tensors of the checkpoint in ``directory``, checked against each other."""
    directory = Path(directory)
    meta_path = directory / f"{CHECKPOINT}.json"
    if not meta_path.is_file():
        raise ValueError(f"no checkpoint in {directory} (expected {meta_path.name})")
    corrupt = f"checkpoint in {directory} is corrupt"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{corrupt}: {meta_path.name}: {error}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{corrupt}: {meta_path.name} does not hold a JSON object")
    record = meta.get("tensors")
    if record is None:
        name, digest = LEGACY_TENSOR_FILE, None
    elif isinstance(record, dict) and record.get("file") in TENSOR_FILES and isinstance(record.get("sha256"), str):
        name, digest = record["file"], record["sha256"]
    else:
        raise ValueError(f"{corrupt}: field 'tensors' must name one of {TENSOR_FILES} and its sha256")
    try:
        data = (directory / name).read_bytes()
    except OSError:
        raise ValueError(f"{corrupt}: {name} is missing") from None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{corrupt}: {name} does not match the digest in {meta_path.name}")
    try:
        tensors, stored_step = load(data), _stored_step(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{corrupt}: {name}: {error}") from None
    if digest is not None and stored_step != str(meta.get("step")):
        raise ValueError(f"{corrupt}: {name} holds step {stored_step}, {meta_path.name} step {meta.get('step')}")
    return meta, tensors


def _stored_step(data: bytes) -> str | None:
    """The step in a safetensors file's header metadata (its first 8 bytes give the header's length)."""
    length = int.from_bytes(data[:8], "little")
    if not 0 < length <= len(data) - 8:
        raise ValueError("the header is damaged")
    return (json.loads(data[8 : 8 + length]).get("__metadata__") or {}).get("step")


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


def load_checkpoint(directory, model, optimizer, scheduler, checkpoint: tuple | None = None) -> dict:
    """Restore model, optimizer, scheduler and the torch RNG; returns the JSON metadata. ``checkpoint``:
    what :func:`read_checkpoint` already returned for ``directory`` (else it is read now)."""
    meta, tensors = checkpoint if checkpoint is not None else read_checkpoint(directory)
    load_model_state(directory, model, tensors)
    try:
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
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:  # a tampered JSON
        raise ValueError(f"checkpoint in {directory} is corrupt: optimizer, scheduler or RNG state: {error!r}") from None
    return meta
