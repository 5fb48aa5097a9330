"""Fashion-MNIST ViT recipe: dense vs GBLR at 30 % vs low-rank at 30 % of the structured layers' cost.

    .venv/bin/python benchmarks/fmnist_vit.py [--configs configs/fmnist-vit-small-*.toml]
    # quality cost of the hardware-aware option (rank-32 components on 32-row tiles), same budget:
    .venv/bin/python benchmarks/fmnist_vit.py --configs configs/fmnist-vit-small-gblr-0.3.toml \
        configs/fmnist-vit-small-gblr-0.3-hw.toml --overrides train.epochs=3 --runs runs/benchmark-hw --name hw_option_quality

Runs `gblr train` for each config (same seed, same epochs) one after the other, so wall times are
comparable, then writes benchmarks/results/fmnist_vit.{json,md} from the runs' reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _results import provenance, run_metadata, write_results

DEFAULT = ["configs/fmnist-vit-small-dense.toml", "configs/fmnist-vit-small-gblr-0.3.toml",
           "configs/fmnist-vit-small-lowrank-0.3.toml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT)
    parser.add_argument("--runs", default="runs/benchmark-fmnist-vit")
    parser.add_argument("--overrides", nargs="*", default=[], help="section.field=value for every run")
    parser.add_argument("--name", default="fmnist_vit", help="results file name")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        out = Path(args.runs) / Path(config).stem
        command = [sys.executable, "-m", "gblr.cli", "train", config, *args.overrides, "--out", str(out), "--quiet"]
        if (out / "checkpoint.json").exists():
            command.append("--resume")
        start = time.perf_counter()
        subprocess.run(command, check=True)
        report = json.loads((out / "report.json").read_text())
        rows.append({
            "config": config, "structure": {k: report["config"]["structure"][k] for k in ("rank", "tile")}, "command": " ".join(["gblr", *command[3:]]), "test_accuracy": report["test"]["accuracy"],
            "best_val_accuracy": max(h["accuracy"] for h in report["history"]), "epochs": report["config"]["train"]["epochs"],
            "flops_per_image": report["flops_per_example"], "structured_fraction": report["structured_fraction"],
            "budget": report["budget_target"], "effective_parameters": report["effective_parameters"],
            "train_seconds": report["wall_seconds"], "command_seconds": time.perf_counter() - start,
        })
        print(rows[-1], flush=True)
    if any(o.startswith("train.device") and "cuda" in o for o in args.overrides):
        note = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, runs one after the other"
    else:
        note = "2 torch threads, runs one after the other"
    meta = run_metadata(note)
    lines = [
        "# Fashion-MNIST ViT: dense vs GBLR vs low-rank at the same cost",
        "",
        f"{provenance(meta)} Each row is one `gblr train` run (same seed and epochs); FLOPs are effective "
        "FLOPs per image of the whole model (cost_report); `structured` is the cost of the structured layers "
        "(q, k, v, fc1, fc2) relative to dense.",
        "",
        "| config | rank, tile | epochs | test accuracy | best val accuracy | FLOPs / image | structured | budget | effective params | train time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {Path(r['config']).stem} | {r['structure']['rank']}, {r['structure']['tile']} | {r['epochs']} | {r['test_accuracy']:.4f} | {r['best_val_accuracy']:.4f} | "
            f"{r['flops_per_image']:,} | {r['structured_fraction']:.3f} | {r['budget']:.2f} | "
            f"{r['effective_parameters']:,} | {r['train_seconds'] / 60:.1f} min |"
        )
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    write_results(args.name, meta, rows, lines)


if __name__ == "__main__":
    main()
