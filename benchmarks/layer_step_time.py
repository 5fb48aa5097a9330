"""Training-step time (forward + backward) of a GBLR layer relative to nn.Linear of the same shape.

    .venv/bin/python benchmarks/layer_step_time.py [--repeats 10] [--tokens 4096]

Both layers are timed in the same process, interleaved, after warm-up; the figure is the median over
repeats. Writes benchmarks/results/layer_step_time.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import provenance, run_metadata, write_results
from torch import nn

from gblr import GBLRLinear


def step_seconds(layer: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, m = args.in_features, args.out_features
    x = torch.randn(args.tokens, n, requires_grad=True)
    dense = nn.Linear(n, m)
    variants = {
        "gblr rank-1, K=min(m,n), splr init, sigma=1 (start of training)": GBLRLinear(n, m, sigma=1.0),
        "gblr rank-1, K=min(m,n), Dirichlet mask (end of training)": GBLRLinear(n, m, sigma=None),
    }
    rows = []
    for name, layer in variants.items():
        for _ in range(2):  # warm-up
            step_seconds(dense, x), step_seconds(layer, x)
        ratios, dense_times, gblr_times = [], [], []
        for _ in range(args.repeats):
            d = step_seconds(dense, x)
            g = step_seconds(layer, x)
            dense_times.append(d)
            gblr_times.append(g)
            ratios.append(g / d)
        rows.append(
            {
                "variant": name,
                "relative_cost": layer.relative_cost(),
                "dense_ms": 1e3 * statistics.median(dense_times),
                "gblr_ms": 1e3 * statistics.median(gblr_times),
                "time_ratio_median": statistics.median(ratios),
            }
        )
        print(f"{name}: {rows[-1]['time_ratio_median']:.2f}x nn.Linear "
              f"({rows[-1]['gblr_ms']:.1f} ms vs {rows[-1]['dense_ms']:.1f} ms)")
    meta = run_metadata(f"torch threads {args.threads}", shape={"in_features": n, "out_features": m, "tokens": args.tokens},
                        repeats=args.repeats)
    lines = [
        "# GBLR training step vs nn.Linear",
        "",
        f"Forward + backward of one ({n} -> {m}) layer on {args.tokens} tokens, median of {args.repeats} "
        f"interleaved repeats. {provenance(meta)}",
        "",
        "| variant | counted cost | nn.Linear ms | GBLR ms | GBLR / nn.Linear |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['relative_cost']:.3f} | {r['dense_ms']:.1f} | {r['gblr_ms']:.1f} | "
            f"{r['time_ratio_median']:.2f}x |"
        )
    write_results("layer_step_time", meta, rows, lines)


if __name__ == "__main__":
    main()
