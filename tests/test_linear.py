"""models.linear: oneDNN forwards on a CPU in fp32, F.linear's values and gradients, and its off switch."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
def test_linear_forward_through_onednn_gives_f_linear_values_and_gradients(monkeypatch, bias, frozen):
    """models.linear: on a CPU in fp32 the forward goes through oneDNN (when torch has it), the backward is
    F.linear's; values and every gradient equal F.linear's up to fp32 summation order."""
    from microft.models import linear as L

    calls = []
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
        L.linear(x.bfloat16(), w.bfloat16())  # other dtypes: F.linear
        L.linear(x[..., :128], w[:, :128])  # a narrow layer (the demo's 128): F.linear
        assert calls == []


def test_onednn_can_be_turned_off_by_the_environment():
    import subprocess
    import sys

    code = "import microft.models.linear as L; print(L._ONEDNN_LINEAR is None)"
    env = {**os.environ, "MICROFT_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"
