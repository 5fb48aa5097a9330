"""Compress SmolLM2-135M to fractions of its q, k, v, o, gate, up, down projections' cost.

GBLR and low-rank with the same options (uniform budgets or a global budget calibrated on the next-token
loss of 8x256 training tokens or on the divergence of the next-token distributions from the original's;
fitting the weights or each layer's outputs on 128x256 training tokens; both counts are options),
output fits also made sequentially (each layer group fitted on the inputs of the partly compressed model,
optionally also refitting the layers kept dense),
Monarch (uniform or calibrated global, weights: it has no output fit), GBLR on the per-layer budgets low-rank's calibrated global allocation chose
(the two families then differ only in their fit), and the original for reference: Shakespeare validation perplexity (the last
10 % of the works, non-overlapping 256-token windows) before and, with ``--steps``, after a next-token
fine-tune on the first 90 % (``--finetune-lrs`` with several rates: every model, the original too, is
fine-tuned at each and keeps the one with the lowest loss on the calibration windows, which it never trains on). ``--learned-fit`` also times the paper's learned fit (``fit_gblr`` with 100
steps) on every layer.

    python benchmarks/compress_smollm2.py --budgets 0.9 0.8 0.6 0.5 --steps 0 --methods uniform
    python benchmarks/compress_smollm2.py --budgets 0.5 --steps 200 --methods "uniform, outputs" --name compress_smollm2_recovery
    python benchmarks/compress_smollm2.py --budgets 0.8 0.5 --steps 200 --recover-at 1.0 0.5 --methods "global, calibrated, outputs"
    python benchmarks/compress_smollm2.py --budgets 0.8 --steps 0 --methods "low-rank global, calibrated, outputs" "low-rank's allocation, outputs"
    python benchmarks/compress_smollm2.py --budgets 0.8 --steps 0 --eval-windows 32 --threads 1 --methods "low-rank global, calibrated, sequential" "low-rank's allocation, sequential" --name compress_smollm2_sequential
    python benchmarks/compress_smollm2.py --budgets 0.5 --steps 200 --eval-windows 32 --calibration-windows 2 --input-windows 16 --methods "low-rank global, calibrated, outputs" --finetune-lrs 1e-4 3e-4 1e-3 --name compress_smollm2_budget_05_lr
    python benchmarks/compress_smollm2.py --budgets 0.8 --steps 0 --eval-windows 32 --input-windows 32 --threads 1 --methods "low-rank global, calibrated, sequential" "low-rank on low-rank's allocation, sequential outputs fit, kept" --name compress_smollm2_refit
    python benchmarks/compress_smollm2.py --budgets 0.8 --steps 0 --eval-windows 32 --input-windows 32 --threads 2 --methods "low-rank global, calibrated on divergence, sequential" --name compress_smollm2_divergence
    python benchmarks/compress_smollm2.py --budgets 0.8 --steps 0 --eval-windows 32 --input-windows 32 --threads 1 --methods "GBLR global, calibrated on divergence, sequential" --name compress_smollm2_divergence_gblr
    python benchmarks/compress_smollm2.py --budgets 0.5 --steps 200 --eval-windows 32 --calibration-windows 2 --input-windows 16 --methods "low-rank global, calibrated on divergence, outputs" --finetune-lrs 3e-4 --recover-at 0.5 --name compress_smollm2_divergence_05
    python benchmarks/compress_smollm2.py --budgets 0.5 --steps 200 --eval-windows 32 --calibration-windows 2 --input-windows 16 --methods "GBLR global, calibrated on divergence, outputs" --finetune-lrs 3e-4 --recover-at 0.5 --threads 1 --name compress_smollm2_divergence_05_gblr_finetuned
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _results import monarch_dense_execution, provenance, run_metadata, selected_methods, write_results

from gblr.compress import compress_
from gblr.convert import KEPT_DENSE
from gblr.objectives import CausalLMObjectives
from gblr.pretrained import load_pretrained
from gblr.train.recovery import recover_

CONTEXT = 256

LOWRANK_ALLOCATION = "low-rank's allocation"  # the budgets of "low-rank global, calibrated, (sequential) outputs fit"
METHODS = [  # (label, family, allocation, calibrated: False, True (next-token loss) or "divergence", fit)
    *[(f"{name} {allocation}{', calibrated' if calibrated else ''}, {fit} fit", family, allocation, calibrated, fit)
      for allocation, calibrated in (("uniform", False), ("global", True))
      for fit in ("outputs", "weights")
      for name, family in (("GBLR", "gblr"), ("low-rank", "lowrank"))],
    *[(f"Monarch {allocation}{', calibrated' if calibrated else ''}, weights fit", "monarch", allocation, calibrated, "weights")
      for allocation, calibrated in (("uniform", False), ("global", True))],
    # the output fit one layer group at a time, on the partly compressed model's inputs
    *[(f"{name} global, calibrated, sequential outputs fit", family, "global", True, "sequential outputs")
      for name, family in (("GBLR", "gblr"), ("low-rank", "lowrank"))],
    # the global allocation calibrated on the divergence from the original's next-token distributions
    *[(f"{name} global, calibrated on divergence, {fit} fit", family, "global", "divergence", fit)
      for fit in ("outputs", "sequential outputs") for name, family in (("GBLR", "gblr"), ("low-rank", "lowrank"))],
    # the fit alone: GBLR on the per-layer budgets low-rank's calibrated global allocation chose
    *[(f"GBLR on {LOWRANK_ALLOCATION}, {fit} fit", "gblr", LOWRANK_ALLOCATION, False, fit)
      for fit in ("outputs", "sequential outputs")],
    # sequential fits that also give the layers kept dense their corrected weights (same allocation and cost)
    (f"low-rank on {LOWRANK_ALLOCATION}, sequential outputs fit, kept layers refitted", "lowrank", LOWRANK_ALLOCATION, False,
     "sequential outputs, kept layers refitted"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps (batch 4 x 256 tokens); 0: none")
    parser.add_argument("--eval-windows", type=int, default=64, help="256-token validation windows")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--learned-fit", action="store_true", help="also fit every layer with the learned fit")
    parser.add_argument("--methods", nargs="+", default=["all"], help="methods whose label contains one of these, or all")
    parser.add_argument("--name", default="compress_smollm2", help="results file name")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--calibration-windows", type=int, default=8,
                        help="256-token training windows of the calibration loss (allocation)")
    parser.add_argument("--input-windows", type=int, default=128, help="256-token training windows of the output fits' inputs")
    parser.add_argument("--finetune-lrs", type=float, nargs="+", default=[1e-4],
                        help="fine-tuning learning rates, the same for every model; with several, each model's is chosen "
                             "by its next-token loss on the calibration windows (never trained on)")
    parser.add_argument("--recover-at", type=float, nargs="+", default=None,
                        help="fine-tune only the models of these budgets, 1.0 for the original (default: all of them)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    original = load_pretrained("smollm2")
    load_seconds = time.perf_counter() - start
    objectives = CausalLMObjectives(original, eval_windows=args.eval_windows, context=CONTEXT,
                                    calibration_windows=args.calibration_windows, input_windows=args.input_windows)
    selected = selected_methods(METHODS, args.methods)
    calibrations = {True: objectives}  # the same windows; the divergence's needs the original's predictions
    if any(method[3] == "divergence" for method in selected):
        calibrations["divergence"] = objectives.with_calibration("divergence", original)

    def fine_tune(model, budget: float, keep=lambda after: None) -> dict | None:
        """Fine-tune a copy of ``model`` at every learning rate; the chosen one (lowest next-token loss on
        the calibration windows, which training never sees) is the result, every one is listed under "by_lr".
        ``keep(result so far)`` runs after each rate, so that a long run that stops keeps what it measured."""
        if not args.steps or (args.recover_at is not None and budget not in args.recover_at):
            return None
        tries, so_far = [], None
        for lr in args.finetune_lrs:
            tuned = copy.deepcopy(model)
            result = recover_(tuned, objectives.recovery_loss(seed=0), args.steps, lr=lr)
            tries.append({"lr": lr, "finetune_seconds": result.seconds, "finetune_loss_first": result.losses[0],
                          "finetune_loss_last": result.losses[-1], "calibration_loss": objectives.calibration_loss(tuned),
                          **evaluate(tuned)})
            print(budget, tries[-1], flush=True)
            so_far = {**min(tries, key=lambda t: t["calibration_loss"]), "by_lr": tries}
            keep(so_far)
        return so_far

    def evaluate(model) -> dict:
        begin = time.perf_counter()
        return {**objectives.quality(model), "eval_seconds": time.perf_counter() - begin}

    meta = run_metadata(f"2 cores, CPU, {args.threads} torch threads", finetune_steps=args.steps,
                        finetune_batch="4 x 256 tokens", eval_tokens=len(objectives.validation), load_seconds=load_seconds,
                        calibration_windows=args.calibration_windows, input_windows=args.input_windows,
                        finetune_lrs=args.finetune_lrs)
    # the original first, so that every row written after each run has its reference (fine-tuned last)
    reference = {"method": "original", "family": "dense", "budget": 1.0, "reached": 1.0, "layers": 0,
                 "compress_seconds": 0.0, "before": evaluate(copy.deepcopy(original.model)), "after": None}
    rows = [reference]

    def write(row: dict, after: dict) -> None:  # a row's fine-tune so far, written at once
        row["after"] = after
        write_results(args.name, meta, rows, markdown(meta, rows))
    lowrank_allocations = {}  # budget -> the per-layer budgets of low-rank's calibrated global allocation
    for budget, (label, family, allocation, calibrated, fit) in [(b, m) for b in args.budgets for m in selected]:
        if allocation == LOWRANK_ALLOCATION:
            if budget not in lowrank_allocations:
                raise SystemExit(f"{label!r} needs a 'low-rank global, calibrated' row with an outputs fit at budget {budget:g}: select both")
            allocation = lowrank_allocations[budget]
        model = copy.deepcopy(original.model)
        begin = time.perf_counter()
        result = compress_(model, family, budget, allocation, options={"steps": 0} if family == "gblr" else None,
                           calibration_loss=calibrations[calibrated].calibration_loss if calibrated else None,
                           calibration_inputs=None if fit == "weights" else objectives.calibration_inputs,
                           sequential=fit.startswith("sequential"), refit_kept=fit.endswith("refitted"))
        if (family, allocation, calibrated) == ("lowrank", "global", True) and fit != "weights":
            lowrank_allocations[budget] = {a.name: a.budget for a in result.allocation}
        monarch_dense_execution(model)
        kept = sum(1 for _, reason in result.conversion.skipped if reason == KEPT_DENSE)
        common = {"method": label, "family": family, "budget": budget, "reached": result.reached,
                  "layers": len(result.conversion.replaced), "kept_dense": kept,
                  "compress_seconds": time.perf_counter() - begin,
                  "mean_relative_error": sum(r.relative_error for r in result.conversion.replaced) / len(result.conversion.replaced),
                  "mean_output_error": _mean([r.output_error for r in result.conversion.replaced])}
        before = evaluate(model)
        print(common, before, flush=True)
        rows.append({**common, "before": before, "after": None})
        rows[-1]["after"] = fine_tune(model, budget, keep=lambda after: write(rows[-1], after))
        print(rows[-1], flush=True)
        write_results(args.name, meta, rows, markdown(meta, rows))
    if args.learned_fit:
        model = copy.deepcopy(original.model)
        begin = time.perf_counter()
        result = compress_(model, "gblr", args.budgets[0], "uniform", options={"steps": 100})
        learned_wins = sum(1 for r in result.conversion.replaced if _is_learned(model.get_submodule(r.name)))
        rows.append({"method": "GBLR uniform, learned fit (100 steps) considered", "family": "gblr", "budget": args.budgets[0],
                     "reached": result.reached, "layers": len(result.conversion.replaced),
                     "compress_seconds": time.perf_counter() - begin, "learned_fit_chosen": learned_wins,
                     "mean_relative_error": sum(r.relative_error for r in result.conversion.replaced) / len(result.conversion.replaced),
                     "before": evaluate(model), "after": None})
        print(rows[-1], flush=True)
    reference["after"] = fine_tune(original.model, 1.0, keep=lambda after: write(reference, after))
    write_results(args.name, meta, rows, markdown(meta, rows))


def _mean(values: list) -> float | None:
    return None if None in values or not values else sum(values) / len(values)


def _is_learned(layer) -> bool:
    return getattr(layer, "fit_method", None) == "learned"  # set by gblr.fit.fit_gblr


def markdown(meta, rows) -> list[str]:
    lrs = meta.get("finetune_lrs", [1e-4])
    lines = ["# Compressing SmolLM2-135M", "", provenance(meta), "",
             f"Perplexity on {meta['eval_tokens']} Shakespeare validation tokens (windows of {CONTEXT}); fine-tune: "
             f"{meta['finetune_steps']} steps of {meta['finetune_batch']}, AdamW, next-token loss on the training split, "
             + (f"lr {lrs[0]:g}. " if len(lrs) == 1 else
                f"learning rates {', '.join(f'{lr:g}' for lr in lrs)} for every model, each model's chosen by its next-token "
                "loss on the calibration windows (never trained on; all listed below). ") +
             "Calibrated allocations use the next-token loss "
             + ("(\"calibrated on divergence\": the mean KL divergence of the next-token distributions from the original's) "
                if any("divergence" in r["method"] for r in rows) else "")
             + f"on {meta.get('calibration_windows', 2)}x{CONTEXT} training "
             f"tokens; fits of the outputs use each layer's inputs on {meta.get('input_windows', 16)}x{CONTEXT} training tokens; the mean relative error "
             "column is of the weights, the output error of each layer's outputs on those tokens. Monarch layers run through their effective dense weight (the same function; "
             "their tiny block products are 10-20x slower than dense here).", "",
             "| method | budget | reached cost | layers replaced | kept dense | mean relative error | mean output error | compress s | perplexity | after fine-tune | fine-tune s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        after = r.get("after") or {}
        error = r.get("mean_relative_error")
        tuned = f"{after['perplexity']:.2f} | {after['finetune_seconds']:.0f}" if after else "- | -"
        error_text = "-" if error is None else f"{error:.4f}"
        output = "-" if r.get("mean_output_error") is None else f"{r['mean_output_error']:.4f}"
        lines.append(f"| {r['method']} | {r['budget']:.2f} | {r['reached']:.3f} | {r['layers']} | {r.get('kept_dense', 0)} | {error_text} | {output} | "
                     f"{r['compress_seconds']:.0f} | {r['before']['perplexity']:.2f} | {tuned} |")
    tuned_rows = [r for r in rows if r.get("after") and len(r["after"].get("by_lr", [])) > 1]
    if tuned_rows:
        lines += ["", "Every fine-tuning learning rate (the chosen one has the lowest calibration loss):", "",
                  "| method | budget | lr | calibration loss | perplexity after fine-tune | fine-tune s |", "|---|---:|---:|---:|---:|---:|"]
        for r in tuned_rows:
            for t in r["after"]["by_lr"]:
                mark = " (chosen)" if t["lr"] == r["after"]["lr"] else ""
                lines.append(f"| {r['method']} | {r['budget']:.2f} | {t['lr']:g}{mark} | {t['calibration_loss']:.4f} | "
                             f"{t['perplexity']:.2f} | {t['finetune_seconds']:.0f} |")
    learned = [r for r in rows if "learned_fit_chosen" in r]
    for r in learned:
        lines += ["", f"Learned fit: chosen over the block-low-rank candidates on {r['learned_fit_chosen']} of {r['layers']} layers; "
                  f"fitting all layers took {r['compress_seconds']:.0f} s."]
    return lines



if __name__ == "__main__":
    main()
