"""models.linear: oneDNN forwards on a CPU in fp32, F.linear's values and gradients, and its off switch."""

from __future__ import annotations

import os
import shutil

import pytest
import torch


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
def test_linear_forward_through_onednn_gives_f_linear_values_and_gradients(monkeypatch, bias, frozen):
    """models.linear: on a CPU in fp32 the forward goes through oneDNN (when torch has it), the backward is
    F.linear's; values and every gradient equal F.linear's up to fp32 summation order."""
    from microft.models import linear as L

    calls = []
    monkeypatch.setattr(L, "_fp32_onednn", True)  # the AMD route, on whatever CPU runs the test
    if L._ONEDNN_LINEAR is not None:
        real = L._ONEDNN_LINEAR
        monkeypatch.setattr(L, "_ONEDNN_LINEAR", lambda *a: calls.append(tuple(a[0].shape)) or real(*a))
    torch.manual_seed(0)
    x = torch.randn(3, 50, 256, requires_grad=True)
    w = torch.randn(320, 256, requires_grad=not frozen)
    b = torch.randn(320, requires_grad=True) if bias else None
    dy = torch.randn(3, 50, 320)
    got = L.linear(x, w, b)
    got.backward(dy)
    grads = [t.grad.clone() for t in (x, w, b) if t is not None and t.requires_grad]
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    ref = torch.nn.functional.linear(x, w, b)
    ref.backward(dy)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)  # |y| ~ 16: fp32 sums in another order
    for g, t in zip(grads, [t for t in (x, w, b) if t is not None and t.requires_grad], strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-4)
    if L._ONEDNN_LINEAR is not None:
        assert calls == [(150, 256)]
        calls.clear()
        L.linear(x[:, :2], w, b)  # 6 rows (a decode step): F.linear
        monkeypatch.setenv("MICROFT_CPU_BF16", "0")
        with L.native_half_matmuls():
            L.linear(x.bfloat16(), w.bfloat16())  # bf16 where the CPU has no native bf16: F.linear
        L.linear(x.double(), w.double())  # other dtypes: F.linear
        L.linear(x[..., :128], w[:, :128])  # a narrow layer (the demo's 128): F.linear
        assert calls == []


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_linear_on_a_native_bf16_cpu_goes_through_onednn_with_f_linears_bits(monkeypatch, autocast):
    """Where the CPU has bf16 (forced here), a bf16 linear's forward (under autocast: after autocast's casts)
    goes through oneDNN and gives F.linear's bits; its gradients match F.linear's to bf16's rounding."""
    from microft.models import linear as L

    if not L._ONEDNN_BF16:  # an AVX2-only CPU, or one held there (ONEDNN_MAX_CPU_ISA=AVX2, make test-avx2)
        pytest.skip("no native bf16 here, or oneDNN cannot run a bf16 linear")
    monkeypatch.setenv("MICROFT_CPU_BF16", "1")
    calls = []
    real = L._ONEDNN_LINEAR
    monkeypatch.setattr(L, "_ONEDNN_LINEAR", lambda *a: calls.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    dt = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(2, 40, 256, dtype=dt, requires_grad=True)
    w = (torch.randn(288, 256) / 16).to(dt).requires_grad_()
    b = torch.randn(288, dtype=dt, requires_grad=True)
    dy = torch.randn(2, 40, 288, dtype=torch.bfloat16)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, w, b)
        y.backward(dy)
        grads = [t.grad for t in (x, w, b)]
        for t in (x, w, b):
            t.grad = None
        return y, grads

    got, got_grads = run(L.linear)
    assert calls == [torch.bfloat16]
    ref, ref_grads = run(torch.nn.functional.linear)
    assert got.dtype == ref.dtype == torch.bfloat16 and torch.equal(got, ref)
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert g.dtype == r.dtype == dt
        torch.testing.assert_close(g, r, rtol=2**-7, atol=2**-7 * r.abs().max().item())


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_never_goes_to_onednn_where_it_cannot_run_bf16(monkeypatch, autocast):
    """MICROFT_CPU_BF16=1 on a CPU whose oneDNN has no bf16 linear (AVX2 only): torch's own F.linear (which
    emulates bf16) takes the product, never oneDNN's linear, which would raise "could not create a primitive
    descriptor"; the same values as F.linear."""
    from microft.models import linear as L

    monkeypatch.setenv("MICROFT_CPU_BF16", "1")
    monkeypatch.setattr(L, "_ONEDNN_BF16", False)
    monkeypatch.setattr(L, "_ONEDNN_DTYPES", L._ONEDNN_DTYPES - {torch.bfloat16})
    calls = []
    monkeypatch.setattr(L, "_ONEDNN_LINEAR",
                        lambda *a: calls.append(a[0].dtype) or pytest.fail("oneDNN called"))
    torch.manual_seed(0)
    dt = torch.float32 if autocast else torch.bfloat16
    x, w = torch.randn(2, 40, 256, dtype=dt), (torch.randn(288, 256) / 16).to(dt)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, ref = L.linear(x, w), torch.nn.functional.linear(x, w)
    assert calls == [] and got.dtype == torch.bfloat16 and torch.equal(got, ref)
    assert not L._autocast_taken_over(x.float()) and not L.onednn_runs(torch.bfloat16)


def test_onednn_held_to_avx2_is_a_cpu_without_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 (what an AVX2-only CPU has): no native bf16, no oneDNN bf16 or fp16 linear, and
    a 256-wide bf16 linear runs even with MICROFT_CPU_BF16=1 forced (it used to crash in oneDNN)."""
    import subprocess
    import sys

    code = ("import torch, microft.models.linear as L, microft.models.precision as P\n"
            "x, w = torch.randn(128, 256).bfloat16(), torch.randn(320, 256).bfloat16()\n"
            "y = L.linear(x, w)\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
            "    z = L.linear(x.float(), w.float())\n"
            "print(P.native_cpu_bf16(), L.onednn_runs(torch.bfloat16), L.onednn_runs(torch.float16),"
            " L.onednn_runs(torch.float32), torch.equal(y, z))\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "MICROFT_CPU_BF16": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    from microft.models import linear as L

    fp32 = "True" if L._ONEDNN_LINEAR is not None else "False"
    assert out.stdout.split() == ["False", "False", "False", fp32, "True"]


def test_the_onednn_isa_cap_is_read_from_either_name():
    from microft.models.precision import onednn_isa_without_bf16

    assert onednn_isa_without_bf16({"ONEDNN_MAX_CPU_ISA": "avx2"})
    # AVX-512 without its bf16 instructions
    assert onednn_isa_without_bf16({"DNNL_MAX_CPU_ISA": "AVX512_CORE"})
    # the new name wins
    assert onednn_isa_without_bf16({"ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "ALL"})
    assert not onednn_isa_without_bf16({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"})
    assert not onednn_isa_without_bf16({"ONEDNN_MAX_CPU_ISA": "ALL"}) and not onednn_isa_without_bf16({})


def test_fp32_forwards_take_onednn_on_amd_cpus_only(monkeypatch):
    """The fp32 route follows the vendor in /proc/cpuinfo (MKL's Intel path was the faster one on Intel);
    MICROFT_ONEDNN=1 takes it on any CPU."""
    from microft.models import linear as L

    amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: AMD EPYC 7B13\n"
    intel = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    assert L.amd_x86(amd) and not L.amd_x86(intel) and not L.amd_x86("model name\t: AMD-like\n")
    monkeypatch.setattr(L, "amd_x86", lambda: False)
    monkeypatch.delenv("MICROFT_ONEDNN", raising=False)
    assert not L._fp32_onednn_default()
    monkeypatch.setenv("MICROFT_ONEDNN", "1")
    assert L._fp32_onednn_default()
    monkeypatch.setattr(L, "_fp32_onednn", False)
    calls = []
    if L._ONEDNN_LINEAR is not None:
        real = L._ONEDNN_LINEAR
        monkeypatch.setattr(L, "_ONEDNN_LINEAR", lambda *a: calls.append(a[0].dtype) or real(*a))
    x, w = torch.randn(128, 256), torch.randn(320, 256)
    assert torch.equal(L.linear(x, w), torch.nn.functional.linear(x, w)) and calls == []


def test_onednn_can_be_turned_off_by_the_environment():
    import subprocess
    import sys

    code = "import microft.models.linear as L; print(L._ONEDNN_LINEAR is None)"
    env = {**os.environ, "MICROFT_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"


BF16_ULP = 2**-7  # bf16's relative rounding step: two roundings of the same fp32 sum differ by at most this


def _saved_dtypes(fn):
    """The dtypes of the tensors autograd saves while `fn` runs."""
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.dtype) or t, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_on_an_emulating_cpu_runs_in_fp32_and_rounds_once(monkeypatch, bias):
    """Where bf16 is emulated (forced here), a bf16 linear's value and gradients are the fp32 computation of
    the same bf16 operands, rounded to bf16 once; autograd keeps only bf16 tensors, as for F.linear."""
    from microft.models import linear as L

    monkeypatch.setenv("MICROFT_CPU_BF16", "0")
    torch.manual_seed(0)
    x = torch.randn(3, 40, 256).bfloat16().requires_grad_()
    w = (torch.randn(300, 256) / 16).bfloat16().requires_grad_()
    b = torch.randn(300).bfloat16().requires_grad_() if bias else None
    dy = torch.randn(3, 40, 300).bfloat16()
    assert L.emulated_half(x, w)
    y, saved = _saved_dtypes(lambda: L.linear(x, w, b))
    assert y.dtype == torch.bfloat16 and set(saved) == {torch.bfloat16}
    y.backward(dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_() if bias else None
    ref = torch.nn.functional.linear(x32, w32, b32)
    ref.backward(dy.float())
    close = dict(rtol=BF16_ULP, atol=1e-2)
    torch.testing.assert_close(y.float(), ref.bfloat16().float(), **close)
    torch.testing.assert_close(x.grad.float(), x32.grad.bfloat16().float(), **close)
    torch.testing.assert_close(w.grad.float(), w32.grad.bfloat16().float(), **close)
    if bias:
        torch.testing.assert_close(b.grad.float(), b32.grad.bfloat16().float(), **close)
    with L.native_half_matmuls():  # torch's own (emulated) bf16 kernels agree to bf16's precision
        torch.testing.assert_close(L.linear(x, w, b).float(), y.float(), rtol=2 * BF16_ULP, atol=0.05)


def test_bf16_matmuls_keep_torch_kernels_where_bf16_is_native(monkeypatch):
    from microft.models import linear as L

    x = torch.randn(4, 256).bfloat16()
    monkeypatch.setenv("MICROFT_CPU_BF16", "1")
    assert not L.emulated_half(x)
    monkeypatch.setenv("MICROFT_CPU_BF16", "0")
    assert L.emulated_half(x) and not L.emulated_half(x.float())
    with L.native_half_matmuls():
        assert not L.emulated_half(x)


def test_autocast_linear_on_an_emulating_cpu_casts_then_runs_in_fp32(monkeypatch):
    """bf16-mixed where bf16 is emulated: `linear` casts input, weight and bias to bf16 as autocast does,
    then multiplies in fp32 (rounded once); the fp32 weight gets its gradient through the cast."""
    from microft.models import linear as L

    monkeypatch.setenv("MICROFT_CPU_BF16", "0")
    torch.manual_seed(4)
    x = torch.randn(2, 30, 256, requires_grad=True)
    w, b = torch.randn(300, 256).div(16).requires_grad_(), torch.randn(300).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.linear(x, w, b)
    y.float().sum().backward()
    ref = torch.nn.functional.linear(x.bfloat16().float(), w.bfloat16().float(),
                                     b.bfloat16().float()).bfloat16()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=BF16_ULP, atol=1e-2)
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, x.detach().bfloat16().float().sum((0, 1)).expand(300, 256),
                               rtol=BF16_ULP, atol=0.05)


def test_bf16_mm_and_addmm_match_the_fp32_product_rounded(monkeypatch):
    """`mm` and `addmm_` (the loss head's products): fp32 sums of bf16 operands rounded once; addmm_ widens
    its accumulator a slice at a time and gives the same bits as in one piece."""
    from microft.models import linear as L

    monkeypatch.setenv("MICROFT_CPU_BF16", "0")
    torch.manual_seed(1)
    a, b = torch.randn(96, 64).bfloat16(), torch.randn(64, 80).bfloat16()
    assert torch.equal(L.mm(a, b), (a.float() @ b.float()).bfloat16())
    assert torch.equal(L.mm(a.t().contiguous().t(), b), L.mm(a, b))  # any layout, the same product
    # a large b, widened in slices: columns, then summed rows
    monkeypatch.setattr(L, "MM_SLICE_ELEMS", 64 * 7)
    torch.testing.assert_close(L.mm(a, b).float(), (a.float() @ b.float()).bfloat16().float(), rtol=2**-7,
                               atol=0)
    tall = torch.randn(300, 20).bfloat16()
    g = torch.randn(96, 300).bfloat16()
    torch.testing.assert_close(L.mm(g, tall).float(), (g.float() @ tall.float()).bfloat16().float(),
                               rtol=2**-7, atol=0)
    # rows of a tall output
    assert torch.equal(L.mm(g.t(), a[:, :20]), (g.t().float() @ a[:, :20].float()).bfloat16())
    acc = torch.randn(96, 80).bfloat16()
    want = torch.addmm(acc.float(), a.float(), b.float()).bfloat16()
    whole = L.addmm_(acc.clone(), a, b)
    monkeypatch.setattr(L, "ADDMM_SLICE_ROWS", 7)
    sliced = L.addmm_(acc.clone(), a, b)
    assert torch.equal(whole, want) and torch.equal(sliced, want)


def test_bf16_attention_on_an_emulating_cpu_is_the_fp32_attention_rounded(monkeypatch):
    """half_via_fp32 (attention): forward and gradients of fp32 copies, rounded to bf16; autograd keeps
    the bf16 inputs only (backward recomputes the fp32 attention)."""
    import torch.nn.functional as F

    from microft.models import linear as L

    monkeypatch.setenv("MICROFT_CPU_BF16", "0")
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 33, 16).bfloat16().requires_grad_() for _ in range(3))
    dy = torch.randn(2, 4, 33, 16).bfloat16()
    attend = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    y, saved = _saved_dtypes(lambda: L.half_via_fp32(attend, q, k, v))
    assert set(saved) == {torch.bfloat16} and len(saved) == 3
    y.backward(dy)
    wide = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attend(*wide)
    ref.backward(dy.float())
    assert torch.equal(y, ref.bfloat16())
    for t, r in zip((q, k, v), wide, strict=True):
        assert torch.equal(t.grad, r.grad.bfloat16())


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_model_on_an_emulating_cpu_agrees_with_torch_kernels(monkeypatch, precision):
    """A whole bf16-true Qwen3-style model (attention, SwiGLU, the fused loss head): loss and gradients
    through the fp32 route agree with torch's bf16 kernels to bf16's precision."""
    from microft.models import linear as L
    from microft.models.config import ModelConfig
    from microft.models.transformer import Transformer

    monkeypatch.setenv("MICROFT_CPU_BF16", "0")
    cfg = ModelConfig.from_preset("qwen3-tiny")
    torch.manual_seed(3)
    model = Transformer(cfg).bfloat16() if precision == "bf16-true" else Transformer(cfg)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    idx = torch.randint(0, cfg.vocab_size, (2, 48))

    def run():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(idx, idx)
        loss.backward()
        return loss.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    loss, grads = run()
    with L.native_half_matmuls():
        loss_ref, grads_ref = run()
    torch.testing.assert_close(loss, loss_ref, rtol=0.02, atol=0.02)
    for n, g in grads.items():
        ref = grads_ref[n]
        err = (g - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 0.05, (n, err.item())


@pytest.mark.slow  # inductor compiles C++ kernels: ~1 min on 2 cores (make test-avx2 leaves it out)
def test_compiled_model_with_onednn_linears_traces_and_matches_eager(monkeypatch):
    """torch.compile (inductor) of a model wide enough for the oneDNN route (forced on, as on an AMD CPU):
    inductor cannot lower torch's oneDNN op as microft calls it, so compiled code takes F.linear and lets
    inductor choose (`--compile` used to fail on such CPUs); values and gradients equal the eager model's."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C compiler")
    from microft.models import linear as L
    from microft.models.config import ModelConfig
    from microft.models.transformer import Transformer

    monkeypatch.setattr(L, "_fp32_onednn", True)  # the linears and the LM head's logits
    shape = dict(name="t", vocab_size=16384, n_positions=128, n_embd=256, n_layer=1, n_head=4)
    torch.manual_seed(0)
    model, ref = Transformer(ModelConfig(**shape)), Transformer(ModelConfig(**shape))
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 16384, (2, 64))
    torch._dynamo.reset()
    got = torch.compile(model)(idx, idx)
    got.backward()
    want = ref(idx, idx)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_compiling_under_bf16_autocast_traces_the_cpu_probe_as_a_constant():
    """The CPU's bf16 answer is a module constant: dynamo traces `cpu_supports_bf16` without the warning it
    gives for cached functions (`--compile` printed it on every bf16-mixed CPU run)."""
    import warnings

    from microft.models.config import ModelConfig
    from microft.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(name="t", vocab_size=512, n_positions=32, n_embd=32, n_layer=1, n_head=4))
    idx = torch.randint(0, 512, (2, 16))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        torch.compile(model, backend="eager")(idx, idx).backward()
    assert not [w for w in seen if "lru_cache" in str(w.message)]
    assert model.h[0].mlp.c_fc.weight.grad is not None
