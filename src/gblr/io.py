"""Saving and loading converted models without pickle: safetensors for tensors, JSON for structure.

A saved directory holds ``structure.json`` (format version, every structured layer's family, shape and
constructor options, the geometry of structured convolutions, the conversion config, the base model's
identity) and ``model.safetensors`` (the whole state dict; tied tensors are stored once). GBLR factors
are stored packed: only the entries inside each component's eval mask (``name.out_factors.packed``,
``name.in_factors.packed``), so a compressed model's file holds about its effective parameters instead
of full-length factors (which, for a finely tiled layer, outnumber the dense weight); after loading, the
entries outside are zero and the eval-mode function is the saved one exactly.

Loading rebuilds each structured layer from the JSON, puts it into the base model and loads the tensors
strictly, so a missing, extra or misshapen tensor is an error naming it. Nothing in either file can
execute code. Files are written to temporary names and renamed, and an existing save is never
overwritten unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .convert import linear_weight
from .structured import FAMILIES, GBLRLinear, StructuredConv2d, StructuredLinear
from .structured.conv import LAYOUTS, conv_geometry, conv_unsupported

__all__ = ["save", "load", "read_structure", "structure_of", "check_structure", "rebuild", "FORMAT"]

FORMAT = "gblr-structured/2"
READABLE = ("gblr-structured/1", FORMAT)  # /1: full-length GBLR factors
PACKED = ".packed"  # suffix of a packed GBLR factor tensor
STRUCTURE_FILE = "structure.json"
TENSOR_FILE = "model.safetensors"


def save(model: nn.Module, directory, config: dict | None = None, base_model: str | None = None,
         overwrite: bool = False) -> Path:
    """Write ``model``'s structured layers and state to ``directory`` (created if needed): the layers'
    families and shapes in ``structure.json``, every tensor in safetensors (nothing is pickled). Example::

        gblr.save(model, "out/compressed", config={"budget": 0.5})
        model = gblr.load("out/compressed", make_base_model())   # the same architecture, unconverted
    """
    directory = Path(directory)
    if (directory / STRUCTURE_FILE).exists() and not overwrite:
        raise FileExistsError(f"{directory} already holds a saved model; pass overwrite=True to replace it")
    tensors = _stored_once(model.state_dict())
    packed = []
    for name, module in model.named_modules():
        if isinstance(module, GBLRLinear):
            packed.append(name)
            for key, values in module.packed_factors().items():
                del tensors[_key(name, key)]
                tensors[_key(name, key) + PACKED] = values.contiguous()
    structure = {"format": FORMAT, "base_model": base_model, "config": config or {}, **structure_of(model),
                 "packed": packed}
    directory.mkdir(parents=True, exist_ok=True)
    tensors_tmp = directory / (TENSOR_FILE + ".tmp")
    structure_tmp = directory / (STRUCTURE_FILE + ".tmp")
    save_file(tensors, str(tensors_tmp))
    structure_tmp.write_text(json.dumps(structure, indent=2) + "\n")
    os.replace(tensors_tmp, directory / TENSOR_FILE)
    os.replace(structure_tmp, directory / STRUCTURE_FILE)  # last: its presence marks a complete save
    return directory


def _key(module: str, tensor: str) -> str:
    return f"{module}.{tensor}" if module else tensor


def _stored_once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tied tensor kept under one name (the loader accepts the others as aliases);
    every tensor contiguous and owning its memory where it shared it otherwise."""
    kept, seen = {}, {}
    for key in sorted(state):
        tensor = state[key]
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if view in seen:
            continue
        seen[view] = key
        shares = any(t.untyped_storage().data_ptr() == view[0] for t in kept.values())
        kept[key] = tensor.detach().clone() if shares or not tensor.is_contiguous() else tensor.detach()
    return kept


def structure_of(model: nn.Module) -> dict:
    """``{"layers": ..., "convolutions": ...}``: every structured layer's family, shape and constructor
    options, and every structured convolution's geometry (what :func:`rebuild` needs)."""
    layers, convolutions = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, StructuredConv2d):
            convolutions[name] = module.geometry()
        if isinstance(module, StructuredLinear):
            if type(module).family not in FAMILIES or type(module) is not FAMILIES[type(module).family]:
                raise ValueError(f"layer {name!r} ({type(module).__name__}) cannot be saved; save the model before compact()")
            layers[name] = {
                "family": module.family,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": getattr(module, "bias", None) is not None,
                "options": module.constructor_options(),
            }
    return {"layers": layers, "convolutions": convolutions}


def read_structure(directory) -> dict:
    """The validated ``structure.json`` of a saved directory (``convolutions`` is ``{}`` in saves that
    have none)."""
    path = Path(directory) / STRUCTURE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a directory written by gblr.io.save")
    try:
        structure = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(structure, dict) or structure.get("format") not in READABLE:
        raise ValueError(f"{path}: field 'format' must be one of {READABLE}, got "
                         f"{structure.get('format') if isinstance(structure, dict) else structure!r}")
    structure = check_structure(structure, path)
    packed = structure.setdefault("packed", [])
    if not isinstance(packed, list) or any(not isinstance(n, str) or structure["layers"].get(n, {}).get("family") != "gblr"
                                           for n in packed):
        raise ValueError(f"{path}: field 'packed' must list GBLR layers of field 'layers'")
    return structure


def check_structure(structure: dict, path) -> dict:
    """``structure`` (as :func:`structure_of` writes it) with its fields checked; errors name ``path``."""
    layers = structure.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: field 'layers' must be an object")
    for name, spec in layers.items():
        for key, kind in (("family", str), ("in_features", int), ("out_features", int), ("bias", bool), ("options", dict)):
            if not isinstance(spec, dict) or not isinstance(spec.get(key), kind):
                raise ValueError(f"{path}: field 'layers.{name}.{key}' must be a {kind.__name__}")
        if spec["family"] not in FAMILIES:
            raise ValueError(f"{path}: field 'layers.{name}.family' is {spec['family']!r}; known families: {', '.join(FAMILIES)}")
    convolutions = structure.setdefault("convolutions", {})
    if not isinstance(convolutions, dict):
        raise ValueError(f"{path}: field 'convolutions' must be an object")
    for name, geometry in convolutions.items():
        for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
            value = geometry.get(key) if isinstance(geometry, dict) else None
            pair = isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
            if not (pair if key not in ("in_channels", "out_channels") else type(value) is int):
                raise ValueError(f"{path}: field 'convolutions.{name}.{key}' must be "
                                 f"{'two integers' if key not in ('in_channels', 'out_channels') else 'an integer'}")
        if geometry.get("layout") not in LAYOUTS:
            raise ValueError(f"{path}: field 'convolutions.{name}.layout' must be one of {LAYOUTS}")
    return structure


def _conv_layer_shapes(geometry: dict) -> list[tuple[int, int]]:
    """(in, out) of each structured layer a saved convolution is made of."""
    taps = geometry["kernel_size"][0] * geometry["kernel_size"][1]
    if geometry["layout"] == "matrix":
        return [(geometry["in_channels"] * taps, geometry["out_channels"])]
    return [(geometry["in_channels"], geometry["out_channels"])] * taps


def load(directory, base_model: nn.Module) -> nn.Module:
    """Rebuild the saved structured layers (and structured convolutions) inside ``base_model`` (the
    unconverted model, or one of the same architecture) and load all tensors; returns ``base_model``,
    modified in place. Every saved layer is checked against the base model's before any is built (see
    :func:`save` for an example)."""
    directory = Path(directory)
    structure = read_structure(directory)
    rebuild(base_model, structure, directory / STRUCTURE_FILE)
    path = directory / TENSOR_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read as safetensors: {error}") from None
    state = base_model.state_dict()
    factors = {_key(name, key) for name in structure["packed"] for key in ("out_factors", "in_factors")}
    expected = [k for k in state if k not in factors] + [k + PACKED for k in factors]
    missing = [k for k in expected if k not in tensors and not (k in state and _is_shared_alias(k, state, tensors))]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in tensors.items():
        if key in state and tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(state[key].shape)}")
    base_model.load_state_dict({k: v for k, v in tensors.items() if k in state}, strict=False)
    for name in structure["packed"]:  # after the widths, starts and sigma they are packed by
        try:
            base_model.get_submodule(name).unpack_factors_(tensors[_key(name, "out_factors") + PACKED],
                                                           tensors[_key(name, "in_factors") + PACKED])
        except ValueError as error:
            raise ValueError(f"{path}: layer {name!r}: {error}") from None
    return base_model


def rebuild(base_model: nn.Module, structure: dict, where) -> None:
    """Put freshly built structured layers and convolutions, as ``structure`` describes them (checked by
    :func:`check_structure`), into ``base_model`` in place of its layers; their tensors are still to be
    loaded. Every layer is checked against the base model's before any is built; errors name ``where``."""
    layers = structure["layers"]

    def current(name: str) -> nn.Module:
        try:
            return base_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: layer {name!r} does not exist in the base model") from None

    # Every layer is checked against the base model before any is built.
    parts: dict[str, list[str]] = {}  # convolution -> the names of its structured layers
    expected: dict[str, tuple] = {}  # layer -> (in, out) it must have
    targets: dict[str, nn.Module] = {}  # the module each new layer or convolution replaces
    for name, geometry in structure["convolutions"].items():
        conv = targets[name] = current(name)
        found = conv_geometry(conv) if isinstance(conv, nn.Conv2d) and conv_unsupported(conv) is None else type(conv).__name__
        wanted = {k: v for k, v in geometry.items() if k != "layout"}
        if found != wanted:
            raise ValueError(f"{where}: convolution {name!r} is saved as {wanted}, the base model's is {found}")
        parts[name] = [f"{name}.linears.{i}" for i in range(len(_conv_layer_shapes(geometry)))]
        for part, shape in zip(parts[name], _conv_layer_shapes(geometry)):
            if part not in layers:
                raise ValueError(f"{where}: layer {part!r} of convolution {name!r} is missing")
            expected[part], targets[part] = shape, conv
    for name, spec in layers.items():
        if name not in expected:
            targets[name] = current(name)
            expected[name] = _features(targets[name])
        if expected[name] != (spec["in_features"], spec["out_features"]):
            shape = expected[name]
            raise ValueError(f"{where}: layer {name!r} is saved as {spec['in_features']}->{spec['out_features']}, "
                             f"the base model's is {shape[0]}->{shape[1]}")
    built = {}
    for name, spec in layers.items():
        reference = next(iter(targets[name].parameters()), None)
        factory = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
        try:
            built[name] = FAMILIES[spec["family"]].to_be_overwritten(
                spec["in_features"], spec["out_features"], bias=spec["bias"], **spec["options"], **factory
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: layer {name!r} cannot be rebuilt: {error}") from None
        built[name].train(targets[name].training)  # an eval-mode model stays in eval mode
    for name, geometry in structure["convolutions"].items():
        try:
            conv = StructuredConv2d(**geometry, linears=[built.pop(part) for part in parts[name]])
        except ValueError as error:
            raise ValueError(f"{where}: convolution {name!r} cannot be rebuilt: {error}") from None
        conv.train(targets[name].training)
        base_model.set_submodule(name, conv)
    for name, layer in built.items():
        base_model.set_submodule(name, layer)


def _features(module: nn.Module) -> tuple[int | None, int | None]:
    """(in, out) of a linear, Conv1D or structured layer; (None, None) for anything else."""
    if isinstance(module, (StructuredLinear, nn.Linear)):
        return module.in_features, module.out_features
    weight = linear_weight(module)
    return (None, None) if weight is None else (weight.shape[1], weight.shape[0])


def _is_shared_alias(key: str, state: dict, tensors: dict) -> bool:
    """safetensors stores tied tensors once: ``key`` is fine if it shares storage with a stored one."""
    ptr = state[key].untyped_storage().data_ptr()
    return any(state[k].untyped_storage().data_ptr() == ptr for k in tensors if k in state)
