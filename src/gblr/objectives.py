"""What "quality" means for a compressed pretrained model, on offline Shakespeare text.

- sentence encoders: embeddings should stay those of the original model: calibration loss
  ``1 - cosine`` on 64 training sentences, layer inputs for output-error fits from 1024 training sentences
  (batched by token count, so without padding; the count is an option), distillation by MSE to the
  original's hidden states after every layer (all real tokens), quality as the mean cosine similarity on
  held-out sentences;
- causal language models: calibration by next-token loss on 8x256 training tokens (or by the divergence
  of the next-token distributions from the original's on those tokens, what ``objectives_for(...,
  calibrate=True)`` and ``gblr compress --calibrate`` choose), layer inputs from
  128x256 training tokens (both counts are options; SmolLM2-135M at 0.8 of its projections' cost, low-rank
  without training: perplexity 139 with 2 and 16 windows, 109 with 8 and 128), recovery by next-token
  fine-tuning, quality as validation perplexity.
Training data is the first 90 % of the works, held-out data the last 10 %.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import load_shakespeare, shakespeare_sentences
from .pretrained import (
    MAX_SENTENCE_TOKENS,
    Pretrained,
    embed_all,
    encode_sentences,
    mean_pooled,
    model_device,
    perplexity,
    sentence_embeddings,
    token_ids,
)
from .structured.base import check_features, check_nonnegative

__all__ = ["EncoderObjectives", "CausalLMObjectives", "objectives_for"]


class EncoderObjectives:
    def __init__(self, teacher: Pretrained, held_out: int = 512, batch_size: int = 32, input_sentences: int = 1024) -> None:
        check_features("input_sentences", input_sentences)
        self.teacher, self.tokenizer, self.batch_size = teacher.model, teacher.tokenizer, batch_size
        self.held_out = shakespeare_sentences("val")[:held_out]
        training = shakespeare_sentences("train")
        self.calibration, self.training = encode_sentences(self.tokenizer, training[:64]), training[64:]
        self.input_sentences = training[:input_sentences]
        with torch.no_grad():
            self.calibration_target = sentence_embeddings(self.teacher, self.calibration)
        self.reference = embed_all(self.teacher, self.tokenizer, self.held_out)

    def calibration_loss(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(1 - (sentence_embeddings(model, self.calibration) * self.calibration_target).sum(-1).mean())

    @torch.no_grad()
    def calibration_inputs(self, model: nn.Module) -> None:
        """Run ``model`` on the calibration sentences (for :func:`gblr.calibration.input_grams`), in batches
        of sentences with the same number of tokens: no padding reaches the statistics."""
        lengths = [len(ids) for ids in self.tokenizer(self.input_sentences, truncation=True, max_length=MAX_SENTENCE_TOKENS)["input_ids"]]
        by_length: dict[int, list[str]] = {}
        for sentence, length in zip(self.input_sentences, lengths):
            by_length.setdefault(length, []).append(sentence)
        batches = [group[i : i + self.batch_size] for group in by_length.values() for i in range(0, len(group), self.batch_size)]
        device = model_device(model)
        for batch in tqdm(batches, desc="calibration inputs", disable=None, leave=False):
            # the model's output is not used (sequential fits stop its runs early)
            model(**{k: v.to(device) for k, v in encode_sentences(self.tokenizer, batch, max_length=MAX_SENTENCE_TOKENS).items()})

    def recovery_loss(self, seed: int = 0, batch_size: int | None = None, embedding_weight: float = 0.0):
        """Distillation loss on ``batch_size`` training sentences a step (default: the objectives' batch size):
        the mean over layers of the hidden states' squared error, plus ``embedding_weight`` times
        ``1 - cosine`` of the pooled sentence embeddings (the quality measured)."""
        batch_size = self.batch_size if batch_size is None else check_features("batch_size", batch_size)
        check_nonnegative("embedding_weight", embedding_weight)
        rng = random.Random(seed)

        def batch_loss(student: nn.Module, step: int) -> torch.Tensor:
            batch = encode_sentences(self.tokenizer, rng.sample(self.training, batch_size))
            device, teacher_device = model_device(student), model_device(self.teacher)
            with torch.no_grad():
                targets = self.teacher(**{k: v.to(teacher_device) for k, v in batch.items()},
                                       output_hidden_states=True).hidden_states[1:]
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = batch["attention_mask"].unsqueeze(-1)
            hidden = student(**batch, output_hidden_states=True).hidden_states[1:]
            targets = [t.to(device) for t in targets]
            # every layer's states, not only the pooled embedding: far more signal per sentence
            errors = [((h - t) * mask).pow(2).sum() / (mask.sum() * h.shape[-1]) for h, t in zip(hidden, targets)]
            loss = torch.stack(errors).mean()
            if embedding_weight:
                cosine = F.cosine_similarity(mean_pooled(hidden[-1], batch["attention_mask"]),
                                             mean_pooled(targets[-1], batch["attention_mask"]), dim=-1)
                loss = loss + embedding_weight * (1 - cosine).mean()
            return loss

        return batch_loss

    def quality(self, model: nn.Module) -> dict:
        embeddings = embed_all(model, self.tokenizer, self.held_out)
        return {"cosine_to_original": float((embeddings * self.reference).sum(-1).mean())}


CALIBRATIONS = ("next-token", "divergence")


def _check_calibration(calibration: str) -> None:
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")


class CausalLMObjectives:
    """``calibration="next-token"``: the calibration loss is the next-token loss on the calibration windows;
    ``"divergence"``: the mean KL divergence of the model's next-token distributions from the original's
    (``teacher``'s when these objectives are made) on those tokens. The divergence is zero for the original
    and grows with every change of its predictions, whereas a small change can lower the next-token loss
    on a few thousand tokens as easily as raise it: per-layer sensitivities measured by the divergence are
    never below zero and rank the layers by how much they move the model."""

    def __init__(self, teacher: Pretrained, eval_windows: int = 64, context: int = 256, batch_size: int = 4,
                 training_characters: int = 2_000_000, calibration_windows: int = 8, input_windows: int = 128,
                 calibration: str = "next-token") -> None:
        check_features("calibration_windows", calibration_windows)
        check_features("input_windows", input_windows)
        _check_calibration(calibration)
        self.context, self.batch_size = context, batch_size
        self.validation = token_ids(teacher.tokenizer, load_shakespeare("val"))[: eval_windows * context]
        self.training = token_ids(teacher.tokenizer, load_shakespeare("train")[:training_characters])
        if (max(calibration_windows, input_windows) + batch_size) * context > len(self.training):
            raise ValueError(f"{training_characters} training characters are too few for {calibration_windows} "
                             f"calibration and {input_windows} input windows of {context} tokens")
        # the first windows are the calibration loss's, never trained on
        self.calibration = self.training[: calibration_windows * context].view(calibration_windows, context)
        self.input_windows = self.training[: input_windows * context].view(input_windows, context)
        self._reference = self._reference_for(calibration, teacher)

    def with_calibration(self, calibration: str, teacher: Pretrained) -> CausalLMObjectives:
        """These objectives with another calibration loss (the same tokens and windows; nothing is
        tokenised again); the divergence is measured from ``teacher``'s predictions."""
        _check_calibration(calibration)
        other = copy.copy(self)
        other._reference = self._reference_for(calibration, teacher)
        return other

    def _reference_for(self, calibration: str, teacher: Pretrained) -> torch.Tensor | None:
        """For the divergence, the original's next-token log-probabilities, kept on the CPU (8x256 tokens
        of a 49k vocabulary: 0.4 GB)."""
        if calibration == "next-token":
            return None
        return torch.cat([log_probs.cpu() for log_probs in self._log_probs(teacher.model)])

    def _calibration_batches(self, model: nn.Module):
        return self.calibration.to(model_device(model)).split(self.batch_size)

    @torch.no_grad()
    def _log_probs(self, model: nn.Module):
        for batch in self._calibration_batches(model):
            yield model(input_ids=batch).logits.float().log_softmax(-1)

    def calibration_loss(self, model: nn.Module) -> float:
        if self._reference is not None:  # KL(original || model), summed over the vocabulary, mean over tokens
            divergence = sum(F.kl_div(log_probs, reference.to(log_probs.device), reduction="sum", log_target=True)
                             for log_probs, reference in zip(self._log_probs(model), self._reference.split(self.batch_size)))
            return float(divergence / self.calibration.numel())
        with torch.no_grad():  # in batches; windows of equal length, so weighting by windows is by tokens
            return float(sum(model(input_ids=b, labels=b).loss * len(b) for b in self._calibration_batches(model))
                         / len(self.calibration))

    @torch.no_grad()
    def calibration_inputs(self, model: nn.Module) -> None:
        """Run ``model`` on the calibration windows (for :func:`gblr.calibration.input_grams`)."""
        for batch in tqdm(self.input_windows.split(self.batch_size), desc="calibration inputs", disable=None, leave=False):
            model(input_ids=batch.to(model_device(model)))

    def recovery_loss(self, seed: int = 0, batch_size: int | None = None):
        """Next-token loss on ``batch_size`` training windows a step (default: the objectives' batch size)."""
        batch_size = self.batch_size if batch_size is None else check_features("batch_size", batch_size)
        generator = torch.Generator().manual_seed(seed)
        windows, first = len(self.training) // self.context, len(self.calibration)

        def batch_loss(student: nn.Module, step: int) -> torch.Tensor:
            picks = torch.randint(first, windows, (batch_size,), generator=generator).tolist()
            batch = torch.stack([self.training[i * self.context : (i + 1) * self.context] for i in picks])
            batch = batch.to(model_device(student))
            return student(input_ids=batch, labels=batch).loss

        return batch_loss

    def quality(self, model: nn.Module) -> dict:
        return {"perplexity": perplexity(model, self.validation, self.context)}


def objectives_for(teacher: Pretrained, calibrate: bool = False, **options):
    """The objectives of ``teacher``'s kind; ``teacher`` must stay unmodified (compress a copy). ``calibrate``:
    they will calibrate an allocation, so a causal language model's calibration loss becomes the divergence
    from ``teacher``'s predictions (unless ``options`` chooses): on SmolLM2-135M at 0.8 the allocation it
    calibrates reaches perplexity 77.0 without training, against 90.9 with the next-token loss."""
    if teacher.kind == "encoder":
        return EncoderObjectives(teacher, **options)
    if calibrate:
        options.setdefault("calibration", "divergence")
    return CausalLMObjectives(teacher, **options)
