"""NF4: codes against a naive nearest-level reference, error bounds, NF4Linear against F.linear, fake/meta,
state dicts."""

import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from microft.errors import ConfigError
from microft.models.linear import linear
from microft.models.quant import (
    NF4_LEVELS,
    NF4_PIVOTS,
    NF4Linear,
    dequantize_nf4,
    dynamic_map,
    nf4_nbytes,
    quantize_model_,
    quantize_nf4,
    quantize_tensor_for_load,
)

LEVELS64 = torch.tensor(NF4_LEVELS, dtype=torch.float64)
# the tie points, rounded to fp32 as the CUDA pivots are
MIDS32 = ((LEVELS64[:-1] + LEVELS64[1:]) / 2).float()


def unpack(codes: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack((codes >> 4, codes & 15), dim=1).reshape(-1)[:numel].long()


def reference_codes(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Nearest NF4 level to x * (1/absmax) (fp32 product), distances in float64; a value on a (fp32) midpoint
    takes the lower level, as bitsandbytes' strict `x > pivot` does; an all-zero block maps to level 0.0.
    (Each test case's blocks are all-overflowing or all-not, so the division rule can be per case.)"""
    flat = w.reshape(-1).float()
    x = F.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    absmax = x.abs().amax(1, keepdim=True)
    inv = 1 / absmax
    # documented: divide where 1/absmax overflows
    scaled = x * inv if torch.isfinite(inv).all() else x / absmax
    scaled = torch.where(absmax > 0, scaled, torch.zeros_like(x)).reshape(-1)
    ref = (scaled.double()[:, None] - LEVELS64).abs().argmin(1)  # argmin: the first (lower) level on a tie
    on_mid = scaled[:, None] == MIDS32
    ref = torch.where(on_mid.any(1), on_mid.int().argmax(1), ref)
    return ref[: flat.numel()]


def adversarial_blocks() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    outlier = torch.randn(4, 64, generator=g) * 1e-3
    outlier[1, 7] = 1e4
    mids = torch.cat([MIDS32, torch.nextafter(MIDS32, torch.full_like(MIDS32, 2)),
                      torch.nextafter(MIDS32, torch.full_like(MIDS32, -2)), torch.tensor([1.0] * 19)])
    return {
        "random": torch.randn(33, 64, generator=g),
        "zeros": torch.zeros(2, 64),
        "outlier": outlier,
        "tiny": torch.randn(2, 64, generator=g) * 1e-30,
        "subnormal": torch.randn(2, 64, generator=g) * 1e-41,  # 1/absmax overflows: divided instead
        "midpoints": torch.stack([mids, -mids]),  # absmax exactly 1: x * (1/absmax) == x
        "ragged": torch.randn(7, 13, generator=g),  # 91 values: a padded last block, an odd byte count
        "bf16": torch.randn(8, 64, generator=g).bfloat16(),
    }


def test_constants_are_the_published_ones():
    assert len(NF4_LEVELS) == 16 and sorted(NF4_LEVELS) == list(NF4_LEVELS)
    assert torch.equal(torch.tensor(NF4_PIVOTS, dtype=torch.float32), MIDS32)
    code = dynamic_map(signed=True)
    assert code.numel() == 256 and code[-1] == 1.0 and (code == 0).sum() == 1
    assert torch.all(code[1:] > code[:-1])


@pytest.mark.parametrize("case", list(adversarial_blocks()))
@pytest.mark.parametrize("double_quant", [False, True])
def test_codes_match_naive_reference(case, double_quant):
    w = adversarial_blocks()[case]
    q = quantize_nf4(w, double_quant=double_quant)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == (w.numel() + 1) // 2
    assert torch.equal(unpack(q.codes, w.numel()), reference_codes(w))
    assert q.nbytes == nf4_nbytes(w.numel(), double_quant=double_quant)
    d = dequantize_nf4(q, torch.float32)
    assert d.shape == w.shape and d.dtype == torch.float32 and torch.isfinite(d).all()


def test_first_element_in_high_nibble():
    w = torch.tensor([1.0, -1.0] + [0.0] * 62)
    assert quantize_nf4(w).codes[0].item() == 0xF0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_refused(bad):
    w = torch.randn(4, 64)
    w[2, 3] = bad
    with pytest.raises(ConfigError, match="h.0.mlp.weight"):
        quantize_nf4(w, name="h.0.mlp.weight")


def test_dequantization_error_bounded():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    half_gap = (LEVELS64[1:] - LEVELS64[:-1]).max().item() / 2
    for dq in (False, True):
        d = quantize_nf4(w, double_quant=dq).dequantize(torch.float32).reshape(-1, 64)
        # each block's largest value sits on level +-1: the absmax used
        stored = d.abs().amax(1, keepdim=True)
        assert dq or torch.equal(stored, absmax)
        # d - w = (level - w/absmax) * absmax + level * (stored - absmax)
        bound = absmax * half_gap + (stored - absmax).abs()
        assert torch.all((d - w.reshape(-1, 64)).abs() <= bound * (1 + 1e-6))
        assert dq is False or (stored - absmax).abs().max() < 0.01 * absmax.max()
    zeros = quantize_nf4(torch.zeros(3, 64), double_quant=True).dequantize()
    assert torch.equal(zeros, torch.zeros(3, 64))


def test_double_quant_absmax_close():
    w = torch.randn(1024, 64) * torch.rand(1024, 1)
    single, double = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert double.absmax.dtype == torch.uint8 and double.absmax2.numel() == 4
    assert torch.equal(single.codes, double.codes)
    rel = (double.dequantize() - single.dequantize()).abs().max() / w.abs().max()
    assert rel < 0.01


def make_layer(bias=True, double_quant=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(96, 80, bias=bias)
    return lin, NF4Linear.from_linear(lin, double_quant=double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_equals_linear_on_dequantized(dtype, double_quant):
    lin, m = make_layer(double_quant=double_quant)
    m = m.to(dtype)
    x = torch.randn(3, 5, 96, dtype=dtype)
    w = m.weight.dequantize(dtype)
    assert torch.equal(m(x), linear(x, w, m.bias))  # microft's linear: F.linear, bf16 via fp32 where emulated
    # .to(bf16) kept fp32 scales
    assert m.weight_absmax.dtype == (torch.uint8 if double_quant else torch.float32)


def test_forward_under_autocast():
    _, m = make_layer()
    x = torch.randn(4, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        ref = F.linear(x, m.weight.dequantize(torch.float32), m.bias)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_grads_match_dequantized_base_with_lora_path():
    _, m = make_layer()
    ref = nn.Linear(96, 80)
    with torch.no_grad():
        ref.weight.copy_(m.weight.dequantize(torch.float32))
        ref.bias.copy_(m.bias)
    ref.requires_grad_(False)
    torch.manual_seed(1)
    a, b = torch.randn(8, 96) * 0.1, torch.randn(80, 8) * 0.1
    x = torch.randn(6, 96)
    grads = []
    for base in (m, ref):
        xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
        y = base(xi) + (xi @ ai.T @ bi.T) * 2.0
        (y.square().sum()).backward()
        grads.append((xi.grad, ai.grad, bi.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_backward_saves_no_dequantized_weight():
    _, m = make_layer()
    saved = []
    x = torch.randn(4, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    assert all(t.dtype == torch.uint8 or t.numel() < 96 * 80 / 32 for t in saved), \
        [(t.dtype, t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None


def test_fake_tensor_mode_and_meta():
    with FakeTensorMode():
        w = torch.randn(80, 96)
        q = quantize_nf4(w, double_quant=True)
        m = NF4Linear(96, 80, double_quant=True)
        m.set_weight(q)
        x = torch.randn(2, 96, requires_grad=True)
        y = m(x)
        y.sum().backward()
        assert y.shape == (2, 80) and x.grad.shape == (2, 96)
    m = NF4Linear(96, 80, device="meta")
    x = torch.randn(2, 96, device="meta", requires_grad=True)
    m(x).sum().backward()
    assert x.grad.device.type == "meta"


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_and_load_hook(double_quant):
    lin, m = make_layer(double_quant=double_quant)
    sd = m.state_dict()
    assert set(sd) == ({"bias", "weight_nf4", "weight_absmax"}
                       | ({"weight_absmax2", "weight_offset"} if double_quant else set()))
    fresh = NF4Linear(96, 80, double_quant=double_quant)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), m(x))
    # a full-precision checkpoint, one tensor at a time, into a model built on meta
    lazy = NF4Linear(96, 80, double_quant=double_quant, device="meta")
    for name, t in lin.state_dict().items():
        lazy.load_state_dict({name: t}, strict=False, assign=True)
    assert torch.equal(lazy(x), m(x))
    entries = quantize_tensor_for_load("h.0.fc.weight", lin.weight, double_quant=double_quant)
    assert all(k.startswith("h.0.fc.weight_") for k in entries)
    assert torch.equal(entries["h.0.fc.weight_nf4"], sd["weight_nf4"])


def test_quantize_model_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 10))
    x = torch.randn(2, 64)
    names = quantize_model_(model, lambda name, mod: mod.out_features != 10, double_quant=True)
    assert names == ["0", "2"] and isinstance(model[0], NF4Linear) and isinstance(model[3], nn.Linear)
    h = F.gelu(F.linear(x, model[0].weight.dequantize(), model[0].bias))
    ref = model[3](F.linear(h, model[2].weight.dequantize(), model[2].bias))
    assert torch.equal(model(x), ref)
    tied = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 10, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ConfigError, match="shared"):
        quantize_model_(tied, lambda n, m: True)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available(),
                    reason="bitsandbytes with CUDA not available")
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_reads_our_codes(double_quant):
    import bitsandbytes.functional as bnbf

    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    q = quantize_nf4(w, double_quant=double_quant)
    ours = q.dequantize()
    theirs_codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                             compress_statistics=double_quant)
    assert torch.equal(theirs_codes.view(-1), q.codes)
    if double_quant:
        assert torch.equal(state.state2.code, dynamic_map(True, "cuda"))
        state.absmax, state.state2.absmax, state.offset = q.absmax, q.absmax2, q.offset
    else:
        state.absmax = q.absmax
    assert torch.equal(bnbf.dequantize_4bit(q.codes.view(-1, 1), state), ours)
