"""Training configuration: plain values with defaults, read from TOML, validated with errors that name
the bad field. Overrides use the same dotted names: ``train.lr=3e-3 structure.budget=0.5``."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..device import PRECISIONS
from ..learn import ALLOCATIONS, CONTROLLERS
from ..mask import SIGMA_MAX
from ..structured import FAMILIES
from ..structured.conv import LAYOUTS

__all__ = ["ModelConfig", "DataConfig", "StructureConfig", "TrainConfig", "RunConfig", "load_config", "apply_overrides"]

MODELS = ("vit", "mixer", "gpt", "resnet")
RUNTIME_FIELDS = ("device", "compile", "log_every")
DATASETS = ("fashion_mnist", "mnist5k", "digits", "shakespeare")


@dataclass
class ModelConfig:
    name: str = "vit"
    dim: int = 128  # resnet: channels of the first stage
    depth: int = 4  # resnet: residual blocks per stage
    heads: int = 4
    mlp_ratio: float = 4.0
    patch: int = 4
    context: int = 128  # gpt only


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    val_fraction: float = 0.1
    limit: int = 0  # use only the first N training examples (0 = all); for quick runs


@dataclass
class StructureConfig:
    family: str = "dense"
    budget: float = 1.0  # fraction of the dense cost of the structured layers
    layers: str = "paper"  # "paper": q, k, v and MLPs; "all": every linear layer but the head
    structure_lr: float = 5e-3
    sigma_start: float = 1.0
    sigma_end: float = 100.0
    ramp_start: float = 0.05
    ramp_end: float = 0.5
    rank: int = 1
    tile: int = 1
    conv_layout: str = "matrix"  # convolutions: one structured matrix ("matrix") or one per kernel tap ("taps")
    allocation: str = "global"  # GBLR: one threshold shares the budget between layers ("global"), weighted by their gradients ("sensitivity"), or each layer holds it ("per_layer")
    controller: str = "flops"  # GBLR: the threshold meets the FLOPs budget ("flops") or the paper's fixed threshold on a mean-width target ("mean_width")
    l1: float = 0.0  # the fixed threshold's lambda (controller "mean_width"; with "flops" an extra shrink above the budget)
    dense_execution: bool = False  # Monarch and Pixelfly layers run through their dense weight: the same function, faster on CPU


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    clip: float = 1.0
    seed: int = 0
    max_steps: int = 0  # stop after this many steps (0 = run all epochs)
    eval_batch_size: int = 500
    checkpoint_every: int = 200  # steps; 0 = only the final checkpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun, cuda = this process's GPU)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    log_every: int = 10  # steps between reads of the loss and the structure statistics (each waits for the device)
    init_from: str = ""  # a finished dense run of the same model: its weights, fitted at the budget, start this run


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        m, d, s, t = self.model, self.data, self.structure, self.train
        # In order, each evaluated only when the ones before it hold (model.dim % model.heads needs heads >= 1).
        checks = [
            ("name", lambda: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) is not None,
             "a plain name (letters, digits, '.', '_', '-'; it names the run directory)"),
            ("model.name", lambda: m.name in MODELS, f"one of {MODELS}"),
            ("model.dim", lambda: m.dim >= 1, ">= 1"),
            ("model.heads", lambda: m.heads >= 1, ">= 1"),
            ("model.dim", lambda: m.dim % m.heads == 0, "divisible by model.heads"),
            ("model.depth", lambda: m.depth >= 1, ">= 1"),
            ("model.mlp_ratio", lambda: math.isfinite(m.mlp_ratio) and 0 < m.mlp_ratio <= 64, "in (0, 64]"),
            ("model.patch", lambda: m.patch >= 1, ">= 1"),
            ("model.context", lambda: m.context >= 2, ">= 2"),
            ("data.name", lambda: d.name in DATASETS, f"one of {DATASETS}"),
            ("data.val_fraction", lambda: 0 < d.val_fraction < 1, "in (0, 1)"),
            ("data.limit", lambda: d.limit >= 0, ">= 0 (0 = all)"),
            ("structure.family", lambda: s.family in FAMILIES, f"one of {tuple(FAMILIES)}"),
            ("structure.budget", lambda: 0 < s.budget <= 1, "in (0, 1]"),
            ("structure.layers", lambda: s.layers in ("paper", "all"), "'paper' or 'all'"),
            ("structure.structure_lr", lambda: math.isfinite(s.structure_lr) and s.structure_lr >= 0, "a finite number >= 0"),
            ("structure.sigma_start", lambda: 0 < s.sigma_start <= SIGMA_MAX, f"in (0, {SIGMA_MAX:g}]"),
            ("structure.sigma_end", lambda: 0 < s.sigma_end <= SIGMA_MAX, f"in (0, {SIGMA_MAX:g}]"),
            ("structure.ramp_end", lambda: 0 <= s.ramp_start <= s.ramp_end <= 1,
             "at least structure.ramp_start and at most 1"),
            ("structure.rank", lambda: s.rank >= 1, ">= 1"),
            ("structure.tile", lambda: s.tile >= 1, ">= 1"),
            ("structure.conv_layout", lambda: s.conv_layout in LAYOUTS, f"one of {LAYOUTS}"),
            ("structure.allocation", lambda: s.allocation in ALLOCATIONS, f"one of {ALLOCATIONS}"),
            ("structure.controller", lambda: s.controller in CONTROLLERS, f"one of {CONTROLLERS}"),
            ("structure.l1", lambda: math.isfinite(s.l1) and s.l1 >= 0, "a finite number >= 0"),
            ("structure.l1", lambda: s.controller != "mean_width" or s.l1 > 0, "> 0 with structure.controller 'mean_width'"),
            ("structure.allocation", lambda: s.controller != "mean_width" or s.allocation == "global",
             "'global' with structure.controller 'mean_width'"),
            ("train.epochs", lambda: t.epochs >= 1, ">= 1"),
            ("train.batch_size", lambda: t.batch_size >= 1, ">= 1"),
            ("train.lr", lambda: math.isfinite(t.lr) and t.lr > 0, "a finite number > 0"),
            ("train.weight_decay", lambda: math.isfinite(t.weight_decay) and t.weight_decay >= 0, "a finite number >= 0"),
            ("train.warmup", lambda: 0 <= t.warmup < 1, "in [0, 1)"),
            ("train.clip", lambda: t.clip > 0, "> 0 (the largest gradient norm; inf = no clipping)"),
            ("train.seed", lambda: t.seed >= 0, ">= 0"),
            ("train.max_steps", lambda: t.max_steps >= 0, ">= 0 (0 = all epochs)"),
            ("train.eval_batch_size", lambda: t.eval_batch_size >= 1, ">= 1"),
            ("train.checkpoint_every", lambda: t.checkpoint_every >= 0, ">= 0 (0 = only the final checkpoint)"),
            ("train.precision", lambda: t.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("train.log_every", lambda: t.log_every >= 1, ">= 1"),
        ]
        for name, ok, expected in checks:
            if not ok():
                raise ValueError(f"config field '{name}' must be {expected}, got {_get(self, name)!r}")
        if t.init_from and s.family == "dense":
            raise ValueError("config field 'train.init_from' needs a structured family (structure.family is 'dense')")
        if t.init_from and s.family == "gblr" and (s.rank, s.tile) != (1, 1):
            raise ValueError("config field 'train.init_from': fitting GBLR to dense weights gives rank-1 free "
                             f"structure; structure.rank and structure.tile must be 1, got {s.rank} and {s.tile}")
        if (self.model.name == "gpt") != (self.data.name == "shakespeare"):  # text needs the GPT, images the others
            raise ValueError(f"config field 'model.name' {self.model.name!r} does not fit data.name {self.data.name!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def what_is_learned(self) -> dict:
        """The config without the fields that only say where and how fast it runs (a run may resume on
        another device, compiled or not, logging at another interval)."""
        values = self.to_dict()
        values["train"] = {k: v for k, v in values["train"].items() if k not in RUNTIME_FIELDS}
        return values


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ValueError(f"config field '{prefix.rstrip('.')}' must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ValueError(f"config field '{name}' is unknown; known fields: {', '.join(known)}")
        default = known[key].default_factory() if known[key].default_factory is not dataclasses.MISSING else known[key].default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{name}.")
            continue
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected:
            raise ValueError(f"config field '{name}' must be a {expected.__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings: model.name=gpt


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` overrides (TOML values) to a raw config dict."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like section.field=value")
        key, text = override.split("=", 1)
        table = values
        *parents, last = key.strip().split(".")
        for depth, part in enumerate(parents):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ValueError(f"override {override!r}: config field '{'.'.join(parents[: depth + 1])}' is not a table")
        table[last] = _parse_value(text.strip())
    return values


def load_config(path=None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or the defaults when ``path`` is None), apply overrides and validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {path} is not valid TOML: {error}") from None
    values = apply_overrides(values, overrides or [])
    return _build(RunConfig, values, "").validate()
