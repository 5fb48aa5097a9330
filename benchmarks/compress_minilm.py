"""Compress the all-MiniLM-L6-v2 sentence encoder to 50 % and 30 % of its linear layers' cost.

GBLR and low-rank get the same options: every allocation (uniform budgets; one global budget allocated
by error curves; the same calibrated on the embedding loss of 64 training sentences) with either fit
(of the weights; of each layer's outputs on 1024 training sentences); Monarch gets every allocation with
the weight fit (it has no output fit); the best of these, the calibrated global allocation with output
fits, is also fitted sequentially (each layer group on the inputs of the partly compressed model). Each
is measured without and with a short distillation (MSE to the original's hidden states after every
layer, no dropout, frozen structure; the calibrated GBLR rows also with the structure learner active):
- mean cosine similarity between compressed and original embeddings of 512 held-out Shakespeare
  sentences (the last 10 % of the works; distillation and calibration use the first 90 %),
- 5-fold cross-validated accuracy of a logistic-regression probe on the 4000 MR sentences.
Also writes the per-layer allocation table, and checks that save -> load in a fresh process reproduces
the embeddings exactly.

    python benchmarks/compress_minilm.py [--steps 100] [--quick]
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe      # every method at 0.5, one table
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "calibrated, outputs" --distill-lrs 2e-4 5e-4 1e-3 --name compress_minilm_distill_lr
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "calibrated, outputs" --distill-batch 128 --distill-lrs 1e-3 2e-3 --name compress_minilm_distill_batch
    # the batch-512 pairs at 2e-3 and 4e-3: each first command was stopped after its GBLR rows (its pattern
    # also selects low-rank's row, which the second command runs in a process of its own); the 3e-3 and 1.5e-3
    # pairs name each family in their patterns
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "global, calibrated, outputs" --distill-batch 512 --distill-lrs 2e-3 --no-structure-learning --threads 1 --name compress_minilm_distill_batch_512
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "low-rank global, calibrated, outputs" --distill-batch 512 --distill-lrs 2e-3 --no-structure-learning --threads 1 --name compress_minilm_distill_batch_512_lowrank
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "global, calibrated, outputs" --distill-batch 512 --distill-lrs 4e-3 --no-structure-learning --threads 1 --name compress_minilm_distill_batch_512_lr_4e-3
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "low-rank global, calibrated, outputs" --distill-batch 512 --distill-lrs 4e-3 --no-structure-learning --threads 1 --name compress_minilm_distill_batch_512_lr_4e-3_lowrank
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "GBLR global, calibrated, outputs" --distill-batch 512 --distill-lrs 3e-3 --no-structure-learning --threads 1 --name compress_minilm_distill_batch_512_lr_3e-3
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "low-rank global, calibrated, outputs" --distill-batch 512 --distill-lrs 3e-3 --no-structure-learning --threads 1 --name compress_minilm_distill_batch_512_lr_3e-3_lowrank
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "GBLR global, calibrated, outputs" --distill-batch 512 --distill-lrs 1.5e-3 --no-structure-learning --threads 1 --name compress_minilm_distill_batch_512_lr_1.5e-3
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "low-rank global, calibrated, outputs" --distill-batch 512 --distill-lrs 1.5e-3 --no-structure-learning --threads 1 --name compress_minilm_distill_batch_512_lr_1.5e-3_lowrank
    python benchmarks/compress_minilm.py --budgets 0.5 --no-probe --methods "global, calibrated, outputs" --distill-batch 128 --distill-lrs 2e-3 --no-structure-learning --distill-embedding-weight 1.0 --threads 1 --name compress_minilm_distill_embedding
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time

import torch
from _results import monarch_dense_execution, provenance, run_metadata, selected_methods, write_results
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from gblr import io
from gblr.compress import compress_
from gblr.data import load_movie_review_polarity
from gblr.objectives import EncoderObjectives
from gblr.pretrained import embed_all, load_pretrained
from gblr.train.recovery import recover_

ALLOCATIONS = (("uniform", False), ("global", False), ("global", True))  # (allocation, calibrated)
METHODS = [  # (label, family, allocation, calibrated, fit)
    *[(f"{name} {allocation}{', calibrated' if calibrated else ''}, {fit} fit", family, allocation, calibrated, fit)
      for fit in ("weights", "outputs")
      for name, family in (("GBLR", "gblr"), ("low-rank", "lowrank"))
      for allocation, calibrated in ALLOCATIONS],
    *[(f"Monarch {allocation}{', calibrated' if calibrated else ''}, weights fit", "monarch", allocation, calibrated, "weights")
      for allocation, calibrated in ALLOCATIONS],
    # the output fit one layer group at a time, on the partly compressed model's inputs
    *[(f"{name} global, calibrated, sequential outputs fit", family, "global", True, "sequential outputs")
      for name, family in (("GBLR", "gblr"), ("low-rank", "lowrank"))],
]

RELOAD = """
import sys, torch
from gblr import io
from gblr.pretrained import load_pretrained, embed_all
torch.set_num_threads(int(sys.argv[4]))  # as in the benchmark: the thread count changes float summation order
p = load_pretrained("minilm")
io.load(sys.argv[1], p.model)
sentences = open(sys.argv[2]).read().split("\\n")
torch.save(embed_all(p.model, p.tokenizer, sentences), sys.argv[3])
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100, help="distillation steps")
    parser.add_argument("--distill-batch", type=int, default=32, help="training sentences per distillation step")
    parser.add_argument("--quick", action="store_true", help="one budget, three methods, at most 5 distillation steps (smoke run)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--no-probe", action="store_true", help="skip the MR probe (about a minute per row here)")
    parser.add_argument("--methods", nargs="+", default=["all"], help="methods whose label contains one of these, or all")
    parser.add_argument("--name", default="compress_minilm", help="results file name")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-structure-learning", action="store_true",
                        help="distil the calibrated GBLR rows with their structure frozen only (as every other row)")
    # 5e-4: the rate GBLR and low-rank both chose from 2e-4, 5e-4 and 1e-3 (compress_minilm_distill_lr)
    parser.add_argument("--distill-lrs", type=float, nargs="+", default=[5e-4],
                        help="distillation learning rates, the same for every method; with several, each method's is chosen "
                             "by the cosine on the 64 calibration sentences (training side), never on the held-out ones")
    parser.add_argument("--distill-embedding-weight", type=float, default=0.0,
                        help="weight of 1 - cosine of the pooled sentence embeddings added to the hidden states' MSE")
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 5)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    original = load_pretrained("minilm")
    tokenizer = original.tokenizer
    objectives = EncoderObjectives(original, held_out=512)
    reviews, labels = load_movie_review_polarity()

    def evaluate(model) -> dict:
        start = time.perf_counter()
        probe = None
        if not args.no_probe:
            features = embed_all(model, tokenizer, reviews).numpy()
            probe = float(cross_val_score(LogisticRegression(max_iter=2000), features, labels, cv=5).mean())
        return {"cosine": objectives.quality(model)["cosine_to_original"], "probe_accuracy": probe,
                "eval_seconds": time.perf_counter() - start}

    def distilled_rows(compressed, common: dict, learn_structure: bool) -> tuple[list[dict], torch.nn.Module]:
        """One row per distillation learning rate, each from a copy of ``compressed``; the one with the best
        calibration cosine is marked chosen. Returns the rows and the chosen model."""
        rows, best = [], None  # (row, model) of the best so far: only its copy is kept
        for lr in args.distill_lrs:
            model = copy.deepcopy(compressed)
            result = recover_(model, objectives.recovery_loss(seed=0, batch_size=args.distill_batch, embedding_weight=args.distill_embedding_weight), args.steps, lr=lr, learn_structure=learn_structure)
            rows.append({**common, "distilled": "structure learned" if learn_structure else True, "distill_lr": lr,
                         "calibration_cosine": 1 - objectives.calibration_loss(model), "distill_seconds": result.seconds,
                         "distill_loss_first": result.losses[0], "distill_loss_last": result.losses[-1],
                         "cost_after": result.cost_fraction, **evaluate(model)})
            print(rows[-1], flush=True)
            if best is None or rows[-1]["calibration_cosine"] > best[0]["calibration_cosine"]:
                best = (rows[-1], model)
        best[0]["chosen"] = True
        return rows, best[1]

    meta = run_metadata(f"2 cores, CPU, {args.threads} torch threads", distill_steps=args.steps, distill_batch=args.distill_batch, distill_lrs=args.distill_lrs,
                        distill_embedding_weight=args.distill_embedding_weight,
                        probe=not args.no_probe, held_out_sentences=len(objectives.held_out), reload_check=None,
                        input_sentences=len(objectives.input_sentences))
    name = args.name + ("_quick" if args.quick else "")

    def write(rows, allocation_rows) -> None:  # after every method too: a long run keeps what it finished
        write_results(name, meta, rows + [{"allocation_table": allocation_rows}],
                      markdown(meta, rows, allocation_rows, meta["reload_check"]))

    rows = [{"method": "original", "budget": 1.0, "distilled": False, **evaluate(original.model)}]
    print(rows[-1], flush=True)
    budgets = (0.5,) if args.quick else args.budgets
    methods = METHODS[::6] if args.quick else selected_methods(METHODS, args.methods)
    allocation_rows, saved = [], None
    for budget in budgets:
        for label, family, allocation, calibrated, fit in methods:
            model = copy.deepcopy(original.model)
            start = time.perf_counter()
            result = compress_(model, family, budget, allocation, options={"steps": 0} if family == "gblr" else None,
                               calibration_loss=objectives.calibration_loss if calibrated else None,
                               calibration_inputs=None if fit == "weights" else objectives.calibration_inputs,
                               sequential=fit == "sequential outputs")
            monarch_dense_execution(model)
            common = {"method": label, "family": family, "allocation": allocation, "calibrated": calibrated, "fit": fit,
                      "budget": budget, "reached": result.reached, "compress_seconds": time.perf_counter() - start}
            rows.append({**common, "distilled": False, **evaluate(model)})
            print(rows[-1], flush=True)
            if calibrated and family == "gblr":
                allocation_rows += [{"target": budget, "fit": fit, **a} for a in result.to_dict()["allocation"]]
                if not args.no_structure_learning:
                    rows += distilled_rows(model, common, learn_structure=True)[0]
            distilled, model = distilled_rows(model, common, learn_structure=False)
            rows += distilled
            if calibrated and family == "gblr" and saved is None:
                saved = (model, result)
            write(rows, allocation_rows)
    meta["reload_check"] = check_reload(saved[0], tokenizer, objectives.held_out[:64], saved[1]) if saved else None
    write(rows, allocation_rows)


def check_reload(model, tokenizer, sentences, result) -> dict:
    """save, then load into a freshly loaded MiniLM in another process: embeddings must be identical."""
    with tempfile.TemporaryDirectory() as tmp:
        io.save(model, f"{tmp}/saved", config=result.to_dict(), base_model="minilm")
        with open(f"{tmp}/sentences.txt", "w") as f:
            f.write("\n".join(sentences))
        subprocess.run([sys.executable, "-c", RELOAD, f"{tmp}/saved", f"{tmp}/sentences.txt", f"{tmp}/out.pt", str(torch.get_num_threads())], check=True)
        reloaded = torch.load(f"{tmp}/out.pt")
    with torch.no_grad():
        here = embed_all(model, tokenizer, sentences)
    difference = float((reloaded - here).abs().max())
    print(f"save -> load in a fresh process: max |difference| = {difference}", flush=True)
    return {"sentences": len(sentences), "max_abs_difference": difference}


def markdown(meta, rows, allocation_rows, reload_check) -> list[str]:
    lrs = meta.get("distill_lrs", [2e-4])
    lines = ["# Compressing all-MiniLM-L6-v2", "", provenance(meta), "",
             f"Distillation: {meta['distill_steps']} steps of {meta.get('distill_batch', 32)} Shakespeare training sentences, AdamW, "
             "MSE to the original's hidden states after every layer"
             + (f" plus {meta['distill_embedding_weight']:g} x (1 - cosine of the pooled sentence embeddings)"
                if meta.get("distill_embedding_weight") else "") + ", no dropout; "
             + (f"learning rate {lrs[0]:g}. " if len(lrs) == 1 else
                f"learning rates {', '.join(f'{lr:g}' for lr in lrs)} for every method, each method's chosen (marked) by "
                "its cosine on the 64 calibration sentences (training side). ")
             + "Cosine: mean over "
             f"{meta['held_out_sentences']} held-out Shakespeare sentences. "
             + ("Probe: 5-fold CV logistic regression on the 4000 MR sentences. " if meta["probe"] else
                "The MR probe was not run (`--no-probe`). ")
             + f"Output fits use each layer's inputs on {meta.get('input_sentences', 256)} training sentences. Monarch layers run through their effective dense weight (the same function; "
             "their tiny block products are 10-20x slower than dense here).", "",
             "| method | budget | reached cost | distilled | distill lr | calibration cosine | cosine to original | MR probe accuracy | compress s | distill s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        distilled = {False: "no", True: "yes", "structure learned": "yes, structure learned"}[r["distilled"]]
        if r.get("chosen") and len(lrs) > 1:
            distilled += " (chosen)"
        lr = f"{r.get('distill_lr', lrs[0]):g}" if r["distilled"] else "-"
        validation = f"{r['calibration_cosine']:.4f}" if "calibration_cosine" in r else "-"
        probe = "-" if r["probe_accuracy"] is None else f"{r['probe_accuracy']:.4f}"
        lines.append(f"| {r['method']} | {r['budget']:.1f} | {r.get('reached', 1.0):.3f} | {distilled} | {lr} | {validation} | {r['cosine']:.4f} | "
                     f"{probe} | {r.get('compress_seconds', 0):.1f} | {r.get('distill_seconds', 0):.0f} |")
    lines += gains_table(rows, len(lrs) > 1)
    if reload_check:
        lines += ["", f"Save -> load in a fresh process (GBLR global calibrated, distilled, {reload_check['sentences']} "
                  f"sentences): max |embedding difference| = {reload_check['max_abs_difference']}."]
    if allocation_rows:
        lines += ["", "## Per-layer allocation (GBLR, global budget calibrated on the embedding loss)", "",
                  "Errors are of the weights (weights fit) or of the layer's outputs on the calibration sentences (outputs fit).", "",
                  "| target | fit | layer | in | out | uniform-budget error | allocated budget | error at allocated budget | sensitivity |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for a in allocation_rows:
            lines.append(f"| {a['target']:.1f} | {a['fit']} | {a['name']} | {a['in_features']} | {a['out_features']} | {a['uniform_error']:.4f} | "
                         f"{a['budget']:.2f} | {a['relative_error']:.4f} | {a['sensitivity']:.3g} |")
    return lines


def gains_table(rows: list[dict], tuned: bool) -> list[str]:
    """The same rows as family x fit against allocation, so that the gain of the fit (down a column) and of
    the allocation (along a row) read apart: cosine without / with distillation (frozen structure)."""
    names = {"gblr": "GBLR", "lowrank": "low-rank", "monarch": "Monarch"}
    columns = {("uniform", False): "uniform", ("global", False): "global", ("global", True): "global, calibrated"}
    cells: dict = {}
    for r in rows:
        if "family" not in r or (r["distilled"] is True and tuned and not r.get("chosen")):
            continue  # the original, and distillations at learning rates not chosen
        if r["distilled"] not in (False, True):
            continue  # structure learned during distillation: a separate question
        key = (r["budget"], names[r["family"]], r["fit"])
        cells.setdefault(key, {}).setdefault(columns[(r["allocation"], r["calibrated"])], {})[r["distilled"]] = r["cosine"]
    lines = []
    for budget in dict.fromkeys(key[0] for key in cells):
        lines += ["", f"Cosine to the original at budget {budget:g}, without / with distillation:", "",
                  "| family | fit | " + " | ".join(columns.values()) + " |", "|---|---|" + "---:|" * len(columns)]
        for (b, family, fit), by_column in cells.items():
            if b == budget:
                text = [" / ".join("-" if by_column.get(c, {}).get(d) is None else f"{by_column[c][d]:.3f}" for d in (False, True))
                        if c in by_column else "" for c in columns.values()]
                lines.append(f"| {family} | {fit} | " + " | ".join(text) + " |")
    return lines


if __name__ == "__main__":
    main()
