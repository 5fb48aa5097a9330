"""Demo: a GBLR layer discovers a hidden structure from input/output pairs alone.

Data come from a hidden matrix (block-sparse, or low-rank); a GBLR layer starting from a FLOPs-neutral
random structure is trained on ``y = W_hidden x`` with the budget set to the hidden matrix's cost. The
structure learner shrinks the layer to that budget; the layer must end up computing ``W_hidden``.

    python -m gblr.demos.hidden_structure [--steps 3000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..cost import cost_report
from ..fit import relative_error
from ..learn import SigmaSchedule, StructureLearner, param_groups
from ..step import training_step
from ..structured.gblr import GBLRLinear

KINDS = ("block_sparse", "low_rank")

#: Structural learning rate per hidden structure. Recovery is sensitive to it and no single value
#: serves both: benchmarks/hidden_structure.py sweeps it (results in benchmarks/results/).
STRUCTURE_LR = {"block_sparse": 1e-2, "low_rank": 3e-2}


@dataclass
class Recovery:
    kind: str
    seed: int
    hidden_cost: float  # fraction of the dense cost
    learned_cost: float
    relative_error: float  # ||W_learned - W_hidden||_F / ||W_hidden||_F, eval-mode (hard) structure
    seconds: float
    layer: GBLRLinear


def hidden_matrix(kind: str, size: int, generator: torch.Generator) -> tuple[torch.Tensor, int, dict]:
    """A hidden ``size x size`` matrix, its MACs per token, and the GBLR layer options that fit it."""
    if kind == "block_sparse":  # 5 dense 16x16 blocks at random grid positions
        block = 16
        grid = size // block
        weight = torch.zeros(size, size)
        for p in torch.randperm(grid * grid, generator=generator)[:5].tolist():
            i, j = divmod(p, grid)
            weight[i * block : (i + 1) * block, j * block : (j + 1) * block] = (
                torch.randn(block, block, generator=generator) / block**0.5
            )
        return weight, 5 * block * block, {"rank": block, "num_components": 16}
    if kind == "low_rank":  # rank 6
        rank = 6
        a = torch.randn(size, rank, generator=generator)
        b = torch.randn(size, rank, generator=generator)
        return a @ b.T / size**0.5, rank * 2 * size, {"rank": 1, "num_components": size}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def recover(
    kind: str,
    seed: int = 0,
    steps: int = 3000,
    size: int = 64,
    batch: int = 256,
    structure_lr: float | None = None,
    ramp: tuple[float, float] = (0.05, 0.5),
    sigma_end: float = 0.8,
    **layer_options,
) -> Recovery:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    hidden, hidden_macs, options = hidden_matrix(kind, size, generator)
    target = hidden_macs / (size * size)
    layer = GBLRLinear(size, size, bias=False, **({"width_init": "splr"} | options | layer_options))
    structure_lr = STRUCTURE_LR[kind] if structure_lr is None else structure_lr
    optimizer = torch.optim.AdamW(param_groups(layer, lr=1e-2, weight_decay=0.0, structure_lr=structure_lr))
    # Constant learning rate, then a linear decay over the last 30 % to let the factors settle.
    decay_start = int(0.7 * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if s < decay_start else max(0.02, (steps - s) / (steps - decay_start))
    )
    learner = StructureLearner(
        layer, optimizer, target=target, total_steps=steps, ramp=ramp,
        sigma=SigmaSchedule(1.0, 100.0, 0, int(sigma_end * steps)),
    )
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(batch, size, generator=generator)
        y = x @ hidden.T
        training_step(lambda: (layer(x) - y).pow(2).mean() / y.pow(2).mean(), optimizer, schedule, learner)
    seconds = time.perf_counter() - start
    layer.eval()
    with torch.no_grad():  # no graph for a matrix that is only measured
        error = relative_error(layer.to_dense(), hidden)
    return Recovery(kind, seed, target, layer.relative_cost(), error, seconds, layer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args(argv)
    print("Recovering hidden 64x64 matrices from input/output pairs (budget = hidden matrix's cost)\n")
    print("| hidden structure | seed | hidden cost | learned cost | relative error | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    last = None
    for kind in args.kinds:
        for seed in args.seeds:
            r = recover(kind, seed, args.steps)
            print(f"| {r.kind} | {r.seed} | {r.hidden_cost:.4f} | {r.learned_cost:.4f} | {r.relative_error:.2e} | {r.seconds:.1f} |")
            last = r
    print("\nCost report of the last learned layer (FLOPs of one batch of 256 inputs):\n")
    model = nn.Sequential(last.layer)
    print(cost_report(model, torch.randn(256, 64)).to_markdown())


if __name__ == "__main__":
    main()
