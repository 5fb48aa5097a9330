import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gblr import GBLRLinear
from gblr.convert import ConvertConfig, convert_
from gblr.io import load, save
from gblr.structured import LowRankLinear, StructuredLinear


class Conv1D(nn.Module):
    """Stand-in with the API of Hugging Face's Conv1D (GPT-2): weight (in, out), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.attn = Conv1D(96, 32)
        self.proj = nn.Linear(96, 32, bias=False)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.lm_head = nn.Linear(32, 50, bias=False)
        self.tied = nn.Linear(32, 50, bias=False)
        self.tied.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.proj(torch.tanh(self.attn(h)))
        h = h + self.mlp(h)
        return self.lm_head(h) + self.tied(h)


def test_convert_replaces_and_reports():
    torch.manual_seed(0)
    model = TinyLM().double()
    report = convert_(model, ConvertConfig(family="lowrank", budget=0.3))
    replaced = {r.name for r in report.replaced}
    assert replaced == {"attn", "proj", "mlp.0", "mlp.2"}
    skipped = dict(report.skipped)
    assert skipped["lm_head"] == "excluded by the filter" and skipped["tied"] == "weight tied to an embedding"
    assert isinstance(model.mlp[0], LowRankLinear) and model.mlp[0].out_proj.dtype == torch.float64
    assert model.proj.bias is None and model.mlp[0].bias is not None
    for r in report.replaced:
        assert r.reached_cost <= 0.3 and 0 < r.relative_error < 1
    assert "| mlp.0 | 32 | 64 | lowrank |" in report.to_markdown()


def test_conv1d_is_converted_with_its_transposed_weight():
    torch.manual_seed(0)
    model = TinyLM().double()
    tokens = torch.randint(0, 50, (2, 5))
    expected = model(tokens)
    convert_(model, ConvertConfig(family="dense", budget=1.0))  # exact: same function
    assert torch.allclose(model(tokens), expected, atol=1e-12)


def test_filter_and_per_layer_budgets():
    torch.manual_seed(0)
    model = TinyLM()
    report = convert_(
        model, ConvertConfig(family="gblr", budget=0.5, init="random"),
        filter_fn=lambda module, name: name.startswith("mlp"), budgets={"mlp.2": 0.2},
    )
    assert {r.name: r.budget for r in report.replaced} == {"mlp.0": 0.5, "mlp.2": 0.2}
    assert isinstance(model.mlp[2], GBLRLinear) and model.mlp[2].relative_cost() <= 0.2
    assert not isinstance(model.proj, StructuredLinear)


def test_unreachable_budget_is_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(4, 4))
    report = convert_(model, ConvertConfig(family="lowrank", budget=0.1), filter_fn=lambda m, n: True)
    assert report.replaced == [] and "smallest budget" in report.skipped[0][1]


@pytest.mark.parametrize("kwargs, message", [({"family": "fly"}, "known families"), ({"budget": 0.0}, "budget"),
                                             ({"init": "zeros"}, "init")])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvertConfig(**kwargs)


def converted_model():
    torch.manual_seed(0)
    model = TinyLM()
    convert_(model, ConvertConfig(family="gblr", budget=0.5, options={"steps": 20}), filter_fn=lambda m, n: n == "mlp.0")
    convert_(model, ConvertConfig(family="monarch", budget=0.5), filter_fn=lambda m, n: n == "mlp.2")
    return model


def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    model = converted_model().eval()
    tokens = torch.randint(0, 50, (3, 7))
    torch.save(model(tokens).detach(), tmp_path / "expected.pt")  # test data only; the model is not pickled
    torch.save(tokens, tmp_path / "tokens.pt")
    save(model, tmp_path / "saved", config={"family": "mixed"}, base_model="TinyLM")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_convert_io import TinyLM
        from gblr.io import load
        torch.manual_seed(123)  # different random init: everything must come from the files
        model = load({str(tmp_path / 'saved')!r}, TinyLM()).eval()
        tokens = torch.load({str(tmp_path / 'tokens.pt')!r}, weights_only=True)
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        assert torch.equal(model(tokens), expected), (model(tokens) - expected).abs().max()
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "identical" in result.stdout


def test_save_never_overwrites_silently(tmp_path):
    model = converted_model()
    save(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(TinyLM(), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    save(model, tmp_path, overwrite=True)


def test_corrupt_and_mismatched_files_give_clear_errors(tmp_path):
    model = converted_model()
    save(model, tmp_path / "ok")
    # truncated tensor file
    save(model, tmp_path / "truncated")
    data = (tmp_path / "truncated" / "model.safetensors").read_bytes()
    (tmp_path / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        load(tmp_path / "truncated", TinyLM())
    # a bad field in the structure
    save(model, tmp_path / "badfield")
    structure = json.loads((tmp_path / "badfield" / "structure.json").read_text())
    structure["layers"]["mlp.0"]["in_features"] = "32"
    (tmp_path / "badfield" / "structure.json").write_text(json.dumps(structure))
    with pytest.raises(ValueError, match=r"layers\.mlp\.0\.in_features"):
        load(tmp_path / "badfield", TinyLM())
    # a base model of another shape
    other = TinyLM()
    other.lm_head = nn.Linear(32, 60, bias=False)
    with pytest.raises(ValueError, match="lm_head.weight"):
        load(tmp_path / "ok", other)
    with pytest.raises(FileNotFoundError, match="structure.json"):
        load(tmp_path / "missing", TinyLM())


def finely_tiled_model():
    """TinyLM whose mlp.0 is a GBLR fit on a 4x4 tiling: many pieces, each on a short interval."""
    from gblr.fit import block_low_rank_fit

    torch.manual_seed(0)
    model = TinyLM().double()
    weight = torch.block_diag(*[torch.randn(16, 8, dtype=torch.float64) for _ in range(4)])
    model.mlp[0] = block_low_rank_fit(weight, 0.4, grid=4, bias=torch.randn(64, dtype=torch.float64))
    return model.eval()


def test_gblr_factors_are_stored_packed_and_load_exactly(tmp_path):
    from safetensors.torch import load_file

    model = finely_tiled_model()
    layer = model.mlp[0]
    save(model, tmp_path / "saved")
    stored = load_file(str(tmp_path / "saved" / "model.safetensors"))
    packed = stored["mlp.0.out_factors.packed"].numel() + stored["mlp.0.in_factors.packed"].numel()
    assert "mlp.0.out_factors" not in stored and packed == layer.effective_parameters() - 64  # bias apart
    assert packed < (layer.out_factors.numel() + layer.in_factors.numel()) / 3
    tokens = torch.randint(0, 50, (3, 7))
    loaded = load(tmp_path / "saved", TinyLM().double()).eval()
    assert torch.equal(loaded(tokens), model(tokens))
    assert torch.equal(loaded.tied.weight, loaded.embed.weight) and loaded.tied.weight is loaded.embed.weight


def test_saves_of_the_first_format_still_load(tmp_path):
    from safetensors.torch import save_model

    model = finely_tiled_model()
    save(model, tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    structure = json.loads((tmp_path / "new" / "structure.json").read_text())
    structure["format"] = "gblr-structured/1"
    del structure["packed"]
    save_model(model, str(old / "model.safetensors"))  # full-length factors, as the first format stored them
    (old / "structure.json").write_text(json.dumps(structure))
    tokens = torch.randint(0, 50, (2, 5))
    assert torch.equal(load(old, TinyLM().double()).eval()(tokens), model(tokens))


def test_packed_factors_of_the_wrong_size_are_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    save(finely_tiled_model(), tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    stored["mlp.0.in_factors.packed"] = stored["mlp.0.in_factors.packed"][:-1].contiguous()
    save_file(stored, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layer 'mlp.0': packed in_factors has shape"):
        load(tmp_path, TinyLM().double())
