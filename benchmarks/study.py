"""The evidence study: quality against cost for every structured family on several tasks, over seeds.

    .venv/bin/python benchmarks/study.py                          # every task, the whole grid (hours; resumable)
    .venv/bin/python benchmarks/study.py --tasks fmnist-vit --seeds 0   # a piece of it
    .venv/bin/python benchmarks/study.py --report                 # only rewrite the results from finished runs

Protocol, the same for every family (written into the results):
1. Tuning: on each task, every family is trained at budget 0.3 (dense at 1.0) with seed 0 and each of the
   same learning rates; the one with the best validation metric is that family's learning rate for the
   whole task. Nothing else is tuned; the recipe (model, data, epochs, schedule) is the task's for all.
   While any family's choice sits at the top of the rates, one more rate is added for every family on
   every task; seeds run at a rate that is no longer a family's choice are left out of the results.
2. Grid: dense, GBLR and low-rank at every budget with every seed; the other families at 0.3 with every seed.
   Ablations of GBLR's structure learner (the paper's fixed-lambda mean-width rule, a sensitivity-weighted
   and a per-layer budget split) at 0.3 with every seed and GBLR's learning rate.
3. The test split is evaluated once per run, at its end, and is never used to choose anything.
4. Monarch and Pixelfly layers train through their dense weight (the same function and gradients; their
   small block products are several times slower on CPU), so their training times are not their speed.

Every (task, family, budget, lr, seed) is one `gblr train` run under --runs: finished runs are skipped and
interrupted ones resumed, so the grid can be run in pieces, on a CPU or (--device cuda) a GPU. Writes
benchmarks/results/study.json (rows and protocol), study.md (per task: mean ± std over seeds and FLOPs per
example) and study_TASK.png (left: metric against FLOPs per example for the families trained at every budget,
dense as a line; right: every family and ablation at 0.3, best first; error bars: std over seeds).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import statistics
import time
from pathlib import Path

from _grid import Diverged, diverged_note, mean_and_spread, metric_text, run_row, train_run
from _results import RESULTS, provenance, run_metadata, write_results

#: task -> (base config, the task's recipe as overrides, what it is). Sized so that the CPU grid runs
#: across a few sessions; where a GPU is lent, larger recipes can be run with --recipe overrides.
TASKS = {
    "fmnist-vit": ("configs/fmnist-vit-small-dense.toml", ["data.limit=20000", "train.epochs=3"],
                   "ViT (dim 128, depth 4) on 20,000 Fashion-MNIST images, 3 epochs; q, k, v, fc1, fc2 structured"),
    "fmnist-mixer": ("configs/fmnist-mixer-dense.toml",
                     ["model.dim=128", "model.depth=4", "data.limit=20000", "train.epochs=3"],
                     "MLP-Mixer (dim 128, depth 4) on 20,000 Fashion-MNIST images, 3 epochs; token and channel MLPs structured"),
    "shakespeare-gpt": ("configs/shakespeare-gpt-dense.toml", ["model.dim=128", "model.context=128", "train.max_steps=1000"],
                        "GPT (dim 128, depth 4, context 128) on Shakespeare characters, 1000 steps of 32 windows; "
                        "q, k, v, fc1, fc2 structured; its validation split is also the reported one"),
}
#: family -> overrides (the budget is added per run).
FAMILIES = {
    "dense": ['structure.family="dense"'],
    "gblr": ['structure.family="gblr"'],
    "gblr-hw": ['structure.family="gblr"', "structure.rank=16", "structure.tile=16"],
    "lowrank": ['structure.family="lowrank"'],
    # The same function through the dense weight: their small block products run 4-7x slower on CPU
    # (train_seconds of these rows are therefore not their structured speed).
    "monarch": ['structure.family="monarch"', "structure.dense_execution=true"],
    "blast": ['structure.family="blast"'],
    "pixelfly": ['structure.family="pixelfly"', "structure.dense_execution=true"],
    "blockdiag": ['structure.family="blockdiag"'],
}
#: ablations of GBLR's structure learner -> overrides on top of GBLR's; run at TUNING_BUDGET with every
#: seed and GBLR's tuned learning rate (they change how widths are steered, nothing the lr is tuned for).
ABLATIONS = {
    # the paper's rule: a fixed threshold (lambda 1) on every width while the mean width is above
    # budget x its start; the FLOPs it reaches are observed, not controlled
    "gblr-meanwidth": ['structure.controller="mean_width"', "structure.l1=1.0"],
    # our FLOPs controller, each layer's threshold divided by its relative width-gradient RMS
    "gblr-sensitivity": ['structure.allocation="sensitivity"'],
    # our FLOPs controller, every layer held to the budget
    "gblr-per-layer": ['structure.allocation="per_layer"'],
}
#: the split each task reports (the GPT recipe has no separate test split) and its metric
REPORTED_SPLIT = {"fmnist-vit": "test", "fmnist-mixer": "test", "shakespeare-gpt": "validation"}
METRIC = {"fmnist-vit": "accuracy", "fmnist-mixer": "accuracy", "shakespeare-gpt": "loss"}
EVERY_BUDGET = ("dense", "gblr", "lowrank")  # the others run at TUNING_BUDGET only
BUDGETS = (0.1, 0.2, 0.3, 0.5)
SEEDS = (0, 1, 2)
TUNING_BUDGET = 0.3
#: shared by every family and task. First run as (5e-4, 1e-3, 2e-3): 5e-4 was the worst for every family
#: and 2e-3, the edge, the best for all of them on fmnist-vit; then as (1e-3, 2e-3, 4e-3), where 4e-3, the
#: edge again, won for low-rank; then up to 8e-3, the edge again for Monarch and BLAST; then up to 1.6e-2,
#: the edge again for Monarch on the Mixer and low-rank on GPT; then up to 3.2e-2, the edge again for
#: Monarch on the Mixer; then up to 6.4e-2, the edge again for block-diagonal on GPT. The grid grows
#: upwards, for every family on every task alike, until no family's choice sits at its top.
LEARNING_RATES = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1)


def run_directory(runs: Path, task: str, family: str, budget: float, lr: float, seed: int) -> Path:
    return runs / task / f"{family}-b{budget:g}-lr{lr:g}-s{seed}"


def run(runs: Path, task: str, family: str, budget: float, lr: float, seed: int, extra: list[str]) -> dict:
    config, recipe, _ = TASKS[task]
    structure = FAMILIES["gblr"] + ABLATIONS[family] if family in ABLATIONS else FAMILIES[family]
    overrides = [*recipe, *structure, f"structure.budget={budget}", f"train.lr={lr}", f"train.seed={seed}", *extra]
    try:
        report, command = train_run(run_directory(runs, task, family, budget, lr, seed), config, overrides)
    except Diverged as error:  # a row without a metric: never chosen in tuning, left out of every mean
        return {"task": task, "study_family": family, "budget": budget, "seed": seed, "lr": lr, "metric": METRIC[task],
                "value": None, "best_validation": None, "diverged": str(error), "command": error.command}
    return run_row(report, command, task=task, study_family=family)


def better(metric: str, a: float, b: float) -> bool:
    return a > b if metric == "accuracy" else a < b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS),
                        help="what to train now (the results always include every finished run)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS),
                        help="ablations of GBLR's learner (run once GBLR's tuning is done)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--runs", default="runs/study")
    parser.add_argument("--device", default="cpu", help="train.device of every run")
    parser.add_argument("--report", action="store_true", help="no training: rewrite the results from finished runs")
    parser.add_argument("--overrides", nargs="*", default=[], help="section.field=value after every task's recipe")
    parser.add_argument("--name", default="study", help="results file name (benchmarks/results/NAME.*)")
    parser.add_argument("--readme", action="store_true",
                        help="also rewrite the README's study summary (between its study markers) from the results")
    args = parser.parse_args()
    runs, extra = Path(args.runs), [f'train.device="{args.device}"', *args.overrides]
    args.saved = committed_rows(args.name)
    rows, tuning, all_trials = [], {}, []
    # Results always cover every finished or committed run; the options only choose what is trained now.
    all_budgets, all_seeds = sorted(set(BUDGETS) | set(args.budgets)), sorted(set(SEEDS) | set(args.seeds))

    def save_if_new(trained_now: bool) -> None:
        """Write the results after every run trained now: a stopped process loses no finished run."""
        if trained_now:
            write(args, rows, tuning, all_trials)
    for task in TASKS:
        for family in FAMILIES:
            chosen_family = task in args.tasks and family in args.families
            budget = 1.0 if family == "dense" else TUNING_BUDGET
            trials = []
            for lr in LEARNING_RATES:
                row, trained_now = collect(args, runs, task, family, budget, lr, 0, extra, chosen_family)
                if row is not None:
                    trials.append(row)
                    all_trials.append(row)
                    save_if_new(trained_now)
            if len(trials) < len(LEARNING_RATES):
                continue  # tuning not finished: no grid for this family yet
            finished = [trial for trial in trials if trial["best_validation"] is not None]
            if not finished:
                raise SystemExit(f"{task}/{family}: training diverged at every learning rate")
            chosen = finished[0]
            for trial in finished[1:]:
                if better(trial["metric"], trial["best_validation"], chosen["best_validation"]):
                    chosen = trial
            tuning[f"{task}/{family}"] = {"lr": chosen["lr"], "validation": {t["lr"]: t["best_validation"] for t in trials}}
            budgets = [1.0] if family == "dense" else (all_budgets if family in EVERY_BUDGET else [TUNING_BUDGET])
            for budget in budgets:
                for seed in all_seeds:
                    wanted = chosen_family and (budget in args.budgets or budget in (1.0, TUNING_BUDGET)) and seed in args.seeds
                    row, trained_now = collect(args, runs, task, family, budget, chosen["lr"], seed, extra, wanted)
                    if row is not None:
                        rows.append(row)
                        save_if_new(trained_now)
        if f"{task}/gblr" in tuning:
            for ablation in ABLATIONS:
                for seed in all_seeds:
                    wanted = task in args.tasks and ablation in args.ablations and seed in args.seeds
                    row, trained_now = collect(args, runs, task, ablation, TUNING_BUDGET, tuning[f"{task}/gblr"]["lr"],
                                               seed, extra, wanted)
                    if row is not None:
                        rows.append(row)
                        save_if_new(trained_now)
    write(args, rows, tuning, all_trials)


def committed_rows(name: str) -> dict:
    """Rows of the results file already written, by run: a run whose directory is gone (another machine,
    a clean checkout) keeps its committed row instead of being trained again or dropped."""
    path = RESULTS / f"{name}.json"
    saved = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}
    rows = saved["rows"] + saved["meta"].get("trials", [])
    return {_key(r): r for r in rows}


def collect(args, runs, task, family, budget, lr, seed, extra, wanted: bool) -> tuple[dict | None, bool]:
    """The row of one run: its committed row when its directory is gone, else its report when finished,
    else trained now if ``wanted`` and not --report (else None); and whether it was trained now."""
    directory = run_directory(runs, task, family, budget, lr, seed)
    finished = (directory / "report.json").exists()
    saved = args.saved.get((task, family, budget, lr, seed))
    if saved is not None and not finished and not directory.exists():
        return saved, False
    if not finished and (args.report or not wanted):
        return None, False
    start = time.perf_counter()
    row = run(runs, task, family, budget, lr, seed, extra)
    if not args.report:
        outcome = "diverged" if row["value"] is None else f"{row['metric']} {row['value']:.4f}"
        print(f"{task} {family} budget {budget:g} lr {lr:g} seed {seed}: {outcome} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return row, not finished


def write(args, rows: list[dict], tuning: dict, trials: list[dict]) -> None:
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    with open(Path(args.runs) / f".{args.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time
        _write(args, *_with_other_writers(args.name, rows, tuning, trials))


def _with_other_writers(name: str, rows: list[dict], tuning: dict, trials: list[dict]) -> tuple:
    """The rows, tunings and trials of the results file that this process does not have: several study
    processes (e.g. one per task, side by side) write the same file, and none may drop another's runs."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return rows, tuning, trials
    saved = json.loads(path.read_text())
    mine_rows, mine_trials = {_key(r) for r in rows}, {_key(r) for r in trials}
    rows = rows + [r for r in saved["rows"] if _key(r) not in mine_rows]
    trials = trials + [r for r in saved["meta"].get("trials", []) if _key(r) not in mine_trials]
    order = list(TASKS)
    rows.sort(key=lambda r: order.index(r["task"]))  # stable: each task's rows keep their order
    trials.sort(key=lambda r: order.index(r["task"]))
    tuning = {**saved["meta"].get("tuning", {}), **tuning}
    return [r for r in rows if _at_chosen_rate(r, tuning)], tuning, trials


def _at_chosen_rate(row: dict, tuning: dict) -> bool:
    """Whether ``row`` ran at its family's tuned learning rate (GBLR's for the ablations): when a larger
    grid moves the choice, the seeds run at the old rate are superseded, not averaged in."""
    family = "gblr" if row["study_family"] in ABLATIONS else row["study_family"]
    chosen = tuning.get(f"{row['task']}/{family}")
    return chosen is None or chosen["lr"] == row["lr"]


def _key(row: dict) -> tuple:
    return row["task"], row["study_family"], row["budget"], row["lr"], row["seed"]


def _write(args, rows: list[dict], tuning: dict, trials: list[dict]) -> None:
    meta = run_metadata(f"device {args.device}", overrides=args.overrides, protocol=" ".join(__doc__.split("results):")[1].split("\n\nEvery")[0].split()),
                        learning_rates=list(LEARNING_RATES), tuning=tuning, trials=trials,
                        tasks={task: {"config": c, "recipe": r, "about": a} for task, (c, r, a) in TASKS.items()})
    lines = ["# The evidence study: quality against cost", "", provenance(meta), "",
             "Protocol, the same for every family: " + meta["protocol"], "",
             "The grid is run in pieces (one process per task, across sessions and machines); every row keeps "
             "its own `gblr train` command in the JSON, and `python benchmarks/study.py` resumes or reruns all of it.", ""]
    measured, diverged = [r for r in rows if r["value"] is not None], _diverged(rows, trials)
    for task in dict.fromkeys(r["task"] for r in measured):
        mine = [r for r in measured if r["task"] == task]
        metric = mine[0]["metric"]
        lines += [f"## {task}", "", TASKS[task][2] + ".", "",
                  f"| family | lr | budget | structured cost | FLOPs / example | {REPORTED_SPLIT[task]} {metric} (mean ± std) | seeds |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for (family, budget), group in _groups(mine).items():
            lines.append(f"| {family} | {group[0]['lr']:g} | {budget:g} | "
                         f"{statistics.mean(r['structured_fraction'] for r in group):.3f} | "
                         f"{round(statistics.mean(r['flops_per_example'] for r in group)):,} | "
                         f"{metric_text(metric, [r['value'] for r in group])} | {len(group)} |")
        if diverged.get(task):
            lines += ["", diverged[task]]
        picture = pareto_picture(f"{args.name}_{task}", task, mine)
        lines += ["", f"![{task}]({picture.name})" if picture else "", ""]
    write_results(args.name, meta, rows, lines)
    if args.readme:
        replace_readme_block(summary(measured, meta, args.name, diverged))


def _diverged(rows: list[dict], trials: list[dict]) -> dict[str, str]:
    """Per task, a sentence naming the runs whose training diverged (they have no metric)."""
    runs = dict.fromkeys(_key(r) for r in [*trials, *rows] if r["value"] is None)
    text: dict[str, list[str]] = {}
    for task, family, budget, lr, seed in runs:
        text.setdefault(task, []).append(f"{family} at {budget:g}, lr {lr:g}, seed {seed}")
    return {task: diverged_note(names) for task, names in text.items()}


README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = ("<!-- study summary: generated by benchmarks/study.py --report --readme -->", "<!-- end of study summary -->")


def summary(rows: list[dict], meta: dict, name: str, diverged: dict[str, str]) -> list[str]:
    """The README's study summary: per task, mean ± std over seeds by family and budget, and the
    targets' verdicts, all computed from the rows."""
    lines = [f"Quality at equal cost (`.venv/bin/python benchmarks/study.py`, `benchmarks/results/{name}.md`; "
             f"{meta['date'][:10]}, {meta['machine']}). Every family's learning rate was tuned on seed 0's "
             f"validation split from the same {len(meta['learning_rates'])} values "
             f"({', '.join(f'{lr:g}' for lr in meta['learning_rates'])}); reported metrics are mean ± std over seeds; budgets are "
             "fractions of the structured layers' FLOPs.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        metric = mine[0]["metric"]
        groups = _groups(mine)
        budgets = sorted({b for (_, b) in groups})
        lines += [f"**{task}**: {TASKS[task][2]}; {REPORTED_SPLIT[task]} {metric}.", "",
                  "| family \\ budget | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
        for family in dict.fromkeys(f for f, _ in groups):
            cells = []
            for b in budgets:
                group = groups.get((family, b), [])
                cell = metric_text(metric, [r["value"] for r in group]) + f" ({len(group)})" if group else ""
                if group and family in ABLATIONS:  # they may reach another cost than the budget
                    cell += f", cost {statistics.mean(r['structured_fraction'] for r in group):.2f}"
                cells.append(cell)
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        lines += ["", "Targets: " + "; ".join(verdicts(task, metric, groups, budgets)) + "."]
        compared = ablations_against_gblr(metric, groups)
        if compared:
            lines.append(compared)
        at_edge = [key.split("/")[1] for key, t in meta["tuning"].items()
                   if key.startswith(f"{task}/") and t["lr"] in (min(meta["learning_rates"]), max(meta["learning_rates"]))]
        if at_edge:  # the best rate may lie outside the tried ones
            lines.append(f"The chosen learning rate is at the edge of the tried ones for: {', '.join(at_edge)}.")
        untried = {key.split("/")[1]: [f"{lr:g}" for lr in meta["learning_rates"] if lr not in map(float, t["validation"])]
                   for key, t in meta["tuning"].items() if key.startswith(f"{task}/")}
        untried = {family: lrs for family, lrs in untried.items() if lrs}
        if untried:  # the grid grew after these families were tuned: their rows may still change
            lines.append("Tuning not finished (learning rates not tried yet): "
                         + "; ".join(f"{family} {', '.join(lrs)}" for family, lrs in untried.items()) + ".")
        missing = [family for family in [*FAMILIES, *ABLATIONS] if not any(r["study_family"] == family for r in mine)]
        if missing:
            lines.append(f"Not measured yet: {', '.join(missing)}.")
        if diverged.get(task):
            lines.append(diverged[task])
        picture = RESULTS / f"{name}_{task}.png"
        lines += ["", f"![{task}: {metric} against FLOPs per example]({picture.relative_to(README.parent)})" if picture.exists() else "", ""]
    return lines


def verdicts(task: str, metric: str, groups: dict, budgets: list[float]) -> list[str]:
    """GBLR's mean against every other family at every budget, and the task's own target against dense."""
    mean = {key: statistics.mean(r["value"] for r in group) for key, group in groups.items()}
    losses = []
    for (family, budget), value in mean.items():
        if family in FAMILIES and family not in ("dense", "gblr") and ("gblr", budget) in mean:
            if better(metric, value, mean[("gblr", budget)]):
                losses.append(f"{family} at {budget:g}")
    compared = sum(1 for (f, b) in mean if f in FAMILIES and f not in ("dense", "gblr") and ("gblr", b) in mean)
    if not compared:
        out = ["no structured family to compare with GBLR yet"]
    elif not losses:
        out = [f"GBLR's mean is the best at every measured budget ({_count(compared, 'comparison')} with other families)"]
    else:
        out = [f"GBLR's mean is beaten by {', '.join(losses)} (of {_count(compared, 'comparison')} with other families)"]
    dense = mean.get(("dense", 1.0))
    if dense is not None and task == "fmnist-vit" and ("gblr", 0.3) in mean:
        gap = 100 * (dense - mean[("gblr", 0.3)])
        where = f"{gap:.2f} points below" if gap > 0 else f"{-gap:.2f} points above"
        out.append(f"GBLR at 0.3 is {where} dense (target: within 0.5: {'met' if gap <= 0.5 else 'missed'})")
    if dense is not None and task == "shakespeare-gpt" and ("gblr", 0.5) in mean:
        gap = mean[("gblr", 0.5)] - dense
        out.append(f"GBLR at 0.5 has {gap:+.4f} validation loss against dense (target: no worse: {'met' if gap <= 0 else 'missed'})")
    return out


def ablations_against_gblr(metric: str, groups: dict) -> str:
    """Each measured ablation's mean at the tuning budget against GBLR's (our FLOPs controller with one
    cost-weighted threshold), as a difference of means; "better" or "worse" only where the difference
    exceeds the larger standard deviation over seeds of the two."""
    gblr = groups.get(("gblr", TUNING_BUDGET))
    if not gblr:
        return ""
    base, base_spread = mean_and_spread([r["value"] for r in gblr])
    parts = []
    for ablation in ABLATIONS:
        group = groups.get((ablation, TUNING_BUDGET))
        if group:
            value, value_spread = mean_and_spread([r["value"] for r in group])
            difference = f"{100 * (value - base):+.2f} points" if metric == "accuracy" else f"{value - base:+.4f} loss"
            spread = max((s for s in (base_spread, value_spread) if not math.isnan(s)), default=0.0)
            verdict = ("within the seeds' spread" if abs(value - base) <= spread
                       else "better" if better(metric, value, base) else "worse")
            parts.append(f"{ablation} {difference} ({verdict}; {_count(len(group), 'seed')})")
    return f"Ablations at {TUNING_BUDGET:g} against GBLR's mean: " + "; ".join(parts) + "." if parts else ""


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def replace_readme_block(lines: list[str]) -> None:
    text = README.read_text()
    begin, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if begin < 0 or end < begin:
        raise SystemExit(f"{README} has no study summary markers; add {MARKERS[0]!r} and {MARKERS[1]!r}")
    README.write_text(text[: begin + len(MARKERS[0])] + "\n" + "\n".join(lines) + "\n" + text[end:])


def _groups(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["study_family"], r["budget"]), []).append(r)
    order = list(FAMILIES) + list(ABLATIONS)
    return dict(sorted(groups.items(), key=lambda item: (order.index(item[0][0]), item[0][1])))


def pareto_picture(name: str, task: str, rows: list[dict]) -> Path | None:
    """Left: metric against FLOPs per example for the families trained at every budget (dense as a line
    with its spread). Right: every family and ablation at the tuning budget, best first. Mean ± std over seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = rows[0]["metric"]
    points: dict = {}  # family -> [(MFLOPs, mean, std, budget)]
    for (family, budget), group in _groups(rows).items():
        mean, spread = mean_and_spread([r["value"] for r in group])
        flops = statistics.mean(r["flops_per_example"] for r in group) / 1e6
        points.setdefault(family, []).append((flops, mean, 0.0 if spread != spread else spread, budget))
    figure, (curves, at_budget) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    colors = dict(zip([*FAMILIES, *ABLATIONS], [*plt.get_cmap("tab10").colors, "black"]))
    for family, found in points.items():
        found.sort()
        if family == "dense":
            _, mean, spread, _ = found[0]
            curves.axhline(mean, color=colors[family], linestyle="--", label=f"dense ({found[0][0]:.0f} MFLOPs)")
            curves.axhspan(mean - spread, mean + spread, color=colors[family], alpha=0.15)
        elif family in EVERY_BUDGET:
            curves.errorbar([p[0] for p in found], [p[1] for p in found], yerr=[p[2] for p in found], marker="o",
                            capsize=3, color=colors[family], label=family)
    curves.set_xlabel("MFLOPs per example")
    curves.set_ylabel(f"{REPORTED_SPLIT[task]} {metric}")
    curves.set_title(f"{task}: every budget")
    curves.legend(fontsize=8)
    shown = [(family, p) for family, found in points.items() for p in found if p[3] in (TUNING_BUDGET, 1.0)]
    shown.sort(key=lambda item: item[1][1], reverse=metric == "accuracy")  # best first
    for y, (family, (_, mean, spread, _)) in enumerate(shown):
        at_budget.errorbar(mean, y, xerr=spread, marker="o" if family in FAMILIES else "s", capsize=3,
                           color=colors[family], markerfacecolor="white" if family in ABLATIONS else colors[family])
    at_budget.set_yticks(range(len(shown)), [f"{family} (ablation)" if family in ABLATIONS else family for family, _ in shown],
                         fontsize=8)
    at_budget.invert_yaxis()
    at_budget.set_xlabel(f"{REPORTED_SPLIT[task]} {metric}")
    at_budget.set_title(f"budget {TUNING_BUDGET:g} (dense: 1)")
    at_budget.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
