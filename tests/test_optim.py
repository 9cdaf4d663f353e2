"""MasterAdamW: bf16 parameters whose exact fp32 master weights live in 16 extra bits."""

from __future__ import annotations

import pytest
import torch

from microft.config import RunConfig
from microft.train.master_adamw import MasterAdamW, join_fp32, split_fp32
from microft.train.optim import build_optimizer
from tests.helpers import tiny_model


def test_split_and_join_are_exact_and_the_bf16_half_is_the_nearest():
    torch.manual_seed(0)
    x = torch.randn(100_003) * torch.logspace(-30, 30, 100_003)
    x[:6] = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38, -1.0e-40])
    hi = torch.empty_like(x, dtype=torch.bfloat16)
    lo = torch.empty_like(x, dtype=torch.int16)
    split_fp32(x.clone(), hi, lo)
    assert torch.equal(join_fp32(hi, lo).view(torch.int32), x.view(torch.int32))
    assert ((hi.float() - x).abs() <= (x.bfloat16().float() - x).abs()).all()


def test_with_fp32_moments_every_step_equals_fused_adamw_on_fp32_weights():
    """... with the gradient clip's divisor (`grad_scale`, see step.clip_gradients) on some steps too."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(300, 70).bfloat16())
    b = torch.nn.Parameter(torch.randn(5000).bfloat16())
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in (a, b)]
    opt = MasterAdamW([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                      lr=1e-3, betas=(0.9, 0.95), state_dtype=torch.float32)
    ref_opt = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.1},
                                 {"params": [ref[1]], "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95), fused=True)
    for divisor in (None, 3.5, 1.0, 17.0):
        for p, r in zip((a, b), ref):
            g = torch.randn(p.shape).bfloat16()
            p.grad, r.grad = g.clone(), g.float()
        for o in (opt, ref_opt):
            o.__dict__.pop("grad_scale", None)
            if divisor is not None:
                o.grad_scale = torch.tensor([divisor])
        opt.step()
        ref_opt.step()
        for p, r in zip((a, b), ref):
            assert torch.equal(join_fp32(p.detach(), opt.state[p]["master_lo"]), r.detach())
            err = (p.detach().float() - r.detach()).abs()  # the weight the model sees is the nearest bf16
            assert (err <= (r.detach().bfloat16().float() - r.detach()).abs()).all()


def test_updates_below_bf16_resolution_accumulate_instead_of_vanishing():
    """Plain bf16 AdamW rounds 1 - 1e-4 back to 1 every step; the master weight keeps walking."""
    plain = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    kept = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opts = [torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0), MasterAdamW([kept], lr=1e-4)]
    for _ in range(40):
        for p, opt in zip((plain, kept), opts):
            p.grad = torch.ones_like(p)
            opt.step()
    assert (plain == 1).all()
    master = join_fp32(kept.detach(), opts[1].state[kept]["master_lo"])
    assert torch.allclose(master, torch.full_like(master, 1 - 40e-4), rtol=0, atol=5e-5)  # bf16 moments
    assert (kept < 1).all()  # the bf16 weight the model sees moved too


def test_state_dict_round_trip_keeps_the_dtypes_and_continues_exactly():
    torch.manual_seed(0)
    grads = [torch.randn(1000).bfloat16() for _ in range(6)]
    p1 = torch.nn.Parameter(torch.randn(1000).bfloat16())
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = MasterAdamW([p1], lr=1e-2, weight_decay=0.1)
    o2 = MasterAdamW([p2], lr=1e-2, weight_decay=0.1)
    for g in grads[:3]:
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    saved = o2.state_dict()
    p3 = torch.nn.Parameter(p2.detach().clone())
    o3 = MasterAdamW([p3], lr=1e-2, weight_decay=0.1)
    o3.load_state_dict(saved)
    assert o3.state[p3]["master_lo"].dtype == torch.int16 and o3.state[p3]["exp_avg"].dtype == torch.bfloat16
    for g in grads[3:]:
        p1.grad, p3.grad = g.clone(), g.clone()
        o1.step()
        o3.step()
    assert torch.equal(p1, p3) and torch.equal(o1.state[p1]["master_lo"], o3.state[p3]["master_lo"])


def test_bf16_true_models_get_master_weights_and_others_do_not():
    cfg = RunConfig(lr=1e-3)
    model = tiny_model()
    assert isinstance(build_optimizer(model, cfg, torch.device("cpu")), torch.optim.AdamW)
    model.to(torch.bfloat16)
    opt = build_optimizer(model, cfg.model_copy(update={"precision": "bf16-true"}), torch.device("cpu"))
    assert isinstance(opt, MasterAdamW)
    idx = torch.randint(0, 500, (2, 8))
    model(idx, idx).backward()
    opt.step()
    for name, p in model.named_parameters():
        master = join_fp32(p.detach(), opt.state[p]["master_lo"])
        assert master.dtype == torch.float32 and torch.equal(master.bfloat16(), p.detach()), name


@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_a_clip_handed_to_fused_adamw_equals_clip_grad_norm_then_step(max_norm):
    """clip_gradients with a fused AdamW: the kernel divides by the clip's divisor instead of a separate pass
    over the gradients; the same norm, the same update up to rounding, nothing left for the next step."""
    from microft.train.step import clip_gradients, optimizer_step, takes_grad_scale

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 7)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in models]
    assert takes_grad_scale(opts[0]) and not takes_grad_scale(torch.optim.AdamW(models[0].parameters()))
    assert takes_grad_scale(MasterAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(16, 40)
    for _ in range(3):
        for m in models:
            m(x).pow(2).sum().backward()
        fused = clip_gradients(models[0], max_norm, opts[0])
        divisor = max(1.0, (fused.item() + 1e-6) / max_norm)
        assert opts[0].grad_scale.item() == pytest.approx(divisor, rel=1e-6)
        plain = clip_gradients(models[1], max_norm)
        assert torch.equal(fused, plain)
        for o in opts:
            optimizer_step(o, scaler)
        assert not hasattr(opts[0], "grad_scale")
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            if max_norm > 1:  # never clipped: a division by exactly 1, the same bits
                assert torch.equal(p, q)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
