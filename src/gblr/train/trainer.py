"""The training loop, top to bottom: data, model, structured layers, optimizer and schedule, the structure
learner every step, evaluation every epoch, checkpoints, TensorBoard, and a final report."""

from __future__ import annotations

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
from ..data import CharTokenizer, load_digits, load_fashion_mnist, load_mnist5k, load_shakespeare, train_val_split
from ..learn import SigmaSchedule, StructureLearner, gblr_layers, param_groups
from ..models import GPT, MLPMixer, ViT, paper_filter
from .checkpoint import load_checkpoint, load_model_state, read_checkpoint, save_checkpoint
from .config import RunConfig, _build
from .pictures import save_structure_pictures

__all__ = ["train", "build_model", "load_data", "load_trained"]


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
    size = data["image_size"]
    patch = m.patch if size % m.patch == 0 else 2
    if m.name == "vit":
        return ViT(image_size=size, patch=patch, dim=m.dim, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio)
    return MLPMixer(image_size=size, patch=patch, dim=m.dim, depth=m.depth, channel_ratio=m.mlp_ratio)


def structure_model(model: nn.Module, config: RunConfig):
    """Convert the chosen layers. GBLR layers start FLOPs-neutral (budget 1) and the structure learner
    shrinks them to the budget during training; other families are built at the budget directly."""
    s = config.structure
    if s.family == "dense":
        return None
    options = {"rank": s.rank, "tile": s.tile} if s.family == "gblr" else {}
    budget = 1.0 if s.family == "gblr" else s.budget
    layer_filter = paper_filter if s.layers == "paper" else None
    return convert_(model, ConvertConfig(family=s.family, budget=budget, init="random", options=options), layer_filter)


def load_trained(run_dir) -> tuple[nn.Module, RunConfig, dict]:
    """The trained model of a run directory (eval mode), its config and its data."""
    meta, tensors = read_checkpoint(run_dir)
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"checkpoint in {run_dir} is corrupt: field 'config' is missing")
    config = _build(RunConfig, meta["config"], "").validate()
    data = load_data(config)
    model = build_model(config, data)
    structure_model(model, config)
    load_model_state(run_dir, model, tensors)
    return model.eval(), config, data


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: dict, split: str, config: RunConfig) -> dict:
    model.eval()
    if config.model.name == "gpt":
        tokens, context = data[split], config.model.context
        windows = tokens[: (len(tokens) - 1) // context * context + 1]
        starts = torch.arange(0, len(windows) - 1 - context, context)[:64]  # a fixed evaluation set
        x = torch.stack([windows[i : i + context] for i in starts])
        y = torch.stack([windows[i + 1 : i + 1 + context] for i in starts])
        loss = float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
        result = {"loss": loss, "perplexity": math.exp(loss)}
    else:
        x, y = data[split]
        correct = sum(
            int((model(xb).argmax(-1) == yb).sum())
            for xb, yb in zip(x.split(config.train.eval_batch_size), y.split(config.train.eval_batch_size))
        )
        result = {"accuracy": correct / len(y)}
    model.train()
    return result


# --- training ------------------------------------------------------------------------------------
def _batch(data: dict, config: RunConfig, epoch: int, position: int, step: int):
    if config.model.name == "gpt":
        context, tokens = config.model.context, data["train"]
        generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + step)
        starts = torch.randint(0, len(tokens) - context - 1, (config.train.batch_size,), generator=generator)
        x = torch.stack([tokens[i : i + context] for i in starts])
        y = torch.stack([tokens[i + 1 : i + 1 + context] for i in starts])
        return x, y
    x, y = data["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.train.seed * 1_000_003 + epoch))
    index = order[position * config.train.batch_size : (position + 1) * config.train.batch_size]
    return x[index], y[index]


def _steps_per_epoch(data: dict, config: RunConfig) -> int:
    if config.model.name == "gpt":
        return max(1, len(data["train"]) // (config.train.batch_size * config.model.context))
    return math.ceil(len(data["train"][1]) / config.train.batch_size)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def train(config: RunConfig, out_dir, resume: bool = False, progress: bool = True) -> dict:
    """Train per ``config`` into ``out_dir``; with ``resume`` continue from its checkpoint. Returns the report."""
    out_dir = Path(out_dir)
    if not resume and (out_dir / "checkpoint.json").exists():
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another directory")
    rank, world = _distributed_setup()
    if config.train.batch_size % world:
        raise ValueError(f"config field 'train.batch_size' ({config.train.batch_size}) must be divisible by the {world} processes")
    main_process = rank == 0  # alone writes logs, checkpoints and the report
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.train.seed)
    data = load_data(config)
    model = build_model(config, data)
    conversion = structure_model(model, config)
    per_epoch = _steps_per_epoch(data, config)
    total = per_epoch * config.train.epochs
    if config.train.max_steps:
        total = min(total, config.train.max_steps)
    s = config.structure
    optimizer = torch.optim.AdamW(param_groups(model, config.train.lr, config.train.weight_decay, s.structure_lr))
    warmup = max(1, int(config.train.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    )
    learner = None
    if gblr_layers(model):
        learner = StructureLearner(
            model, optimizer, target=s.budget, total_steps=total, ramp=(s.ramp_start, s.ramp_end),
            sigma=SigmaSchedule(s.sigma_start, s.sigma_end, 0, int(0.8 * total)),
        )
    step, epoch, position, elapsed, history = 0, 0, 0, 0.0, []
    if resume:
        meta = load_checkpoint(out_dir, model, optimizer, scheduler)
        if meta.get("config") != config.to_dict():
            raise ValueError(f"checkpoint in {out_dir} was written with another config; refusing to resume")
        step, epoch, position, elapsed, history = (meta[k] for k in ("step", "epoch", "position", "elapsed", "history"))
        if learner is not None:
            learner.load_state_dict(meta["learner"])
    writer = _tensorboard(out_dir, step) if main_process else None
    # Under torchrun every process holds the same weights; DDP averages gradients over the shards of
    # each global batch, so optimizer steps, proximal steps and the controller agree on every rank.
    forward_model = model
    if world > 1:
        forward_model = nn.parallel.DistributedDataParallel(model)

    def checkpoint():
        if not main_process:
            return
        save_checkpoint(out_dir, model, optimizer, scheduler, {
            "config": config.to_dict(), "step": step, "epoch": epoch, "position": position,
            "elapsed": elapsed + time.perf_counter() - started, "history": history,
            "learner": learner.state_dict() if learner is not None else None,
        })

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not (progress and main_process), desc=config.name, leave=False)
    started = time.perf_counter()
    model.train()
    while step < total:
        x, y = _batch(data, config, epoch, position, step)
        shard = len(x) // world  # this process's part of the global batch
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        loss = _loss(forward_model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.train.clip)
        optimizer.step()
        scheduler.step()
        stats = learner.step() if learner is not None else {}
        step, position = step + 1, position + 1
        if writer is not None:
            writer.add_scalar("train/loss", float(loss.detach()), step)
            for group in optimizer.param_groups:
                writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
            for key in ("cost_fraction", "sigma", "threshold"):
                if stats.get(key) is not None:
                    writer.add_scalar(f"structure/{key}", stats[key], step)
        last_metric = {k: f"{v:.3f}" for k, v in history[-1].items() if k in ("accuracy", "perplexity")} if history else {}
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", cost=f"{stats.get('cost_fraction', 1.0):.3f}", **last_metric)
        bar.update()
        if (position == per_epoch or step == total) and main_process:
            result = evaluate(model, data, "val", config)
            history.append({"epoch": epoch, "step": step, **result})
            if writer is not None:
                for key, value in result.items():
                    writer.add_scalar(f"val/{key}", value, step)
                for name, layer in gblr_layers(model):
                    writer.add_scalar(f"layers/{name}", layer.relative_cost(), step)
                    writer.add_histogram(f"widths/{name}", torch.cat([layer.out_widths, layer.in_widths]).detach(), step)
        if position == per_epoch or step == total:
            epoch, position = epoch + 1, 0
        if config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and step < total:
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


def _distributed_setup() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


@torch.no_grad()
def _structure_identical_across_ranks(model: nn.Module) -> bool:
    import torch.distributed as dist

    layers = gblr_layers(model)
    if not layers:
        return True
    mine = torch.cat([p.detach().flatten().double() for _, layer in layers for p in layer.structure_parameters()])
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
    example = data["val"][0][:1] if config.model.name != "gpt" else data["val"][: config.model.context][None]
    costs = cost_report(model, example)
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
        "conversion": conversion.to_dict() if conversion is not None else None,
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
