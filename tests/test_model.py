"""GPT against transformers' GPT2LMHeadModel: logits, parameter counts, the KV cache."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from microft.checkpoint import load_model  # noqa: E402
from microft.config import ModelConfig  # noqa: E402
from microft.generate import generate  # noqa: E402
from microft.model import GPT, KVCache  # noqa: E402

TINY = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def hf_model(seed: int = 0, **shape) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{**shape, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_and_ours(tmp_path, **shape):
    hf = hf_model(**shape)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_model(tmp_path / "hf").eval()


@pytest.fixture(scope="module")
def gpt2_124m(tmp_path_factory):
    """A random-weight model of the real 124M shape, as transformers and as microft."""
    shape = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    return hf_and_ours(tmp_path_factory.mktemp("gpt2"), **shape)


def test_preset_param_count():
    cfg = ModelConfig.from_preset("gpt2")
    with torch.device("meta"):
        model = GPT(cfg)
    assert cfg.num_params() == model.num_params() == 124_439_808


@pytest.mark.parametrize("vocab_size", [50257, 100])
def test_logits_match_transformers_tiny(tmp_path, vocab_size):
    hf, ours = hf_and_ours(tmp_path, **{**TINY, "vocab_size": vocab_size})
    assert ours.config.padded_vocab_size % 64 == 0
    x = torch.randint(0, vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
    assert got.shape == expected.shape == (3, 17, vocab_size)
    assert (got - expected).abs().max().item() <= 1e-5


def test_logits_match_transformers_124m(gpt2_124m):
    hf, ours = gpt2_124m
    assert ours.num_params() == hf.num_parameters() == 124_439_808
    x = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-5


def test_greedy_generation_matches_transformers_124m(gpt2_124m):
    hf, ours = gpt2_124m
    prompt = torch.randint(0, 50256, (1, 6), generator=torch.Generator().manual_seed(3))
    # 12 tokens keep this test quick; tests/test_generate.py rolls out 30 on a tiny model
    out = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=50256, eos_token_id=None)
    expected = out[0, prompt.size(1):].tolist()
    assert len(expected) == 12
    assert list(generate(ours, prompt[0].tolist(), 12, stop_at_eot=False)) == expected


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY)).eval()
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.empty(model.config, 2, 20, "cpu", torch.float32)
        parts = [model(x[:, :7], cache=cache)]  # prefill
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(7, 12)]  # one at a time
        parts.append(model(x[:, 12:20], cache=cache))  # a chunk after a prefix: the masked path
    assert cache.length == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_context_overflow_raises():
    model = GPT(ModelConfig(**{**TINY, "n_positions": 8}))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 9, dtype=torch.long))
