"""The ``gblr`` command: ``train CONFIG [section.field=value ...]``, ``report RUN_DIR``, ``demo``, ``compress``."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

__all__ = ["EXIT_DIVERGED", "main"]

EXIT_DIVERGED = 3  # `gblr train` whose training diverged (other errors exit with 2)


def _train(args) -> int:
    from .train import TrainingDiverged, load_config, train

    overrides = args.overrides + ([f"train.init_from={json.dumps(args.init_from)}"] if args.init_from else [])
    config = load_config(args.config, overrides)
    out_dir = Path(args.out) if args.out else Path("runs") / config.name
    try:
        report = train(config, out_dir, resume=args.resume, progress=not args.quiet)
    except TrainingDiverged as error:  # its own exit status: a grid of runs tells it from a failure
        print(f"gblr train: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    if report is None:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    print((out_dir / "report.md").read_text())
    print(f"run directory: {out_dir} (TensorBoard: tensorboard --logdir {out_dir / 'tensorboard'})")
    return 0


def _report(args) -> int:
    path = Path(args.run_dir) / "report.md"
    if not path.is_file():
        print(f"gblr report: {path} not found (is {args.run_dir} a finished run?)", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


def _demo(args) -> int:
    from .train import load_config, train

    runs = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))  # a fresh directory: never overwrite
    base = ["data.name=\"fashion_mnist\"", f"data.limit={args.examples}", f"train.epochs={args.epochs}",
            "model.dim=128", "model.depth=4", "model.heads=4", "train.batch_size=128", "train.lr=2e-3"]
    results = []
    for name, extra in (("dense", ['structure.family="dense"']),
                        ("gblr-0.3", ['structure.family="gblr"', "structure.budget=0.3"])):
        config = load_config(None, base + extra + [f'name="{name}"'])
        print(f"training {name} ...", flush=True)
        results.append(train(config, runs / name, resume=(runs / name / "checkpoint.json").exists() and args.resume,
                             progress=not args.quiet))
    print("\n| model | test accuracy | FLOPs / image | structured layers' cost | effective params | wall time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['test']['accuracy']:.4f} | {r['flops_per_example']:,} | {r['structured_fraction']:.3f} | "
              f"{r['effective_parameters']:,} | {r['wall_seconds']:.0f} s |")
    print(f"\nstructure pictures: {runs / 'gblr-0.3' / 'structure.png'}")
    print(f"TensorBoard logs: tensorboard --logdir {runs}")
    return 0


def _compress(args) -> int:
    import copy

    import torch

    from . import io
    from .compress import compress_
    from .convert import ConvertConfig
    from .fit import DATA_AWARE
    from .objectives import objectives_for
    from .pretrained import load_pretrained, save_compressed_extras
    from .train.recovery import recover_

    from .device import check_precision, resolve_device

    ConvertConfig(family=args.family, budget=args.budget)  # bad names and budgets fail before any loading
    for name in ("fit_steps", "finetune_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.finetune_batch is not None and args.finetune_batch < 1:
        raise ValueError(f"--finetune-batch must be >= 1, got {args.finetune_batch}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory")
    if args.calibrate and args.allocation != "global":
        raise ValueError("--calibrate needs --allocation global")
    fit = args.fit or ("outputs" if args.family in DATA_AWARE else "weights")
    if fit != "weights" and args.family not in DATA_AWARE:
        raise ValueError(f"--fit {fit} is available for {', '.join(DATA_AWARE)}; use --fit weights for {args.family}")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    teacher = load_pretrained(args.model)
    teacher.model.to(device)
    model = copy.deepcopy(teacher.model)
    objectives = objectives_for(teacher, calibrate=args.calibrate)
    quality = {"original": objectives.quality(teacher.model)}
    options = {"steps": args.fit_steps} if args.family == "gblr" else {}
    print(f"compressing to {args.budget:g} of the replaced layers' cost ({args.family}, {args.allocation}, "
          f"fitting the {fit}) ...", flush=True)
    result = compress_(model, args.family, args.budget, args.allocation, options=options,
                       calibration_loss=objectives.calibration_loss if args.calibrate else None,
                       calibration_inputs=None if fit == "weights" else objectives.calibration_inputs,
                       sequential=fit == "sequential")
    print(result.to_markdown())
    quality["compressed"] = objectives.quality(model)
    if args.finetune_steps:
        print(f"recovery: {args.finetune_steps} steps ...", flush=True)
        recovery = recover_(model, objectives.recovery_loss(args.seed, args.finetune_batch), args.finetune_steps, lr=args.lr,
                            learn_structure=args.learn_structure, precision=args.precision)
        quality["recovered"] = objectives.quality(model)
        quality["recovery_seconds"] = round(recovery.seconds, 1)
    config = {"model": args.model, "family": args.family, "budget": args.budget, "allocation": args.allocation,
              "calibrate": args.calibrate, "fit": fit, "fit_steps": args.fit_steps, "finetune_steps": args.finetune_steps,
              "finetune_batch": args.finetune_batch,
              "learn_structure": args.learn_structure, "lr": args.lr, "seed": args.seed}
    io.save(model, out, config={**config, "compression": result.to_dict(), "quality": quality}, base_model=teacher.identity)
    save_compressed_extras(teacher, out)
    (out / "report.md").write_text(result.to_markdown() + "\n")
    print("\nquality (held-out Shakespeare):", json.dumps(quality))
    print(f"saved to {out} in {time.perf_counter() - start:.0f} s; reload with "
          f"gblr.pretrained.load_compressed({str(out)!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gblr", description="Learned structured (GBLR) layers for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a TOML config")
    train.add_argument("config", help="TOML file (see configs/)")
    train.add_argument("overrides", nargs="*", help="section.field=value (TOML values)")
    train.add_argument("--out", help="run directory (default runs/NAME)")
    train.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    train.add_argument("--init-from", metavar="RUN_DIR", help="start from the weights of a finished dense run of the "
                       "same model, fitted at the budget (the same as train.init_from=RUN_DIR)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)
    report = commands.add_parser("report", help="print a finished run's report")
    report.add_argument("run_dir")
    report.set_defaults(handler=_report)
    demo = commands.add_parser("demo", help="dense vs GBLR at 30 %% on Fashion-MNIST, side by side")
    demo.add_argument("--out", help="run directory (default runs/demo-DATE-TIME)")
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--examples", type=int, default=20000, help="training images used (of 54000)")
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=_demo)
    compress = commands.add_parser("compress", help="compress a pretrained model to a fraction of its cost")
    compress.add_argument("--model", required=True, help="minilm, smollm2 or a Hugging Face model directory")
    compress.add_argument("--family", default="gblr", help="structured family (default gblr)")
    compress.add_argument("--budget", type=float, default=0.5, help="cost of the replaced layers, fraction of dense")
    compress.add_argument("--allocation", choices=("uniform", "global"), default="global",
                          help="one budget per layer, or one global budget allocated by error curves")
    compress.add_argument("--calibrate", action="store_true", help="weight the allocation by how far each layer alone moves the model from the original on calibration "
                               "text (embedding cosine for encoders, divergence of next-token predictions for language models)")
    compress.add_argument("--fit", choices=("outputs", "sequential", "weights"), default=None,
                          help="fit each layer's outputs on calibration text (default for gblr and lowrank); the same "
                               "one layer group at a time on the inputs of the partly compressed model (sequential: "
                               "a better start without fine-tuning, two calibration runs per group); or its weights")
    compress.add_argument("--fit-steps", type=int, default=0, help="steps of the learned GBLR fit (0: block-low-rank fits only)")
    compress.add_argument("--finetune-steps", type=int, default=0, help="recovery steps (distillation / next-token loss)")
    compress.add_argument("--finetune-batch", type=int, default=None,
                          help="sentences (encoders; default 32) or 256-token windows (language models; default 4) per recovery step")
    compress.add_argument("--learn-structure", action="store_true", help="keep learning GBLR structure during recovery")
    compress.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate")
    compress.add_argument("--seed", type=int, default=0)
    compress.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (fitting, recovery, evaluation)")
    compress.add_argument("--precision", default="fp32", help="fp32, or bf16 autocast for recovery")
    compress.add_argument("--out", required=True, help="new directory for the compressed model")
    compress.set_defaults(handler=_compress)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # overrides may also follow --resume or --out
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except (ValueError, OSError, ImportError, FloatingPointError, RuntimeError) as error:  # OSError: unwritable --out, ...
        print(f"gblr {args.command}: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
