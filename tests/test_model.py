"""Transformer (GPT-2) against transformers' GPT2LMHeadModel: logits, parameter counts, the KV cache."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from microft.generate import generate  # noqa: E402
from microft.models.config import ModelConfig  # noqa: E402
from microft.models.load import load_model  # noqa: E402
from microft.models.transformer import KVCache, Transformer  # noqa: E402

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
        model = Transformer(cfg)
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
    model = Transformer(ModelConfig(**TINY)).eval()
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
    model = Transformer(ModelConfig(**{**TINY, "n_positions": 8}))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


def _reference_loss(model: Transformer, idx, labels, weights):
    """The textbook head: full fp64 logits and F.cross_entropy, through plain autograd."""
    V = model.config.vocab_size
    logits = torch.nn.functional.linear(model.hidden(idx), model.wte.weight[:V])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return (ce * weights.flatten()).sum()


@pytest.mark.parametrize("use_target_pos", [False, True])
def test_fused_loss_and_every_gradient_match_the_textbook_head(monkeypatch, use_target_pos):
    """Chunked fused CE + the tied embedding's handed-over gradient == full logits + autograd (fp64)."""
    import microft.models.config

    # 128-row chunks, a ragged tail
    monkeypatch.setattr(microft.models.config, "CE_CHUNK_BYTES", 128 * 50304 * 4)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name="t", **TINY)).double()
    idx = torch.randint(0, 50257, (5, 60))
    labels = torch.randint(0, 50257, (5, 60))
    labels[0, :9] = -100
    labels[2, 30:] = -100
    weights = torch.rand(5, 60, dtype=torch.float64) * (labels != -100)
    kw = {}
    if use_target_pos:
        kw["target_pos"] = (labels.flatten() != -100).nonzero().squeeze(1)
    chunks = microft.models.config.ce_chunks(idx.numel(), model.config.padded_vocab_size)
    assert chunks == [(0, 128), (128, 128), (256, 44)]
    fused = model(idx, labels, weights, **kw)
    fused.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = _reference_loss(model, idx, labels, weights)
    ref.backward()
    torch.testing.assert_close(fused, ref.float(), rtol=1e-6, atol=1e-5)  # the loss sums in fp32
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)  # the head computes in fp32
    assert got["wte.weight"][model.config.vocab_size :].abs().max() == 0  # padded rows never learn


def test_frozen_tied_weight_gets_no_gradient_and_inputs_still_do():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name="t", **TINY))
    model.wte.weight.requires_grad_(False)
    idx = torch.randint(0, 50257, (2, 16))
    model(idx, idx).backward()
    assert model.wte.weight.grad is None
    assert model.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_compiled_model_gets_the_same_gradients():
    """torch.compile (dynamo; the eager backend needs no compiler) keeps the tied gradient whole."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name="t", **TINY))
    ref = Transformer(ModelConfig(name="t", **TINY))
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 50257, (2, 16))
    torch.compile(model, backend="eager")(idx, idx).backward()
    ref(idx, idx).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_short_cpu_attention_matches_sdpa():
    """The plain-op causal attention used on CPU in bf16 up to 256 positions is SDPA's function."""
    from microft.models.transformer import causal_attention_math

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    y = causal_attention_math(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("packed", [False, True])
def test_short_cpu_attention_adds_its_mask_with_masked_fills_bits(dtype, packed):
    """The mask is added as 0/-inf: the same output and gradients, bit for bit, as filling the masked
    scores with -inf (grouped key/value heads, causal or block-diagonal packed mask)."""
    from microft.models.transformer import causal_attention_math, packed_attention_mask

    torch.manual_seed(0)
    B, T = 2, 19
    q = torch.randn(B, 4, T, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, 2, T, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    pos = torch.tensor([list(range(7)) + list(range(12)), list(range(T))])
    allowed = packed_attention_mask(pos) if packed else None

    def filled(q, k, v):
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        mask = allowed if packed else torch.ones(T, T, dtype=torch.bool).tril_()
        att = (q @ kk.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))
        return att.masked_fill_(~mask, float("-inf")).softmax(-1) @ vv

    y, ref = causal_attention_math(q, k, v, allowed), filled(q, k, v)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert torch.equal(a, b)

def test_bf16_model_takes_the_short_path_and_agrees_with_sdpa(monkeypatch):
    # a CPU with native bf16 (where bf16 is emulated, it runs in fp32)
    monkeypatch.setenv("MICROFT_CPU_BF16", "1")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name="t", **TINY)).to(torch.bfloat16)
    idx = torch.randint(0, 50257, (2, 24))
    calls = []
    sdpa_fn = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa_fn(*a, **kw))
    short = model(idx, idx)
    assert not calls
    model.kernels.cpu_math_attention_max_len = 0  # one object, shared by every block
    sdpa = model(idx, idx)
    assert len(calls) == len(model.h)
    torch.testing.assert_close(short, sdpa, rtol=2e-2, atol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
def test_mlp_recomputing_gelu_gives_the_gradients_of_the_plain_mlp(precision):
    """model._GeluLinear keeps only gelu's input and recomputes gelu in backward: the same bits."""
    from microft.models.transformer import MLP

    torch.manual_seed(0)
    cfg = ModelConfig(name="t", **TINY)
    mlp = MLP(cfg)
    if precision == "bf16-true":
        mlp.to(torch.bfloat16)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    x = torch.randn(3, 5, cfg.n_embd, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, cfg.n_embd, dtype=dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def grads(fn):
        with autocast:
            y = fn(x)
        return [y.detach(), *torch.autograd.grad(y, [x, *mlp.parameters()], g)]

    fused = grads(mlp)
    plain = grads(lambda t: mlp.c_proj(torch.nn.functional.gelu(mlp.c_fc(t), approximate="tanh")))
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)  # the same ops in the same dtypes: the same bits


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_bf16_preset_is_built_in_bf16_with_the_fp32_init_rounded(preset):
    """A bf16 preset (bf16-true runs) is drawn tensor by tensor straight into bf16: the values are the fp32
    init's for the same seed, rounded, and no fp32 copy of the whole model is ever held."""
    torch.manual_seed(3)
    ref = load_model(preset).to(torch.bfloat16)  # fp32 init, then rounded
    torch.manual_seed(3)
    got = load_model(preset, dtype=torch.bfloat16)
    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert ref_state.keys() == got_state.keys()
    for name, t in got_state.items():
        assert t.dtype == ref_state[name].dtype, name
        assert torch.equal(t, ref_state[name]), name
    assert all(p.dtype == torch.bfloat16 for p in got.parameters())


def test_head_logits_take_onednn_for_a_real_vocabulary_and_equal_mm(monkeypatch):
    """The LM head's logits on an AMD CPU in fp32: oneDNN for a tokenizer-sized vocabulary, `mm` for small
    heads (the demo), and the same values either way (fp32 sums in another order)."""
    from microft.models import linear as loss

    torch.manual_seed(0)
    h, big, small = torch.randn(300, 64), torch.randn(loss.ONEDNN_HEAD_MIN_VOCAB, 64), torch.randn(1088, 64)
    calls = []
    monkeypatch.setattr(loss, "_fp32_onednn", True)  # the AMD route, on whatever CPU runs the test
    if loss._ONEDNN_LINEAR is not None:
        real = loss._ONEDNN_LINEAR
        monkeypatch.setattr(loss, "_ONEDNN_LINEAR", lambda *a: calls.append(a[1].shape) or real(*a))
    got_big, got_small = loss.head_logits(h, big), loss.head_logits(h, small)
    torch.testing.assert_close(got_big, h @ big.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(got_small, h @ small.t())
    if loss._ONEDNN_LINEAR is not None:
        assert calls == [big.shape]
    assert loss.head_logits(h.bfloat16(), big.bfloat16()).dtype == torch.bfloat16  # other dtypes: plain mm

