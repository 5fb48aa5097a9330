"""Seeded comparisons of training recipes, run as a resumable grid of `gblr train` runs.

    .venv/bin/python benchmarks/seeded_runs.py resnet     # Fashion-MNIST ResNet: dense / GBLR / low-rank at 0.5,
                                                         # one structured matrix per convolution vs one per tap
    .venv/bin/python benchmarks/seeded_runs.py finetune   # Fashion-MNIST ViT at 0.3: fine-tuned from a dense run
                                                         # vs trained from scratch for the same total epochs

Every (variant, seed) is one run directory under --runs; finished runs are skipped and interrupted ones
resumed, so the grid can be run in pieces. Each row of benchmarks/results/NAME.json is one run (task,
variant, family, budget, seed, test metric, effective FLOPs); NAME.md is generated from them: mean and
standard deviation over seeds. Every variant of an experiment gets the same recipe (config, epochs, data,
seeds); only what the row names differs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch
from _grid import Diverged, diverged_note, metric_text, run_row, train_run
from _results import provenance, run_metadata, write_results

# Each experiment: description, shared overrides, and variants (label, config, overrides, dense run to start from).
EXPERIMENTS = {
    "resnet": {
        "title": "Fashion-MNIST ResNet: structured 3x3 convolutions at half their cost",
        "about": "A small ResNet (16/32/64 channels, one basic block per stage); the two 3x3 convolutions of every "
                 "block are structured (the stem, the 1x1 shortcuts and the head stay dense). `matrix`: one "
                 "structured matrix of out x (in x 3 x 3) per convolution; `taps`: one out x in matrix per kernel tap. "
                 "GBLR's structure learner shares the budget between the layers with one threshold, unless the row "
                 "says per-layer budget (each convolution held to 0.5 on its own, as low-rank is). "
                 "20,000 training images, 3 epochs, the same recipe for every row.",
        "shared": ["data.limit=20000", "train.epochs=3"],
        "variants": [
            ("dense", "configs/fmnist-resnet-dense.toml", [], None),
            ("gblr matrix", "configs/fmnist-resnet-gblr-0.5.toml", ['structure.conv_layout="matrix"'], None),
            ("gblr taps", "configs/fmnist-resnet-gblr-0.5.toml", ['structure.conv_layout="taps"'], None),
            ("gblr matrix, per-layer budget", "configs/fmnist-resnet-gblr-0.5.toml",
             ['structure.conv_layout="matrix"', 'structure.allocation="per_layer"'], None),
            ("lowrank matrix", "configs/fmnist-resnet-lowrank-0.5.toml", ['structure.conv_layout="matrix"'], None),
            ("lowrank taps", "configs/fmnist-resnet-lowrank-0.5.toml", ['structure.conv_layout="taps"'], None),
        ],
    },
    "finetune": {
        "title": "Fashion-MNIST ViT at 30 %: fine-tuned from a dense run vs trained from scratch",
        "about": "The small ViT (dim 128, depth 4) on 15,000 training images. `from dense`: a dense run of 2 epochs, "
                 "its q, k, v, fc1 and fc2 fitted at the budget (GBLR: the block-low-rank / learned fit; low-rank: "
                 "truncated SVD), then 2 epochs of training with the structure learner holding the budget (4 epochs "
                 "in all). `from scratch`: 4 epochs from random initialisation. Same seeds, data and recipe.",
        "shared": ["data.limit=15000"],
        "variants": [
            ("dense 2 epochs", "configs/fmnist-vit-small-dense.toml", ["train.epochs=2"], None),
            ("dense 4 epochs", "configs/fmnist-vit-small-dense.toml", ["train.epochs=4"], None),
            ("gblr from dense", "configs/fmnist-vit-small-gblr-0.3.toml", ["train.epochs=2"], "dense 2 epochs"),
            ("gblr from scratch", "configs/fmnist-vit-small-gblr-0.3.toml", ["train.epochs=4"], None),
            ("lowrank from dense", "configs/fmnist-vit-small-lowrank-0.3.toml", ["train.epochs=2"], "dense 2 epochs"),
            ("lowrank from scratch", "configs/fmnist-vit-small-lowrank-0.3.toml", ["train.epochs=4"], None),
        ],
    },
}


def run_directory(runs: Path, label: str, seed: int) -> Path:
    return runs / f"{re.sub(r'[^A-Za-z0-9.]+', '-', label)}-seed{seed}"


def run_one(runs: Path, task: str, experiment: dict, variant: tuple, seed: int) -> dict:
    """The run's row; a run whose training diverged is a row without a metric (the grid goes on)."""
    label, config, overrides, start = variant
    try:
        report, command = train_run(run_directory(runs, label, seed), config,
                                    [*experiment["shared"], *overrides, f"train.seed={seed}"],
                                    run_directory(runs, start, seed) if start is not None else None)
    except Diverged as error:
        return {"task": task, "variant": label, "seed": seed, "value": None, "diverged": str(error),
                "command": error.command}
    return run_row(report, command, task=task, variant=label)


def summary(rows: list[dict], variants: list[tuple]) -> list[str]:
    lines = ["| variant | family | budget | structured cost | FLOPs / example | test accuracy (mean ± std) | seeds | "
             "train time per run |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, *_ in variants:
        mine = [r for r in rows if r["variant"] == label and r["value"] is not None]
        if not mine:
            continue
        lines.append(
            f"| {label} | {mine[0]['family']} | {mine[0]['budget']:.2f} | "
            f"{statistics.mean(r['structured_fraction'] for r in mine):.3f} | "
            f"{round(statistics.mean(r['flops_per_example'] for r in mine)):,} | "
            f"{metric_text(mine[0]['metric'], [r['value'] for r in mine])} | {len(mine)} | "
            f"{statistics.mean(r['train_seconds'] for r in mine) / 60:.1f} min |")
    diverged = [f"{r['variant']} seed {r['seed']}" for r in rows if r["value"] is None]
    if diverged:  # left out of the means above, named so that a missing seed is not mistaken for a skipped one
        lines += ["", diverged_note(diverged)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default=None, help="run directories (default runs/seeded-EXPERIMENT)")
    args = parser.parse_args()
    experiment = EXPERIMENTS[args.experiment]
    runs = Path(args.runs or f"runs/seeded-{args.experiment}")
    meta = run_metadata(f"CPU, {torch.get_num_threads()} torch thread(s) per run")
    rows = []
    for seed in args.seeds:
        for variant in experiment["variants"]:
            start = time.perf_counter()
            rows.append(run_one(runs, args.experiment, experiment, variant, seed))
            value = "diverged" if rows[-1]["value"] is None else f"{rows[-1]['value']:.4f}"
            print(f"{variant[0]} seed {seed}: {value} ({time.perf_counter() - start:.0f} s)", flush=True)
            lines = [f"# {experiment['title']}", "", f"{provenance(meta)} {experiment['about']}", "",
                     *summary(rows, experiment["variants"]), "", "Commands (one per run):", "",
                     *[f"    {r['command']}" for r in rows]]
            write_results(f"seeded_{args.experiment}", meta, rows, lines)


if __name__ == "__main__":
    main()
