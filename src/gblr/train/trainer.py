"""The training loop, top to bottom: data, model, structured layers, optimizer and schedule, the structure
learner every step, evaluation every epoch, checkpoints, TensorBoard, and a final report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import ConvertConfig, convert_
from ..cost import cost_report
from ..device import autocast, check_precision, resolve_device
from ..data import CharTokenizer, load_digits, load_fashion_mnist, load_mnist5k, load_shakespeare, train_val_split
from ..learn import SigmaSchedule, StructureLearner, gblr_layers
from ..io import check_structure, rebuild, structure_of
from ..models import GPT, MLPMixer, ResNet, ViT, paper_filter
from ..step import make_optimizer, training_step
from ..structured import StructuredLinear
from .checkpoint import load_checkpoint, load_model_state, read_checkpoint, save_checkpoint
from .config import RunConfig, _build
from .pictures import save_structure_pictures

__all__ = ["TrainingDiverged", "train", "build_model", "load_data", "load_trained"]


class TrainingDiverged(FloatingPointError):
    """Training stopped on a non-finite loss or parameter; the last good checkpoint is kept."""


# --- data ----------------------------------------------------------------------------------------
def _normalise(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 255.0
    return (x - 0.5) / 0.5


def load_data(config: RunConfig) -> dict:
    """Tensors for the run: images (train/val/test) or token streams (train/val) and the tokenizer."""
    name = config.data.name
    if name == "shakespeare":
        train_text, val_text = load_shakespeare("train"), load_shakespeare("val")
        tokenizer = CharTokenizer(train_text + val_text)
        val = tokenizer.encode(val_text)
        # No separate test text: the report's "test" metric is the validation split.
        return {"train": tokenizer.encode(train_text), "val": val, "test": val, "vocab": len(tokenizer)}
    if name == "fashion_mnist":
        images, labels = load_fashion_mnist("train")
        test = load_fashion_mnist("test")
    else:
        images, labels = load_mnist5k() if name == "mnist5k" else load_digits()
        test = None
    train_idx, val_idx = train_val_split(len(labels), config.data.val_fraction, seed=0)
    if config.data.limit:
        train_idx = train_idx[: config.data.limit]
    data = {
        "train": (_normalise(images[train_idx]), labels[train_idx]),
        "val": (_normalise(images[val_idx]), labels[val_idx]),
        "image_size": images.shape[-1],
    }
    # mnist5k and digits have no test split: their "test" metric is the validation split.
    data["test"] = (_normalise(test[0]), test[1]) if test is not None else data["val"]
    return data


# --- model ---------------------------------------------------------------------------------------
def build_model(config: RunConfig, data: dict) -> nn.Module:
    m = config.model
    if m.name == "gpt":
        return GPT(data["vocab"], context=m.context, dim=m.dim, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio)
    if m.name == "resnet":
        return ResNet(width=m.dim, blocks=m.depth)
    size = data["image_size"]
    patch = m.patch if size % m.patch == 0 else 2
    if m.name == "vit":
        return ViT(image_size=size, patch=patch, dim=m.dim, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio)
    return MLPMixer(image_size=size, patch=patch, dim=m.dim, depth=m.depth, channel_ratio=m.mlp_ratio)


def structure_model(model: nn.Module, config: RunConfig) -> dict | None:
    """Convert the chosen layers; returns the conversion report (a dict), None for a dense run.

    From scratch, GBLR layers start FLOPs-neutral (budget 1) and the structure learner shrinks them to
    the budget during training; other families are built at the budget directly. With ``train.init_from``
    every family is fitted to the dense weights at the budget (:func:`gblr.fit.structured_from_dense`)."""
    s = config.structure
    if s.family == "dense":
        return None
    from_dense = bool(config.train.init_from)
    options = {"rank": s.rank, "tile": s.tile} if s.family == "gblr" and not from_dense else {}
    budget = 1.0 if s.family == "gblr" and not from_dense else s.budget
    layer_filter = paper_filter if s.layers == "paper" else None
    convert = ConvertConfig(family=s.family, budget=budget, init="dense" if from_dense else "random", options=options,
                            conv_layout=s.conv_layout)
    report = convert_(model, convert, layer_filter)
    if report.failed:  # never train a silently dense model
        name, reason = report.failed[0]
        raise ValueError(f"structure: {len(report.failed)} of the chosen layers cannot be {s.family} at budget "
                         f"{budget:g} ({name}: {reason})")
    return report.to_dict()


def start_from_dense_run(model: nn.Module, config: RunConfig) -> None:
    """Load the weights of the finished dense run ``config.train.init_from`` into ``model`` (not yet
    converted), after checking that the run is finished, dense, and of the same model and data. The source
    run is only read."""
    source = Path(config.train.init_from)
    where = f"train.init_from {source}"
    if not (source / "checkpoint.json").is_file() or not (source / "report.json").is_file():
        raise ValueError(f"{where} is not a finished run (it needs checkpoint.json and report.json)")
    meta, tensors = read_checkpoint(source)
    try:
        other = _build(RunConfig, meta.get("config"), "").validate()
    except ValueError as error:
        raise ValueError(f"{where}: its config is unreadable: {error}") from None
    if other.structure.family != "dense":
        raise ValueError(f"{where} is a {other.structure.family} run; it must be a dense run")
    for section in ("model", "data"):
        mine, theirs = getattr(config, section), getattr(other, section)
        different = [f.name for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(theirs, f.name)
                     and f.name != "limit"]
        if different:
            name = f"{section}.{different[0]}"
            raise ValueError(f"{where} was trained with {name}={_field(other, name)!r}, this config has "
                             f"{_field(config, name)!r}")
    load_model_state(source, model, tensors)


def _field(config: RunConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def _structured(model: nn.Module, config: RunConfig, meta: dict | None, where) -> dict | None:
    """Give ``model`` its structured layers: those a checkpoint's metadata names (resume, loading), else
    a fresh conversion (from the dense run of ``train.init_from`` when set). Returns the conversion report."""
    if meta is not None and "structure" in meta:
        if not isinstance(meta["structure"], dict):
            raise ValueError(f"checkpoint in {where} is corrupt: field 'structure' is not an object")
        rebuild(model, check_structure(meta["structure"], f"checkpoint in {where}"), f"checkpoint in {where}")
        report = meta.get("conversion")
    else:
        if meta is None and config.train.init_from:
            start_from_dense_run(model, config)
        report = structure_model(model, config)
    for module in model.modules():  # an execution choice, not saved: set on resume too
        if isinstance(module, StructuredLinear):
            module.dense_execution = config.structure.dense_execution
    return report


def _example(data: dict, config: RunConfig) -> torch.Tensor:
    """One validation example (an image, or a window of tokens), for measuring costs."""
    return data["val"][0][:1] if config.model.name != "gpt" else data["val"][: config.model.context][None]


def _tokens_per_example(model: nn.Module, data: dict, config: RunConfig) -> dict[str, int]:
    """Tokens each structured layer sees per example (output pixels for convolutions)."""
    was_training = model.training
    model.eval()  # no batch-norm statistics are updated by the measurement
    costs = cost_report(model, _example(data, config))
    model.train(was_training)
    return {layer.name: layer.tokens for layer in costs.layers}


def load_trained(run_dir, device="cpu") -> tuple[nn.Module, RunConfig, dict]:
    """The trained model of a run directory (eval mode, on ``device``: a name as in ``train.device`` or a
    ``torch.device``), its config and its data (on the CPU)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    meta, tensors = read_checkpoint(run_dir)
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"checkpoint in {run_dir} is corrupt: field 'config' is missing")
    config = _build(RunConfig, meta["config"], "").validate()
    data = load_data(config)
    model = build_model(config, data)
    _structured(model, config, meta, run_dir)
    load_model_state(run_dir, model, tensors)
    return model.to(device).eval(), config, data


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: dict, split: str, config: RunConfig, device=None) -> dict:
    """Test metric of ``split`` on ``device`` (default: the model's), in the run's precision."""
    device = device or next(model.parameters()).device
    model.eval()
    with autocast(device, config.train.precision):
        if config.model.name == "gpt":
            tokens, context = data[split], config.model.context
            windows = tokens[: (len(tokens) - 1) // context * context + 1]
            starts = torch.arange(0, len(windows) - 1 - context, context)[:64]  # a fixed evaluation set
            x = torch.stack([windows[i : i + context] for i in starts]).to(device)
            y = torch.stack([windows[i + 1 : i + 1 + context] for i in starts]).to(device)
            loss = float(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()))
            result = {"loss": loss, "perplexity": math.exp(loss)}
        else:
            x, y = data[split]
            correct = torch.zeros((), dtype=torch.long, device=device)
            for xb, yb in zip(x.split(config.train.eval_batch_size), y.split(config.train.eval_batch_size)):
                correct += (model(xb.to(device)).argmax(-1) == yb.to(device)).sum()
            result = {"accuracy": int(correct) / len(y)}
    model.train()
    return result


# --- training ------------------------------------------------------------------------------------
def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-GPU copies from pinned memory, asynchronous: a step never waits for them."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Batches:
    """The training batches of a run, drawn from the seed, the epoch and the step (so a resumed run
    sees the same ones), gathered on the device from training data moved there once."""

    def __init__(self, data: dict, config: RunConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        train = data["train"]
        self.train = tuple(t.to(device) for t in train) if isinstance(train, tuple) else train.to(device)
        self._epoch, self._order = None, None

    def __call__(self, epoch: int, position: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed, batch_size = self.config.train.seed * 1_000_003, self.config.train.batch_size
        if self.config.model.name == "gpt":
            context, tokens = self.config.model.context, self.train
            generator = torch.Generator().manual_seed(seed + step)
            starts = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=generator)
            window = _to_device(starts.unsqueeze(1) + torch.arange(context), self.device)
            return tokens[window], tokens[window + 1]
        x, y = self.train
        if self._epoch != epoch:  # one permutation per epoch, made on the CPU as always
            generator = torch.Generator().manual_seed(seed + epoch)
            self._epoch, self._order = epoch, _to_device(torch.randperm(len(y), generator=generator), self.device)
        index = self._order[position * batch_size : (position + 1) * batch_size]
        return x[index], y[index]


def _steps_per_epoch(data: dict, config: RunConfig) -> int:
    if config.model.name == "gpt":
        return max(1, len(data["train"]) // (config.train.batch_size * config.model.context))
    return math.ceil(len(data["train"][1]) / config.train.batch_size)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def _progress(meta: dict, out_dir: Path, total: int, per_epoch: int, learns_structure: bool) -> tuple:
    """Step, epoch, position in the epoch, elapsed seconds and history of a checkpoint, each checked
    (the JSON is not covered by the tensors' digest)."""
    corrupt = f"checkpoint in {out_dir} is corrupt"
    fields = {"step": (int, 0, total), "epoch": (int, 0, None), "position": (int, 0, per_epoch),
              "elapsed": ((int, float), 0, None), "history": (list, None, None)}
    for name, (kind, low, high) in fields.items():
        value = meta.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{corrupt}: field {name!r} is missing or not a {getattr(kind, '__name__', 'number')}")
        if low is not None and not (low <= value and (high is None or value <= high)):
            raise ValueError(f"{corrupt}: field {name!r} is {value}, outside [{low}, {high if high is not None else 'inf'}]")
    if learns_structure and not isinstance(meta.get("learner"), dict):
        raise ValueError(f"{corrupt}: field 'learner' is missing")
    return tuple(meta[name] for name in fields)


def train(config: RunConfig, out_dir, resume: bool = False, progress: bool = True) -> dict:
    """Train per ``config`` into ``out_dir``; with ``resume`` continue from its checkpoint. Returns the report."""
    out_dir = Path(out_dir)
    if not resume and (out_dir / "checkpoint.json").exists():
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a directory")
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):  # never overwrite files a run did not write
        raise FileExistsError(f"{out_dir} is not empty and holds no run; choose a new or empty directory")
    if resume and not (out_dir / "checkpoint.json").is_file():
        raise FileNotFoundError(f"nothing to resume: {out_dir} holds no run (no checkpoint.json)")
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    device = resolve_device(config.train.device, local_rank)  # bad devices fail before any data is loaded
    precision = check_precision(config.train.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = _distributed_setup(device)
    if config.train.batch_size % world:
        raise ValueError(f"config field 'train.batch_size' ({config.train.batch_size}) must be divisible by the {world} processes")
    main_process = rank == 0  # alone writes logs, checkpoints and the report
    torch.manual_seed(config.train.seed)
    data = load_data(config)
    model = build_model(config, data)  # built on the CPU from the seed: the same weights on every device
    saved = read_checkpoint(out_dir) if resume else None  # read once: its structure now, its state below
    conversion = _structured(model, config, saved[0] if saved else None, out_dir)
    tokens = _tokens_per_example(model, data, config) if gblr_layers(model) else None
    structure = structure_of(model)
    if main_process:  # only now: a run that cannot start writes nothing
        out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    batches = _Batches(data, config, device)
    per_epoch = _steps_per_epoch(data, config)
    total = per_epoch * config.train.epochs
    if config.train.max_steps:
        total = min(total, config.train.max_steps)
    s = config.structure
    optimizer = make_optimizer(model, config.train.lr, config.train.weight_decay, s.structure_lr)
    warmup = max(1, int(config.train.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    )
    learner = None
    if gblr_layers(model):
        learner = StructureLearner(
            model, optimizer, target=s.budget, total_steps=total, ramp=(s.ramp_start, s.ramp_end),
            # A structure fitted to dense weights starts sharp: a smooth mask would blur the fitted blocks.
            sigma=SigmaSchedule(s.sigma_end if config.train.init_from else s.sigma_start, s.sigma_end, 0, int(0.8 * total)),
            tokens=tokens, allocation=s.allocation, controller=s.controller, l1=s.l1,
        )
    step, epoch, position, elapsed, history = 0, 0, 0, 0.0, []
    if resume:
        meta = load_checkpoint(out_dir, model, optimizer, scheduler, saved)
        if _build(RunConfig, meta.get("config", {}), "").what_is_learned() != config.what_is_learned():
            raise ValueError(f"checkpoint in {out_dir} was written with another config; refusing to resume")
        step, epoch, position, elapsed, history = _progress(meta, out_dir, total, per_epoch, learner is not None)
        if learner is not None:
            try:
                learner.load_state_dict(meta["learner"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"checkpoint in {out_dir} is corrupt: field 'learner': {error!r}") from None
    writer = _tensorboard(out_dir, step) if main_process else None
    # Under torchrun every process holds the same weights; DDP averages gradients over the shards of
    # each global batch, so optimizer steps, proximal steps and the controller agree on every rank.
    forward_model = model
    if world > 1:
        forward_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if config.train.compile:
        forward_model = torch.compile(forward_model)

    def checkpoint():
        if not main_process:
            return
        save_checkpoint(out_dir, model, optimizer, scheduler, {
            "config": config.to_dict(), "step": step, "epoch": epoch, "position": position,
            "elapsed": elapsed + time.perf_counter() - started, "history": history,
            "learner": learner.state_dict() if learner is not None else None,
            "structure": structure, "conversion": conversion,
        })

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not (progress and main_process), desc=config.name, leave=False)
    started = time.perf_counter()
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    while step < total:
        x, y = batches(epoch, position, step)
        shard = len(x) // world  # this process's part of the global batch
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        loss, stats = training_step(lambda: _loss(forward_model, x, y), optimizer, scheduler, learner,
                                    parameters, config.train.clip, device, precision)
        step, position = step + 1, position + 1
        checkpoint_due = config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and step < total
        if step % config.train.log_every == 0 or step == total or checkpoint_due:
            loss_value = _finite_loss(loss, parameters if checkpoint_due or step == total else None, step, out_dir)
            _log_step(writer, bar, step, loss_value, stats, optimizer, history)
        bar.update()
        if (position == per_epoch or step == total) and main_process:
            result = evaluate(model, data, "val", config, device)
            history.append({"epoch": epoch, "step": step, **result})
            if writer is not None:
                for key, value in result.items():
                    writer.add_scalar(f"val/{key}", value, step)
                for name, layer in gblr_layers(model):
                    writer.add_scalar(f"layers/{name}", layer.relative_cost(), step)
                    writer.add_histogram(f"widths/{name}", torch.cat([layer.out_widths, layer.in_widths]).detach(), step)
        if position == per_epoch or step == total:
            epoch, position = epoch + 1, 0
        if checkpoint_due:
            checkpoint()
    bar.close()
    checkpoint()
    wall = elapsed + time.perf_counter() - started
    identical = _structure_identical_across_ranks(model) if world > 1 else True
    report = None
    if main_process:
        report = _report(model, data, config, conversion, history, wall, out_dir,
                         processes=world, structure_identical_across_ranks=identical)
    if writer is not None:
        writer.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return report


def _finite_loss(loss: torch.Tensor, parameters, step: int, out_dir: Path) -> float:
    """The loss as a float; a diverged run stops with a one-line error before it can write a non-finite
    checkpoint (reading the loss, and at checkpoints the parameters, waits for the device: done only at
    log/checkpoint steps)."""
    value = float(loss)
    problem = None if math.isfinite(value) else f"loss {value}"
    if problem is None and parameters is not None:
        if not bool(torch.stack(torch._foreach_norm([p.detach() for p in parameters])).isfinite().all()):
            problem = "loss finite, but a parameter is not"
    if problem is not None:
        raise TrainingDiverged(
            f"training diverged at step {step} ({problem}); the last good checkpoint in {out_dir} is kept "
            "(lower train.lr or structure.structure_lr, or raise train.warmup)"
        )
    return value


def _log_step(writer, bar, step: int, loss: float, stats: dict, optimizer, history: list) -> None:
    """Log the loss and the structure statistics (read back from the device every ``train.log_every`` steps)."""
    values = {"loss": loss}
    values.update({k: float(v) for k, v in stats.items() if k in ("cost_fraction", "sigma", "threshold") and v is not None})
    if writer is not None:
        writer.add_scalar("train/loss", values["loss"], step)
        for group in optimizer.param_groups:
            writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
        for key in ("cost_fraction", "sigma", "threshold"):
            if key in values:
                writer.add_scalar(f"structure/{key}", values[key], step)
    last_metric = {k: f"{v:.3f}" for k, v in history[-1].items() if k in ("accuracy", "perplexity")} if history else {}
    bar.set_postfix(loss=f"{values['loss']:.3f}", cost=f"{values.get('cost_fraction', 1.0):.3f}", **last_metric)


def _distributed_setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


@torch.no_grad()
def _structure_identical_across_ranks(model: nn.Module) -> bool:
    import torch.distributed as dist

    layers = gblr_layers(model)
    if not layers:
        return True
    mine = torch.cat([p.detach().flatten().double() for _, layer in layers for p in layer.structure_parameters()])
    if dist.get_backend() == "gloo":
        mine = mine.cpu()
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, mine) for g in gathered)


def _tensorboard(out_dir: Path, step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=step or None)


def _report(model, data, config: RunConfig, conversion, history, wall: float, out_dir: Path, **extra) -> dict:
    """Test metric, costs and pictures of the finished model, written once as report.json and report.md."""
    model.eval()
    test = evaluate(model, data, "test", config)
    costs = cost_report(model, _example(data, config).to(next(model.parameters()).device))
    report = {
        "name": config.name,
        "config": config.to_dict(),
        "test": test,
        "history": history,
        "flops_per_example": costs.total_flops,
        "dense_flops_per_example": costs.dense_total_flops,
        "structured_fraction": costs.structured_fraction,
        "budget_target": config.structure.budget if config.structure.family != "dense" else 1.0,
        "parameters": sum(p.numel() for p in model.parameters()),
        "effective_parameters": _effective_parameters(model),
        "wall_seconds": wall,
        "layers": costs.to_dict()["layers"],
        "conversion": conversion,
        **extra,
    }
    pictures = save_structure_pictures(model, out_dir / "structure.png")
    report["pictures"] = str(pictures) if pictures else None
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "report.md").write_text(report_markdown(report, costs.to_markdown() if costs.layers else ""))
    return report


def _effective_parameters(model: nn.Module) -> int:
    from ..structured import StructuredLinear

    total = 0
    structured = set()
    for module in model.modules():
        if isinstance(module, StructuredLinear):
            total += module.effective_parameters()
            structured.update(id(p) for p in module.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in structured)


def report_markdown(report: dict, layer_table: str = "") -> str:
    metric = ", ".join(f"{k} {v:.4f}" for k, v in report["test"].items())
    lines = [
        f"# Run {report['name']}",
        "",
        "| metric (test) | FLOPs / example | dense-model FLOPs | structured layers' cost | budget | params (effective) | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {metric} | {report['flops_per_example']:,} | {report['dense_flops_per_example']:,} | "
        f"{report['structured_fraction']:.3f} | {report['budget_target']:.3f} | {report['effective_parameters']:,} | "
        f"{report['wall_seconds']:.0f} s |",
    ]
    if layer_table:
        lines += ["", "## Layers", "", layer_table]
    return "\n".join(lines) + "\n"
