"""AdamW8bit: bit-exact state round trip and resume, closeness to fp32 AdamW, state bytes."""

import copy
import io

import torch
import torch.nn as nn

from microft.train.optim8bit import BLOCK, AdamW8bit, state_nbytes


def regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    y = x @ torch.randn(128, 64, generator=g) / 128 ** 0.5 + 0.1 * torch.randn(512, 64, generator=g)
    torch.manual_seed(seed)
    # 12288 + 6144 weights, small biases
    model = nn.Sequential(nn.Linear(128, 96), nn.Tanh(), nn.Linear(96, 64))
    return model, x, y


def groups(model):
    return [{"params": [p for p in model.parameters() if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def train(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_and_resume_bit_exact():
    model, x, y = regression()
    ref = copy.deepcopy(model)
    ref_opt = AdamW8bit(groups(ref), lr=1e-2)
    train(ref, ref_opt, x, y, 6)

    opt = AdamW8bit(groups(model), lr=1e-2)
    train(model, opt, x, y, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed, _, _ = regression(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = AdamW8bit(groups(resumed), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert s1.keys() == s2.keys()
        for k in s1:
            if torch.is_tensor(s1[k]):
                assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]), k
            else:
                assert s1[k] == s2[k]
    train(resumed, opt2, x, y, 3)
    for a, b in zip(resumed.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    big = opt2.state[resumed[0].weight]
    assert big["exp_avg_codes"].dtype == torch.uint8 and big["exp_avg_absmax"].dtype == torch.float32


def test_deterministic():
    runs = []
    for _ in range(2):
        model, x, y = regression()
        train(model, AdamW8bit(groups(model), lr=1e-2), x, y, 4)
        runs.append([p.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_tracks_fp32_adamw():
    model, x, y = regression()
    ref = copy.deepcopy(model)
    got = train(model, AdamW8bit(groups(model), lr=3e-3), x, y, 100)
    want = train(ref, torch.optim.AdamW(groups(ref), lr=3e-3, foreach=False), x, y, 100)
    assert want[-1] < 0.05 * want[0]  # it does learn
    for a, b in zip(got, want):
        assert abs(a - b) <= 0.05 * b, (a, b)  # measured: <= 2.5%


def test_small_tensors_match_torch_adamw_exactly():
    torch.manual_seed(0)
    p1 = torch.randn(100, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_()
    o1 = AdamW8bit([p1], lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1, foreach=False)
    for i in range(5):
        g = torch.randn(100, generator=torch.Generator().manual_seed(i))
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.equal(p1, p2)


def test_bf16_params_and_ragged_blocks():
    torch.manual_seed(0)
    p = torch.randn(5000, dtype=torch.bfloat16, requires_grad=True)  # not a multiple of 256
    opt = AdamW8bit([p], lr=1e-2)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    assert p.dtype == torch.bfloat16 and not torch.equal(p, before) and torch.isfinite(p).all()
    assert opt.state[p]["exp_avg_absmax"].numel() == -(-5000 // BLOCK)


def test_state_is_about_two_bytes_per_param():
    model, x, y = regression()
    opt = AdamW8bit(groups(model), lr=1e-2)
    train(model, opt, x, y, 1)
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t))
    assert held == sum(state_nbytes(p.numel()) for p in model.parameters())
    big = sum(p.numel() for p in model.parameters() if p.numel() >= 4096)
    assert state_nbytes(big) / big < 2.04
