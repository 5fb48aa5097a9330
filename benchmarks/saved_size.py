"""Size on disk of a compressed model: the original, GBLR with full-length factors, GBLR packed.

    .venv/bin/python benchmarks/saved_size.py [--budget 0.5]

Compresses all-MiniLM-L6-v2 (every encoder linear layer, uniform budget, GBLR fitted to each layer's
outputs on the calibration sentences), then writes the original and the compressed model with
safetensors' plain ``save_model`` (full-length GBLR factors, as the first save format stored them) and
with ``gblr.io.save`` (packed factors); the packed save is loaded into a fresh base model and its
embeddings compared with the compressed model's. Writes benchmarks/results/saved_size.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from _results import provenance, run_metadata, write_results
from safetensors.torch import save_model

from gblr import io
from gblr.compress import compress_
from gblr.learn import gblr_layers
from gblr.objectives import EncoderObjectives
from gblr.pretrained import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    original = load_pretrained("minilm")
    objectives = EncoderObjectives(original, held_out=512)
    model = copy.deepcopy(original.model)
    compress_(model, "gblr", args.budget, "uniform", options={"steps": 0}, calibration_inputs=objectives.calibration_inputs)
    layers = [layer for _, layer in gblr_layers(model)]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        files = {"original": os.path.join(directory, "original.safetensors"),
                 "GBLR, full-length factors": os.path.join(directory, "full.safetensors"),
                 "GBLR, packed (gblr.io.save)": os.path.join(directory, "packed", "model.safetensors")}
        save_model(original.model, files["original"])
        save_model(model, files["GBLR, full-length factors"])
        io.save(model, os.path.join(directory, "packed"))
        for label, path in files.items():
            rows.append({"model": label, "megabytes": os.path.getsize(path) / 2**20})
        loaded = io.load(os.path.join(directory, "packed"), load_pretrained("minilm").model)
        same = objectives.quality(loaded)["cosine_to_original"] == objectives.quality(model)["cosine_to_original"]
    factors = sum(layer.out_factors.numel() + layer.in_factors.numel() for layer in layers)
    effective = sum(layer.effective_parameters() for layer in layers)
    dense = sum(layer.in_features * layer.out_features for layer in layers)
    meta = run_metadata("1 process", budget=args.budget, factor_entries=factors, effective_parameters=effective,
                        dense_parameters=dense, loaded_identical=same)
    lines = ["# Size on disk of a compressed all-MiniLM-L6-v2", "", provenance(meta), "",
             f"GBLR at {args.budget} of every encoder linear layer's cost (uniform), fitted to the layers' outputs. "
             f"Its {len(layers)} layers hold {factors:,} factor entries in full-length factors for {effective:,} "
             f"effective parameters (their dense weights: {dense:,}). The packed save loaded into a fresh base "
             f"model gives {'the same' if same else 'DIFFERENT'} embeddings.", "",
             "| file | MB |", "|---|---:|"]
    lines += [f"| {r['model']} | {r['megabytes']:.1f} |" for r in rows]
    write_results("saved_size", meta, rows, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
