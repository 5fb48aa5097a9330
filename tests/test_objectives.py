"""The causal language model's objectives: window counts, batched calibration loss, training windows."""

import pytest
import torch

from gblr.objectives import CausalLMObjectives
from gblr.pretrained import Pretrained

transformers = pytest.importorskip("transformers")


class CharacterTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text]}


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


@pytest.mark.parametrize("options, message", [
    ({"calibration_windows": 0}, "calibration_windows must be an integer >= 1"),
    ({"input_windows": 2.5}, "input_windows must be an integer >= 1"),
    ({"input_windows": 1000}, "too few for 2 calibration and 1000 input windows"),
])
def test_bad_window_counts(teacher, options, message):
    with pytest.raises(ValueError, match=message):
        CausalLMObjectives(teacher, eval_windows=2, context=16, training_characters=4000, **options)
