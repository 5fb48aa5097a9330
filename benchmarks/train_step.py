"""Cost of one training step with GBLR layers against the same model dense and low-rank: ATen operations
per step, host-device synchronisations, and time.

    .venv/bin/python benchmarks/train_step.py                       # CPU: small ViT, fp32
    python benchmarks/train_step.py --device cuda --models small vit-384 --precisions fp32 bf16

Every family runs the trainer's own step (gblr.step.training_step: fused AdamW, clipping, schedule
and, for GBLR, the structure learner with its batched masks) on the same images. GBLR layers start at
full cost (as in training from scratch) with the learner holding a 0.3 budget; low-rank layers are
built at 0.3. Operations are counted with a dispatch-mode counter (the count is the same on every
device) in the learner's ramp and holding phases, the larger is reported. Times are medians over
interleaved repeats in this process, after warm-up, in the holding phase. On CUDA the steps also run
under ``torch.cuda.set_sync_debug_mode("error")``. Writes benchmarks/results/train_step_{cpu,cuda}.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _results import device_note, provenance, run_metadata, synchronize, write_results

from gblr.convert import ConvertConfig, convert_
from gblr.device import check_precision, resolve_device
from gblr.learn import SigmaSchedule, StructureLearner
from gblr.models import ViT, paper_filter
from gblr.profiling import count_ops
from gblr.step import make_optimizer, training_step

MODELS = {
    "small": {"image": 28, "channels": 1, "dim": 128, "depth": 4, "heads": 4, "batch": 128},
    "vit-384": {"image": 32, "channels": 3, "dim": 384, "depth": 12, "heads": 6, "batch": 256},
}
FAMILIES = ("dense", "lowrank", "gblr")
TOTAL_STEPS = 1000


class Run:
    """One model of one family with its optimizer, schedule and learner, and a fixed batch."""

    def __init__(self, family: str, spec: dict, device: torch.device, precision: str) -> None:
        torch.manual_seed(0)
        self.model = ViT(spec["image"], 4, spec["channels"], 10, dim=spec["dim"], depth=spec["depth"], heads=spec["heads"])
        if family != "dense":
            budget = 1.0 if family == "gblr" else 0.3
            convert_(self.model, ConvertConfig(family, budget, init="random"), paper_filter)
        self.model.to(device)
        self.optimizer = make_optimizer(self.model, 1e-3, 0.05, 5e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: 1.0)
        self.learner = None
        if family == "gblr":
            self.learner = StructureLearner(self.model, self.optimizer, 0.3, TOTAL_STEPS, ramp=(0.05, 0.5),
                                            sigma=SigmaSchedule(1.0, 100.0, 0, int(0.8 * TOTAL_STEPS)))
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(spec["batch"], spec["channels"], spec["image"], spec["image"], generator=generator).to(device)
        self.y = torch.randint(0, 10, (spec["batch"],), generator=generator).to(device)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.device, self.precision = device, precision

    def step(self) -> None:
        training_step(lambda: F.cross_entropy(self.model(self.x), self.y), self.optimizer, self.scheduler,
                      self.learner, self.parameters, 1.0, self.device, self.precision)

    def hold(self) -> None:
        """Move the learner to its holding phase (two controller passes per step: the heavier one)."""
        if self.learner is not None:
            self.learner.step_count = max(self.learner.step_count, TOTAL_STEPS // 2)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def host_syncs(run: Run, steps: int = 3) -> str:
    """'none' if ``steps`` steps run under the CUDA sync debug mode 'error', else the error's first line."""
    if run.device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            run.step()
        synchronize(run.device)
        return "none"
    except RuntimeError as error:
        return str(error).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def measure(model_name: str, device: torch.device, precision: str, repeats: int) -> dict:
    runs = {family: Run(family, MODELS[model_name], device, precision) for family in FAMILIES}
    ops, learner_ops = {}, None
    for family, run in runs.items():
        for _ in range(3):  # warm-up (the learner's first step builds its constants)
            run.step()
        ramp = count_ops(run.step).total
        run.hold()
        run.step()
        ops[family] = max(ramp, count_ops(run.step).total)
        if run.learner is not None:
            learner_ops = count_ops(run.learner.step).total
    syncs = {family: host_syncs(run) for family, run in runs.items()}
    times = {family: [] for family in FAMILIES}
    for _ in range(repeats):
        for family, run in runs.items():
            times[family].append(timed(run.step, device))
    gblr = runs["gblr"]
    learner_times = [timed(gblr.learner.step, device) for _ in range(repeats)]
    ratio = statistics.median(g / d for g, d in zip(times["gblr"], times["dense"]))
    ratio_lowrank = statistics.median(g / d for g, d in zip(times["gblr"], times["lowrank"]))
    row = {
        "model": model_name, "precision": precision, "batch": MODELS[model_name]["batch"],
        "ops": ops, "ops_ratio_gblr_dense": ops["gblr"] / ops["dense"], "learner_ops": learner_ops,
        "step_ms": {f: 1e3 * statistics.median(t) for f, t in times.items()},
        "time_ratio_gblr_dense": ratio, "time_ratio_gblr_lowrank": ratio_lowrank,
        "learner_ms": 1e3 * statistics.median(learner_times), "host_syncs": syncs,
        "gblr_cost_fraction": gblr.learner.cost_fraction(),
    }
    print(f"{model_name} {precision}: ops dense {ops['dense']} lowrank {ops['lowrank']} gblr {ops['gblr']} "
          f"({row['ops_ratio_gblr_dense']:.2f}x, learner {learner_ops}); step ms "
          + ", ".join(f"{f} {v:.1f}" for f, v in row["step_ms"].items())
          + f"; gblr/dense {ratio:.2f}x; learner {row['learner_ms']:.2f} ms; syncs {syncs}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["small"], choices=sorted(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    device = resolve_device(args.device)
    for precision in args.precisions:
        check_precision(precision, device)
    torch.set_num_threads(args.threads)
    rows = [measure(m, device, p, args.repeats) for m in args.models for p in args.precisions]
    meta = run_metadata(device_note(device), repeats=args.repeats, total_steps=TOTAL_STEPS)
    lines = [
        f"# Training step: GBLR vs dense and low-rank ({device.type})",
        "",
        "The trainer's step (fused AdamW, clipping, schedule, and for GBLR the structure learner holding a 0.3 "
        "budget with batched masks) on a ViT (`small`: dim 128, depth 4, 28x28x1 images; `vit-384`: dim 384, "
        "depth 12, 6 heads, 32x32x3 images, 65 tokens). GBLR layers start at full cost; low-rank layers are at 0.3. "
        f"Times: medians of {args.repeats} interleaved repeats. {provenance(meta)}",
        "",
        "| model | precision | batch | ATen ops dense / low-rank / GBLR | GBLR / dense ops | learner ops | "
        "step ms dense / low-rank / GBLR | GBLR / dense time | GBLR / low-rank time | learner ms | host syncs in a GBLR step |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        o, t = r["ops"], r["step_ms"]
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['batch']} | {o['dense']} / {o['lowrank']} / {o['gblr']} | "
            f"{r['ops_ratio_gblr_dense']:.2f}x | {r['learner_ops']} | {t['dense']:.1f} / {t['lowrank']:.1f} / {t['gblr']:.1f} | "
            f"{r['time_ratio_gblr_dense']:.2f}x | {r['time_ratio_gblr_lowrank']:.2f}x | {r['learner_ms']:.2f} | "
            f"{r['host_syncs']['gblr']} |"
        )
    write_results(f"train_step_{device.type}", meta, rows, lines)


if __name__ == "__main__":
    main()
