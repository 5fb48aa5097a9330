"""Time of calibrating a global allocation on SmolLM2-135M, with and without block replay.

    .venv/bin/python benchmarks/sensitivity_time.py [--blocks 0 10 20 29] [--threads 1]

The calibrated allocation measures the calibration loss (next-token loss on 8 windows of 256 training
tokens) once per layer, with only that layer replaced by its fit. Block replay (gblr.replay) lets the
decoder layers before the replaced layer's one return their recorded outputs. For every projection of
the chosen decoder layers (spread over the depth, so their mean share of skipped layers is near the
whole model's), this times the loss run in full and replayed, one right after the other, checks that
both give the same loss, and sums the times (with the fits) as a sample of the whole pass. Writes benchmarks/results/sensitivity_time.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _results import provenance, run_metadata, write_results

from gblr.convert import linear_weight
from gblr.fit import structured_from_dense
from gblr.objectives import CausalLMObjectives
from gblr.pretrained import load_pretrained
from gblr.replay import BlockReplay


def timed(run):
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29], help="decoder layers whose projections are measured")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.5, help="of each measured layer's low-rank fit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_pretrained("smollm2")
    model, objectives = teacher.model, CausalLMObjectives(teacher)
    projections = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
    replay = BlockReplay(model, list(projections))
    base, record_seconds = timed(lambda: replay.record(lambda: objectives.calibration_loss(model)))
    if not replay.enabled:
        raise SystemExit("block replay is off for this model: nothing to measure")
    blocks = len(replay.blocks)
    rows = []
    for name, module in projections.items():
        block = replay.block_of(name)
        if block not in args.blocks:
            continue
        fitted, fit_seconds = timed(lambda: structured_from_dense("lowrank", linear_weight(module), args.budget).eval())
        model.set_submodule(name, fitted)
        try:
            full, full_seconds = timed(lambda: objectives.calibration_loss(model))
            with replay.skipping_before(name):
                replayed, replayed_seconds = timed(lambda: objectives.calibration_loss(model))
        finally:
            model.set_submodule(name, module)
        rows.append({"layer": name, "block": block, "loss_full": full, "loss_replayed": replayed,
                     "fit_s": fit_seconds, "full_s": full_seconds, "replayed_s": replayed_seconds})
        print(f"{name}: loss {full:.6f} / {replayed:.6f}, {full_seconds:.2f} s in full, {replayed_seconds:.2f} s replayed", flush=True)
    ratios = [r["replayed_s"] / r["full_s"] for r in rows]
    fits, full, replayed = (sum(r[key] for r in rows) for key in ("fit_s", "full_s", "replayed_s"))
    depth = statistics.mean(r["block"] for r in rows)
    meta = run_metadata(f"{os.cpu_count()} cores, CPU, {args.threads} torch threads", blocks=args.blocks, budget=args.budget, base_loss=base,
                        record_s=record_seconds, decoder_layers=blocks,
                        max_loss_difference=max(abs(r["loss_full"] - r["loss_replayed"]) for r in rows))
    lines = [
        "# Calibrating a global allocation: block replay", "",
        provenance(meta), "",
        f"SmolLM2-135M, calibration loss on 8x256 training tokens, each measured projection replaced by its low-rank "
        f"fit at {args.budget:g} of its cost. `full`: the loss run in full; `replayed`: the decoder layers before the "
        f"projection's one return their recorded outputs (recording them, one run in full and a check "
        f"that replaying gives the same loss, took {record_seconds:.1f} s). Largest difference between the two losses: {meta['max_loss_difference']:.2e}.", "",
        "| layer | decoder layer | loss | full s | replayed s | replayed / full |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {r['layer']} | {r['block']} | {r['loss_full']:.5f} | {r['full_s']:.2f} | {r['replayed_s']:.2f} | "
          f"{r['replayed_s'] / r['full_s']:.2f} |" for r in rows],
        "",
        f"Median replayed / full over the {len(rows)} layers: **{statistics.median(ratios):.2f}**. The measured layers "
        f"sit {depth:.1f} decoder layers deep on average (the whole model's projections: {(blocks - 1) / 2:.1f}), so "
        f"their totals stand for the whole calibration pass: {full:.0f} s of loss runs in full against "
        f"{replayed:.0f} s replayed; with the fits ({fits:.0f} s) **{(fits + full) / (fits + replayed):.2f}x** faster.",
    ]
    write_results("sensitivity_time", meta, rows, lines)
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
