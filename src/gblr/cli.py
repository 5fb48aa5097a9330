"""The ``gblr`` command: ``train CONFIG [section.field=value ...]``, ``report RUN_DIR``, ``demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _train(args) -> int:
    from .train import load_config, train

    config = load_config(args.config, args.overrides)
    out_dir = Path(args.out) if args.out else Path("runs") / config.name
    report = train(config, out_dir, resume=args.resume, progress=not args.quiet)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gblr", description="Learned structured (GBLR) layers for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a TOML config")
    train.add_argument("config", help="TOML file (see configs/)")
    train.add_argument("overrides", nargs="*", help="section.field=value (TOML values)")
    train.add_argument("--out", help="run directory (default runs/NAME)")
    train.add_argument("--resume", action="store_true", help="continue the run in the run directory")
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
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileExistsError) as error:
        print(f"gblr {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
