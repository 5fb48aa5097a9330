"""What the grid benchmarks share: one `gblr train` run per directory, skipped when finished and resumed
when interrupted, summarised as a row; mean and spread over seeds."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from gblr.cli import EXIT_DIVERGED


DIVERGED = "diverged.txt"  # in a run's directory: the trainer's message; the run is not retried


class Diverged(RuntimeError):
    """A run whose training diverged (its trainer stopped on a non-finite loss or parameter)."""

    def __init__(self, message: str, command: str) -> None:
        super().__init__(message)
        self.command = command


def train_run(out: Path, config: str, overrides: list[str], init_from: Path | None = None) -> tuple[dict, str]:
    """The report of the run in ``out`` (trained now unless finished) and the command that trains it;
    :class:`Diverged` if its training diverged (now or before: resuming would only diverge again)."""
    command = [sys.executable, "-m", "gblr.cli", "train", config, *overrides, "--out", str(out), "--quiet"]
    if init_from is not None:
        command += ["--init-from", str(init_from)]
    shown = " ".join(["gblr", *command[3:]])
    if (out / DIVERGED).exists():
        raise Diverged((out / DIVERGED).read_text().strip(), shown)
    if not (out / "report.json").exists():
        if out.is_dir() and {p.name for p in out.iterdir()} <= {"tensorboard"}:
            shutil.rmtree(out)  # a run stopped before its first checkpoint: only its logs to drop
        resume = ["--resume"] if (out / "checkpoint.json").exists() else []
        result = subprocess.run(command + resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode:
            sys.stderr.write(result.stderr)
            message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
            if result.returncode == EXIT_DIVERGED:
                (out / DIVERGED).write_text(message + "\n")
                raise Diverged(message, shown)
            raise subprocess.CalledProcessError(result.returncode, result.args)
    return json.loads((out / "report.json").read_text()), shown


def diverged_note(runs: list[str]) -> str:
    """The sentence under a table naming the runs left out of it because their training diverged."""
    return f"Diverged (the trainer stopped on a non-finite loss; no metric, left out): {'; '.join(runs)}."


def run_row(report: dict, command: str, **labels) -> dict:
    """One run as a row: its labels, test metric, best validation metric, cost and time."""
    metric, value = next(iter(report["test"].items()))
    larger_is_better = metric == "accuracy"
    validation = [h[metric] for h in report["history"] if metric in h]
    best = (max if larger_is_better else min)(validation) if validation else None
    return {**labels, "family": report["config"]["structure"]["family"], "budget": report["budget_target"],
            "seed": report["config"]["train"]["seed"], "lr": report["config"]["train"]["lr"],
            "metric": metric, "value": value, "best_validation": best, "epochs": report["config"]["train"]["epochs"],
            "flops_per_example": report["flops_per_example"], "structured_fraction": report["structured_fraction"],
            "effective_parameters": report["effective_parameters"], "train_seconds": report["wall_seconds"],
            "command": command}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def metric_text(metric: str, values: list[float]) -> str:
    """Mean ± standard deviation over seeds; the mean alone for one seed (no spread to show)."""
    mean, spread = mean_and_spread(values)
    scale, digits, unit = (100, 2, " %") if metric == "accuracy" else (1, 4, "")
    spread_text = f" ± {scale * spread:.{digits}f}" if len(values) > 1 else ""
    return f"{scale * mean:.{digits}f}{spread_text}{unit}"
