"""Objectives of pretrained models: the encoder's distillation loss; the causal language model's window
counts, batched calibration loss and training windows."""

import copy
import random

import pytest
import torch

from gblr.allocate import layer_sensitivities
from gblr.calibration import input_grams
from gblr.objectives import CausalLMObjectives, EncoderObjectives, objectives_for
from gblr.pretrained import Pretrained, encode_sentences, sentence_embeddings

transformers = pytest.importorskip("transformers")


class CharacterTokenizer:
    """Characters as token ids; padded batches of sentences like a Hugging Face tokenizer's."""

    def __call__(self, text, add_special_tokens=False, padding=False, truncation=False, max_length=64, return_tensors=None):
        if isinstance(text, str):
            return {"input_ids": [ord(c) % 128 for c in text]}
        ids = [[1 + ord(c) % 127 for c in sentence[:max_length]] for sentence in text]
        if return_tensors is None:
            return {"input_ids": ids}
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
                "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])}


class Recorder(torch.nn.Module):
    """The model, remembering every batch it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, input_ids, labels=None):
        self.seen.append(input_ids)
        return self.model(input_ids=input_ids, labels=labels)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    return Pretrained(transformers.LlamaForCausalLM(config).eval(), CharacterTokenizer(), "causal-lm", "tiny")


def test_window_counts_batched_calibration_loss_and_training_windows(teacher):
    objectives = CausalLMObjectives(teacher, eval_windows=2, context=16, batch_size=2, training_characters=160,
                                    calibration_windows=3, input_windows=5)
    assert objectives.calibration.shape == (3, 16) and objectives.input_windows.shape == (5, 16)
    with torch.no_grad():  # three windows in batches of two and one: the mean over all tokens
        whole = teacher.model(input_ids=objectives.calibration, labels=objectives.calibration).loss
    assert objectives.calibration_loss(teacher.model) == pytest.approx(float(whole), rel=1e-5)
    student = Recorder(teacher.model)
    loss = objectives.recovery_loss(seed=0)
    for step in range(20):
        loss(student, step)
    trained = torch.cat(student.seen)
    assert trained.shape == (40, 16)  # from the 7 windows after the first 3 (of 10)
    assert not any(torch.equal(window, held) for window in trained for held in objectives.calibration)
    student.seen.clear()
    objectives.recovery_loss(seed=0, batch_size=3)(student, 0)  # a batch size of its own
    assert torch.cat(student.seen).shape == (3, 16)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        objectives.recovery_loss(seed=0, batch_size=0)


def test_divergence_calibration_is_zero_for_the_original_and_the_kl_of_a_changed_model(teacher):
    objectives = CausalLMObjectives(teacher, eval_windows=2, context=16, batch_size=2, training_characters=160,
                                    calibration_windows=3, input_windows=5, calibration="divergence")
    assert objectives.calibration_loss(teacher.model) == pytest.approx(0.0, abs=1e-6)
    changed = copy.deepcopy(teacher.model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.add_(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)))
        reference = teacher.model(input_ids=objectives.calibration).logits.log_softmax(-1)
        moved = changed(input_ids=objectives.calibration).logits.log_softmax(-1)
    expected = (reference.exp() * (reference - moved)).sum(-1).mean()  # KL(original || changed) per token
    assert float(expected) > 1e-4
    assert objectives.calibration_loss(changed) == pytest.approx(float(expected), rel=1e-4)
    # as the calibration of a global allocation: every layer's measured increase is above zero
    layers = {name: module for name, module in teacher.model.named_modules() if name.endswith("_proj")}
    measured = layer_sensitivities(teacher.model, layers, objectives.calibration_loss, "lowrank", 0.3)
    assert len(measured) == 7 and all(increase > 0 for increase, _ in measured.values())


@pytest.mark.parametrize("options, message", [
    ({"calibration": "kl"}, "calibration must be one of"),
    ({"calibration_windows": 0}, "calibration_windows must be an integer >= 1"),
    ({"input_windows": 2.5}, "input_windows must be an integer >= 1"),
    ({"input_windows": 1000}, "too few for 8 calibration and 1000 input windows"),
])
def test_bad_window_counts(teacher, options, message):
    with pytest.raises(ValueError, match=message):
        CausalLMObjectives(teacher, eval_windows=2, context=16, training_characters=4000, **options)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=80)
    return Pretrained(transformers.BertModel(config).eval(), CharacterTokenizer(), "encoder", "tiny")


def test_encoder_calibration_inputs_batch_sentences_of_equal_length_without_padding(encoder):
    objectives = EncoderObjectives(encoder, held_out=8, input_sentences=40)
    layers = {name: encoder.model.get_submodule(name) for name in ("encoder.layer.0.attention.self.query",
                                                                    "encoder.layer.1.output.dense")}
    seen = []
    hook = encoder.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                                   with_kwargs=True)
    batched = input_grams(encoder.model, layers, objectives.calibration_inputs)
    hook.remove()
    assert sum(shape[0] for shape in seen) == 40 and len(seen) < 40
    one_by_one = input_grams(encoder.model, layers, lambda model: [
        sentence_embeddings(model, encode_sentences(encoder.tokenizer, [s])) for s in objectives.input_sentences])
    for name in layers:
        assert torch.allclose(batched[name], one_by_one[name], rtol=1e-5, atol=1e-8)


def test_encoder_distillation_matches_every_layer_on_real_tokens(encoder):
    objectives = EncoderObjectives(encoder, held_out=8, batch_size=4, input_sentences=10)
    assert len(objectives.input_sentences) == 10
    student = copy.deepcopy(encoder.model)
    loss = objectives.recovery_loss(seed=0)
    assert float(loss(student, 0).detach()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():  # only the last layer's states change: the mean over 2 layers is half of its error
        student.encoder.layer[1].output.LayerNorm.bias += 0.1
    assert float(loss(student, 1).detach()) == pytest.approx(0.01 / 2, rel=1e-4)
    two = objectives.recovery_loss(seed=0, batch_size=2)
    assert float(two(student, 0).detach()) == pytest.approx(0.01 / 2, rel=1e-4)  # any sentences: the same shift
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        objectives.recovery_loss(seed=0, batch_size=1.5)
    with pytest.raises(ValueError, match="input_sentences must be an integer >= 1"):
        EncoderObjectives(encoder, held_out=8, input_sentences=0)


def test_encoder_distillation_can_add_the_embedding_cosine(encoder):
    objectives = EncoderObjectives(encoder, held_out=8, batch_size=4, input_sentences=10)
    student = copy.deepcopy(encoder.model)
    with torch.no_grad():
        student.encoder.layer[1].output.LayerNorm.bias += 0.1 * torch.randn(32)
    plain = float(objectives.recovery_loss(seed=0)(student, 0).detach())
    weighted = float(objectives.recovery_loss(seed=0, embedding_weight=2.0)(student, 0).detach())
    batch = encode_sentences(encoder.tokenizer, random.Random(0).sample(objectives.training, 4))  # the loss's batch
    with torch.no_grad():
        cosine = (sentence_embeddings(student, batch) * sentence_embeddings(encoder.model, batch)).sum(-1).mean()
    assert 1 - float(cosine) > 1e-3
    assert weighted - plain == pytest.approx(2.0 * (1 - float(cosine)), rel=1e-4)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="embedding_weight must be a finite number >= 0"):
            objectives.recovery_loss(seed=0, embedding_weight=bad)


def test_objectives_for_a_calibrated_language_model_measure_the_divergence(teacher):
    options = dict(eval_windows=2, context=16, batch_size=2, training_characters=160, calibration_windows=3, input_windows=5)
    changed = copy.deepcopy(teacher.model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    divergence = CausalLMObjectives(teacher, calibration="divergence", **options).calibration_loss(changed)
    assert objectives_for(teacher, calibrate=True, **options).calibration_loss(changed) == pytest.approx(divergence)
    next_token = CausalLMObjectives(teacher, **options).calibration_loss(changed)
    assert abs(divergence - next_token) > 1.0  # a small KL against a loss near log(128)
    assert objectives_for(teacher, **options).calibration_loss(changed) == pytest.approx(next_token)
    assert objectives_for(teacher, calibrate=True, calibration="next-token", **options).calibration_loss(changed) == pytest.approx(next_token)
    # switching an existing object's calibration loss measures the same, leaving the original object as it was
    plain = CausalLMObjectives(teacher, **options)
    switched = plain.with_calibration("divergence", teacher)
    assert switched.calibration_loss(changed) == pytest.approx(divergence)
    assert switched.validation is plain.validation and plain.calibration_loss(changed) == pytest.approx(next_token)
    with pytest.raises(ValueError, match="calibration must be one of"):
        plain.with_calibration("kl", teacher)
