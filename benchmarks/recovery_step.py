"""Time of one recovery step of a pretrained model compressed to a fraction of its linear layers' cost:
GBLR as recovery trains it (structure frozen, packed factors on the cropped blocks) against two earlier
executions (the cropped blocks read from the full-length factors; before that, full-length masked
factors with widths and starts out of the optimizer but still in the graph), low-rank with the same
allocation and fit, and the original.

    .venv/bin/python benchmarks/recovery_step.py --model minilm --fit weights
    .venv/bin/python benchmarks/recovery_step.py --model smollm2 --fit outputs

Each step is the recovery loop's own step (gblr.step.training_step: AdamW, clipping) on the model's
recovery objective (MiniLM: 32 Shakespeare sentences, MSE to the original's embeddings; SmolLM2: next
token on 4 x 256 tokens). The models take turns within each repeat (the machine is shared and noisy);
times are medians after two warm-up steps each. Writes
benchmarks/results/recovery_step_<model>_<fit>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
from _results import provenance, run_metadata, write_results

from gblr.compress import compress_
from gblr.learn import gblr_layers
from gblr.objectives import objectives_for
from gblr.pretrained import load_pretrained
from gblr.step import training_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--fit", choices=("outputs", "weights"), default="outputs")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    original = load_pretrained(args.model)
    objectives = objectives_for(original, **({"held_out": 64} if original.kind == "encoder" else {"eval_windows": 1}))
    inputs = objectives.calibration_inputs if args.fit == "outputs" else None
    models, notes = {"original (dense)": copy.deepcopy(original.model)}, {}
    for label, family in (("low-rank", "lowrank"), ("GBLR", "gblr")):
        model = copy.deepcopy(original.model)
        compress_(model, family, args.budget, "uniform", options={"steps": 0} if family == "gblr" else None,
                  calibration_inputs=inputs)
        models[label] = model
    gblr = models["GBLR"]
    layers = [layer for _, layer in gblr_layers(gblr)]
    finer = sum(1 for layer in layers if not getattr(layer, "fit_method", "").endswith(" 1x1"))
    notes["GBLR"] = f"{finer} of {len(layers)} layers on a tiling finer than 1x1, {sum(l.num_components for l in layers)} components"
    print(notes["GBLR"], flush=True)
    models["GBLR, full-length factors"] = copy.deepcopy(gblr)
    models["GBLR, masked product"] = copy.deepcopy(gblr)

    steps = {}
    for label, model in models.items():
        structure = [p for _, layer in gblr_layers(model) for p in layer.structure_parameters()]
        if label in ("GBLR", "GBLR, full-length factors"):
            for p in structure:
                p.requires_grad_(False)  # what recovery does
        if label == "GBLR":
            packed = sum(layer.pack_for_training_() for _, layer in gblr_layers(model))
            notes[label] += f"; {packed} layers train packed factors"
        excluded = {id(p) for p in structure}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]
        trained = f"{sum(p.numel() for p in params) / 1e6:.1f}M trained entries"
        notes[label] = f"{notes[label]}; {trained}" if label in notes else trained
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        loss = objectives.recovery_loss(seed=0)
        model.train()
        steps[label] = functools.partial(_timed_step, model, optimizer, params, loss, [0])
    times = {label: [] for label in steps}
    for _ in range(2):
        for step in steps.values():
            step()
    for _ in range(args.repeats):
        for label, step in steps.items():
            times[label].append(step())
    dense = statistics.median(times["original (dense)"])
    rows = [{"model": label, "median_step_seconds": statistics.median(t), "vs_dense": statistics.median(t) / dense,
             "times": t, "note": notes.get(label, "")} for label, t in times.items()]
    for row in rows:
        print(f"{row['model']}: {row['median_step_seconds'] * 1e3:.0f} ms ({row['vs_dense']:.2f}x dense) {row['note']}", flush=True)
    meta = run_metadata(f"2 cores, CPU, {args.threads} torch threads", fit=args.fit, budget=args.budget,
                        repeats=args.repeats, model=args.model)
    lines = [f"# One recovery step of compressed {args.model}", "", provenance(meta), "",
             f"Uniform allocation at {args.budget} of every compressed linear layer's cost, {args.fit} fit for both families; "
             "one recovery step (forward, backward, AdamW, clipping) on the model's recovery batch; median of "
             f"{args.repeats} interleaved repeats after two warm-up steps.", "",
             "| model | median step | vs the original | |", "|---|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['median_step_seconds'] * 1e3:.0f} ms | {r['vs_dense']:.2f}x | {r['note']} |" for r in rows]
    write_results(f"recovery_step_{args.model}_{args.fit}", meta, rows, lines)


def _timed_step(model, optimizer, params, batch_loss, step: list[int]) -> float:
    begin = time.perf_counter()
    training_step(lambda: batch_loss(model, step[0]), optimizer, None, None, params, 1.0)
    step[0] += 1
    return time.perf_counter() - begin


if __name__ == "__main__":
    main()
