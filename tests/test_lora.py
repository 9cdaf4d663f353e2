"""LoRA: freezing, gradients, merging, PEFT-layout adapter files, checkpointing and fake tensors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from microft.errors import CheckpointError, ConfigError
from microft.models.config import ModelConfig
from microft.models.load import model_state_dict
from microft.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    apply_lora,
    is_adapter_dir,
    load_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    parse_targets,
    save_adapter,
)
from microft.models.transformer import Transformer, set_grad_checkpointing

CFG = ModelConfig(name="t", vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)


def make_model(seed: int = 0, cfg: ModelConfig = CFG) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def batch(seed: int = 1, b: int = 2, t: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (b, t), generator=g)


def randomize_adapters(model: Transformer, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lin in lora_modules(model):
            lin.lora_B.weight.copy_(torch.randn(lin.lora_B.weight.shape, generator=g) * 0.1)


def sgd_steps(model: Transformer, steps: int = 3, lr: float = 0.5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        idx = batch(10 + s)
        opt.zero_grad()
        model(idx, idx).backward()
        opt.step()


def test_parse_targets():
    assert parse_targets("qkv,proj") == ["qkv", "proj"]
    assert parse_targets("proj, qkv") == ["qkv", "proj"]
    assert parse_targets("attn") == ["qkv", "proj"]
    assert parse_targets("mlp") == ["fc", "mlp_proj"]
    assert parse_targets("all") == ["qkv", "proj", "fc", "mlp_proj"]
    assert parse_targets("fc,mlp,qkv") == ["qkv", "fc", "mlp_proj"]
    with pytest.raises(ConfigError, match="valid targets: qkv, proj, fc, mlp_proj, attn, mlp, all"):
        parse_targets("qkv,q_proj")
    with pytest.raises(ConfigError):
        parse_targets("")


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(alpha=0.0), dict(dropout=1.0), dict(targets="lm_head")])
def test_bad_settings_raise_config_error(kwargs):
    args = dict(r=4, alpha=8.0, dropout=0.0, targets="all") | kwargs
    with pytest.raises(ConfigError):
        apply_lora(make_model(), **args)


def test_apply_twice_refused():
    model = make_model()
    apply_lora(model, 4, 8.0, 0.0, "qkv")
    with pytest.raises(ConfigError, match="already"):
        apply_lora(model, 4, 8.0, 0.0, "qkv")


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_only_adapters_trainable_and_get_grads(grad_ckpt):
    model = make_model()
    n = apply_lora(model, 4, 8.0, 0.1, "all")
    if grad_ckpt:
        assert set_grad_checkpointing(model) == CFG.n_layer
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert len(trainable) == 2 * 4 * CFG.n_layer
    assert (
        n
        == model.num_params(trainable_only=True)
        == sum(p.numel() for p in model.parameters() if p.requires_grad)
    )
    model.train()
    idx = batch()
    model(idx, idx).backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), k
        else:
            assert p.grad is None, k
    # B starts at zero, so only B gets a gradient signal on the first step
    assert model.h[0].attn.c_attn.lora_B.weight.grad.abs().sum() > 0


def test_grad_checkpointing_gives_same_grads():
    """Checkpointing replays dropout with the same RNG state, so gradients match exactly."""
    grads = []
    for ckpt in (False, True):
        model = make_model()
        apply_lora(model, 4, 8.0, 0.1, "all")
        randomize_adapters(model)
        set_grad_checkpointing(model, ckpt)
        model.train()
        idx = batch()
        torch.manual_seed(123)
        model(idx, idx).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_base_weights_bit_identical_after_sgd(grad_ckpt):
    model = make_model()
    before = {k: v.clone() for k, v in model_state_dict(model).items()}
    apply_lora(model, 4, 8.0, 0.0, "all")
    set_grad_checkpointing(model, grad_ckpt)
    sgd_steps(model)
    after = model_state_dict(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(lin.lora_B.weight.abs().sum() > 0 for _, lin in lora_modules(model))


def test_base_state_dict_keys_unchanged():
    plain = make_model()
    model = make_model()
    apply_lora(model, 4, 8.0, 0.0, "all")
    base_keys = {k for k in model.state_dict() if "lora_" not in k}
    assert base_keys == set(plain.state_dict())
    assert model_state_dict(model).keys() == model_state_dict(plain).keys()


def test_merge_matches_adapter_logits():
    model = make_model()
    apply_lora(model, 4, 8.0, 0.1, "all")
    sgd_steps(model)
    assert all(lin.lora_B.weight.abs().sum() > 0 for _, lin in lora_modules(model))
    model.eval()
    idx = batch(5)
    with torch.no_grad():
        with_adapter = model(idx)
        base = make_model()(idx)
        assert (with_adapter - base).abs().max() > 1e-3  # the adapter does something
        merged = merge_lora(model)
        assert merged is model
        merged_logits = merged(idx)
    torch.testing.assert_close(merged_logits, with_adapter, rtol=0, atol=1e-5)
    assert not lora_modules(merged)
    assert set(merged.state_dict()) == set(make_model().state_dict())
    assert "forward" not in vars(merged.h[0].attn.c_attn)


def test_peft_key_layout():
    model = make_model()
    apply_lora(model, 4, 8.0, 0.0, "all")
    sd = lora_state_dict(model)
    C = CFG.n_embd
    shapes = {
        "attn.c_attn": (C, 3 * C),
        "attn.c_proj": (C, C),
        "mlp.c_fc": (C, 4 * C),
        "mlp.c_proj": (4 * C, C),
    }
    expected = {}
    for i in range(CFG.n_layer):
        for name, (fan_in, fan_out) in shapes.items():
            expected[f"base_model.model.transformer.h.{i}.{name}.lora_A.weight"] = (4, fan_in)
            expected[f"base_model.model.transformer.h.{i}.{name}.lora_B.weight"] = (fan_out, 4)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected

    model = make_model()
    apply_lora(model, 2, 4.0, 0.0, "qkv,proj")
    assert sorted(lora_state_dict(model)) == sorted(
        f"base_model.model.transformer.h.{i}.attn.{m}.lora_{ab}.weight"
        for i in range(CFG.n_layer)
        for m in ("c_attn", "c_proj")
        for ab in "AB"
    )


def test_adapter_config_fields(tmp_path):
    model = make_model()
    apply_lora(model, 4, 16.0, 0.05, "qkv,proj")
    save_adapter(tmp_path / "a", model, "gpt2")
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 16.0, 0.05)
    assert cfg["target_modules"] == ["c_attn", "attn.c_proj"]  # not bare c_proj: that matches mlp.c_proj too
    assert cfg["fan_in_fan_out"] is True and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "gpt2" and cfg["inference_mode"] is True
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert is_adapter_dir(tmp_path / "a")
    assert not is_adapter_dir(tmp_path) and not is_adapter_dir(tmp_path / "missing")


def test_adapter_size_proportional_to_rank(tmp_path):
    sizes = {}
    for r in (4, 8):
        model = make_model()
        apply_lora(model, r, 2.0 * r, 0.0, "all")
        save_adapter(tmp_path / f"r{r}", model)
        sizes[r] = (tmp_path / f"r{r}" / ADAPTER_WEIGHTS).stat().st_size
    assert 1.85 < sizes[8] / sizes[4] < 2.05
    total = sum(p.numel() for p in make_model().parameters())
    assert sizes[8] < 4 * total / 2  # well under the full fp32 weights


def test_save_load_roundtrip(tmp_path):
    model = make_model()
    apply_lora(model, 4, 8.0, 0.1, "qkv,proj,fc")
    sgd_steps(model)
    save_adapter(tmp_path / "adapter", model, "gpt2-tiny")
    fresh = make_model()
    assert load_adapter(fresh, tmp_path / "adapter") is fresh
    assert [p for p, _ in lora_modules(fresh)] == [p for p, _ in lora_modules(model)]
    assert fresh.h[0].attn.c_attn.lora_dropout.p == 0.1
    assert fresh.h[1].mlp.c_fc.lora_scale == model.h[1].mlp.c_fc.lora_scale == 2.0
    model.eval()
    fresh.eval()
    idx = batch(7)
    with torch.no_grad():
        assert torch.equal(model(idx), fresh(idx))
    # saving again over the same directory replaces it atomically
    save_adapter(tmp_path / "adapter", fresh, "gpt2-tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_load_accepts_peft_style_target_names(tmp_path):
    """PEFT's bare "c_proj" means both attn.c_proj and mlp.c_proj; a regex string also works."""
    model = make_model()
    apply_lora(model, 2, 4.0, 0.0, "qkv,proj,mlp_proj")
    randomize_adapters(model)
    d = save_adapter(tmp_path / "a", model)
    cfg_path = d / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    idx = batch(3)
    model.eval()
    with torch.no_grad():
        ref = model(idx)
    for spec in (["c_attn", "c_proj"], r".*\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_proj)"):
        cfg_path.write_text(json.dumps(cfg | {"target_modules": spec}))
        fresh = load_adapter(make_model(), d).eval()
        with torch.no_grad():
            assert torch.equal(fresh(idx), ref)


def test_load_errors_leave_model_untouched(tmp_path):
    model = make_model()
    apply_lora(model, 4, 8.0, 0.0, "all")
    d = save_adapter(tmp_path / "a", model)

    wider = Transformer(CFG.model_copy(update={"n_embd": 64}))
    with pytest.raises(CheckpointError, match="shape"):
        load_adapter(wider, d)
    assert not lora_modules(wider)
    assert all(p.requires_grad for p in wider.parameters())

    deeper = Transformer(CFG.model_copy(update={"n_layer": 3}))
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(deeper, d)
    assert not lora_modules(deeper)

    with pytest.raises(CheckpointError, match="already"):
        load_adapter(model, d)

    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(make_model(), d)
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg | {"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="LoRA"):
        load_adapter(make_model(), d)
    (d / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_adapter(make_model(), d)
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    (d / ADAPTER_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_adapter(make_model(), d)
    (d / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(make_model(), d)
    with pytest.raises(CheckpointError, match="not an adapter"):
        load_adapter(make_model(), tmp_path)


def test_bf16_autocast_and_fp32_adapters_on_bf16_model():
    model = make_model()
    apply_lora(model, 4, 8.0, 0.1, "all")
    model.train()
    idx = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert loss.dtype == torch.float32
    lin = model.h[0].attn.c_attn
    assert lin.lora_B.weight.grad.dtype == torch.float32 and torch.isfinite(lin.lora_B.weight.grad).all()

    half = make_model().to(torch.bfloat16)
    apply_lora(half, 4, 8.0, 0.0, "all", dtype=torch.float32)
    assert half.h[0].mlp.c_fc.lora_A.weight.dtype == torch.float32
    logits = half(idx)
    assert logits.dtype == torch.bfloat16
    half(idx, idx).backward()
    assert half.h[0].mlp.c_fc.lora_B.weight.grad.dtype == torch.float32


def test_fake_tensors_and_meta_device():
    """The memory planner traces models on fake tensors: no data-dependent control flow."""
    with FakeTensorMode():
        model = Transformer(CFG)
        apply_lora(model, 4, 8.0, 0.1, "all")
        set_grad_checkpointing(model)
        model.train()
        idx = torch.zeros(2, 12, dtype=torch.long)
        model(idx, idx).backward()
        assert model.h[0].attn.c_attn.lora_A.weight.grad.shape == (4, CFG.n_embd)
    with torch.device("meta"):
        model = Transformer(CFG)
        apply_lora(model, 4, 8.0, 0.0, "qkv,proj")
        assert model(torch.zeros(2, 12, dtype=torch.long)).shape == (2, 12, CFG.vocab_size)
        merge_lora(model)
        assert not lora_modules(model)


def test_deepcopy_and_compile():
    model = make_model()
    apply_lora(model, 4, 8.0, 0.0, "all")
    randomize_adapters(model)
    model.eval()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.h[0].attn.c_attn.lora_B.weight.zero_()  # the clone's forward must use the clone's adapter
        idx = batch()
        ref = model(idx)
        assert not torch.equal(clone(idx), ref)
        compiled = torch.compile(copy.deepcopy(model), backend="eager")
        torch.testing.assert_close(compiled(idx), ref)
