"""Per-layer output errors of GBLR's and low-rank's output fits on every linear layer of all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/output_fit_layers.py [--budgets 0.5 0.3] [--sweeps 0 4]

Each encoder layer's input second moment comes from 256 training sentences (the compression benchmark's
calibration inputs). At each budget, every layer gets low-rank's output fit (the whitened truncated SVD)
and GBLR's (gblr.fit.fit_gblr, tilings only) with each number of refit sweeps (0: tiles fitted under each
column tile's own statistics only). Reported: the relative output error ||(W_fit - W) X^T|| / ||W X^T||
per layer kind, which tiling GBLR picked, and the fit time. Writes benchmarks/results/output_fit_layers.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import provenance, run_metadata, write_results
from torch import nn

from gblr.calibration import damped, input_grams
from gblr.fit import fit_gblr, output_error, structured_from_dense
from gblr.objectives import EncoderObjectives
from gblr.pretrained import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--sweeps", type=int, nargs="+", default=[0, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pretrained = load_pretrained("minilm")
    layers = {n: m for n, m in pretrained.model.named_modules() if isinstance(m, nn.Linear) and ".layer." in n}
    grams = input_grams(pretrained.model, layers, EncoderObjectives(pretrained, held_out=64).calibration_inputs)
    rows = []
    for budget in args.budgets:
        for name, layer in layers.items():
            weight, gram = layer.weight.detach(), grams[name]
            metric = damped(gram, 0.01, features=weight.shape[1])
            kind = name.split(".layer.")[1].split(".", 1)[1]
            start = time.perf_counter()
            lowrank = structured_from_dense("lowrank", weight, budget, gram=gram)
            rows.append({"layer": name, "kind": kind, "budget": budget, "method": "low-rank", "tiling": "",
                         "error": output_error(lowrank.to_dense(), weight, metric), "seconds": time.perf_counter() - start})
            for sweeps in args.sweeps:
                start = time.perf_counter()
                fitted = fit_gblr(weight, budget, gram=gram, steps=0, sweeps=sweeps)
                rows.append({"layer": name, "kind": kind, "budget": budget, "method": f"GBLR, {sweeps} sweeps",
                             "tiling": fitted.fit_method, "error": output_error(fitted.to_dense(), weight, metric),
                             "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    meta = run_metadata("1 torch thread")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["# Output fits of every MiniLM linear layer: GBLR against low-rank", "", provenance(meta), "",
             "Mean relative output error on the calibration inputs per layer kind (6 layers each), and how many "
             "of the 36 layers GBLR's fit gave a tiling finer than 1x1 (1x1 is the whitened low-rank fit itself).", ""]
    for budget in args.budgets:
        mine = [r for r in rows if r["budget"] == budget]
        lines += [f"## budget {budget:g}", "", "| layer kind | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        for kind in dict.fromkeys(r["kind"] for r in mine):
            cells = [f"{statistics.mean(r['error'] for r in mine if r['kind'] == kind and r['method'] == m):.4f}" for m in methods]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        cells = [f"{statistics.mean(r['error'] for r in mine if r['method'] == m):.4f}" for m in methods]
        lines.append("| all 36 | " + " | ".join(cells) + " |")
        finer = [f"{m}: {sum(1 for r in mine if r['method'] == m and r['tiling'] not in ('', 'block-low-rank 1x1'))}, "
                 f"{sum(r['seconds'] for r in mine if r['method'] == m):.0f} s" for m in methods]
        lines += ["", "Finer tilings chosen, total fit time: " + "; ".join(finer) + ".", ""]
    write_results("output_fit_layers", meta, rows, lines)


if __name__ == "__main__":
    main()
