"""Gemma 2 and Gemma 3 text against transformers: tiny random models with every Gemma switch away from its
default (soft-caps, query_pre_attn_scalar, head_dim != hidden / heads, windows shorter than the sequences,
Gemma 3's local RoPE base and linear scaling, non-zero (1 + w) norm gains), in transformers 5's config layout
and in the older one Hub checkpoints carry (top-level rope keys, no layer_types)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import tests.familycheck as fc  # noqa: E402
from microft.errors import ConfigError  # noqa: E402
from microft.models.config import ModelConfig  # noqa: E402
from microft.models.hf import hf_name  # noqa: E402
from microft.models.load import load_model, read_model_config  # noqa: E402
from microft.models.transformer import Transformer, set_grad_checkpointing  # noqa: E402

SLIDING, FULL = "sliding_attention", "full_attention"
COMMON = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
              initializer_range=0.2, query_pre_attn_scalar=20, sliding_window=6, rms_norm_eps=1e-5,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
GEMMA3_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 100.0},
               FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
CASES = {  # name: (config class, model class, switches, old layout)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), False),
    "gemma2-old": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), True),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        final_logit_softcapping=5.0, layer_types=[SLIDING, SLIDING, FULL, SLIDING],
        rope_parameters=GEMMA3_ROPE), False),
    "gemma3-old": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        final_logit_softcapping=5.0, layer_types=[SLIDING, FULL, SLIDING, FULL],
        rope_parameters=GEMMA3_ROPE), True),
}


def to_old_layout(path) -> None:
    """Rewrite a transformers-5 config.json the way older Hub Gemma checkpoints carry it."""
    raw = json.loads(path.read_text())
    params = raw.pop("rope_parameters")
    types = raw.pop("layer_types")
    raw.pop("_sliding_window_pattern", None)
    if raw["model_type"] == "gemma2":
        assert types == [SLIDING if i % 2 == 0 else FULL for i in range(len(types))]  # the even/odd rule
        raw["rope_theta"] = params["rope_theta"]
    else:
        assert types == [SLIDING, FULL] * (len(types) // 2)
        raw["sliding_window_pattern"] = 2
        raw["rope_theta"] = params[FULL]["rope_theta"]
        raw["rope_local_base_freq"] = params[SLIDING]["rope_theta"]
        raw["rope_scaling"] = {"rope_type": "linear", "factor": params[FULL]["factor"]}
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    """(case, HF model with non-trivial norm gains, its sharded save_pretrained directory)."""
    name = request.param
    cfg_cls, model_cls, extra, old = CASES[name]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**COMMON, **extra)).eval()
    fc.random_gains_(hf)  # transformers initialises the (1 + w) gains at w = 0: move them away from it
    d = fc.save_sharded(hf, tmp_path_factory.mktemp(name) / "hf")
    if old:
        to_old_layout(d / "config.json")
    return name, hf, d


def test_config_reads_every_gemma_switch(family):
    name, hf, d = family
    cfg = read_model_config(d)
    g3 = name.startswith("gemma3")
    assert cfg.model_type == ("gemma3_text" if g3 else "gemma2")
    assert cfg.norm_unit_offset and cfg.scale_embeddings and cfg.post_norms and cfg.glu_act == "gelu_tanh"
    assert cfg.head_dim == 32 and cfg.query_pre_attn_scalar == 20 and cfg.sliding_window == 6
    assert cfg.layer_types == list(hf.config.layer_types)
    assert cfg.final_softcap == 5.0 and cfg.attn_softcap == (None if g3 else 3.0) and cfg.qk_norm == g3
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_linear_factor) == (
        (10000.0, 100.0, 4.0) if g3 else (1000.0, None, None))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) == Transformer(cfg).num_params()


def test_logits_match_transformers(family):
    name, hf, d = family
    assert fc.max_diff(hf, load_model(d), fc.tokens()) <= 1e-5


def test_greedy_generation_with_kv_cache_matches(family):
    name, hf, d = family
    fc.assert_generates_like(hf, load_model(d))


def test_training_loss_and_gradients_match_transformers(family):
    """The final soft-cap cannot change a greedy token: the fused loss (soft-capped inside its chunks) and its
    gradients show it. transformers' loss is the mean; microft's the sum."""
    name, hf, d = family
    ours = load_model(d).train()
    hf.train()
    x = fc.tokens(24)
    labels = x[:, 1:].clone()
    labels[:, :3] = -100
    hf_loss = F.cross_entropy(hf(x[:, :-1]).logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    got = ours(x[:, :-1], labels) / (labels != -100).sum()
    assert abs(got.item() - hf_loss.item()) <= 1e-4 * abs(hf_loss.item())
    hf.zero_grad()
    hf_loss.backward()
    got.backward()
    hf_grads = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        ref = hf_grads[hf_name(ours.config, n)].grad
        torch.testing.assert_close(p.grad[: ref.size(0)], ref, atol=1e-5, rtol=1e-4, msg=n)
    hf.eval()


def test_export_round_trips_through_transformers(family, tmp_path):
    name, hf, d = family
    back = fc.assert_export_round_trips(hf, load_model(d), tmp_path / "out", fc.tokens())
    assert list(back.config.layer_types) == list(hf.config.layer_types)


def test_lora_adapter_loads_in_peft_with_equal_logits(family, tmp_path):
    name, hf, d = family
    fc.assert_peft_round_trip(hf, d, tmp_path / "adapter", want=fc.LORA_NAMES)


@pytest.mark.parametrize("lengths", [(30, 26), (7, 5)], ids=["masked", "per-sample"])
@pytest.mark.parametrize("preset", ["gemma2-tiny", "gemma3-tiny"])
def test_packing_and_grad_checkpointing_keep_soft_caps_and_windows_exact(preset, lengths):
    """Two samples packed into one row and/or run with checkpointed blocks: the same loss and gradients as the
    samples run apart (soft-capped attention and logits, sliding layers). Rows longer than the window (16)
    take the packed mask and the window's; shorter ones attend sample by sample on a CPU."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    model = Transformer(cfg).train()
    fc.random_gains_(model)
    samples = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    labels = [torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1) for x in samples]

    def run(ckpt: bool, packed: bool) -> tuple[float, dict[str, torch.Tensor]]:
        set_grad_checkpointing(model, ckpt)
        if packed:
            pos = torch.cat([torch.arange(x.size(1)) for x in samples])[None]
            return fc.loss_and_grads(model, lambda: model(torch.cat(samples, 1), torch.cat(labels, 1),
                                                          position_ids=pos))
        return fc.loss_and_grads(model, lambda: sum(model(x, y) for x, y in zip(samples, labels)))

    fc.assert_variants_match(run, loss_rtol=1e-5)


# the peak in a block's backward (long rows, a small vocabulary): the soft-capped attention's own copies and
# scratch decide it; grouped heads, and one key/value head per query head
ATTENTION_PEAK = {
    "grouped": {"vocab_size": 128, "n_layer": 1},
    "ungrouped-uncapped-logits": {"vocab_size": 128, "n_layer": 1, "n_kv_head": 4, "final_softcap": None},
}


@pytest.mark.parametrize("shape", list(ATTENTION_PEAK))
@pytest.mark.parametrize("variant", ["fp32", "grad-ckpt", "lora"])
def test_replay_of_soft_capped_attention_matches_the_trace_at_its_peak(shape, variant):
    from microft.config import RunConfig
    from microft.memory.estimate import estimate, load_shape, setup_for
    from tests.test_memory_sync import VARIANTS, assert_replay_is_the_trace

    precision, kw, accum = VARIANTS[variant]
    cfg = RunConfig(precision=precision, max_seq_len=256, **kw)
    arch = load_shape("gemma2-tiny").model_copy(update=ATTENTION_PEAK[shape])
    s = setup_for(cfg, arch, 2, accum=accum)
    assert "backward of block 0" in estimate(arch, s).peak_where
    assert_replay_is_the_trace(arch, s, cfg)


def test_the_embedding_normalizer_is_rounded_in_the_model_dtype_as_transformers_does():
    """sqrt(72) = 8.485... is 8.5 in bf16: a bf16 Gemma scales its embeddings by 8.5, as transformers does."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(**{**COMMON, "hidden_size": 72, "num_attention_heads": 4})
    hf = transformers.Gemma3ForCausalLM(cfg).to(torch.bfloat16).eval()
    ours = Transformer(ModelConfig.from_hf(cfg.to_dict())).to(torch.bfloat16).eval()
    with torch.no_grad():
        ours.wte.weight[: cfg.vocab_size].copy_(hf.model.embed_tokens.weight)
    seen = {}
    ours.h[0].register_forward_pre_hook(lambda m, args: seen.setdefault("ours", args[0]))
    hf.model.layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault("hf", args[0]))
    x = fc.tokens(8)
    with torch.no_grad():
        ours(x)
        hf(x)
    assert seen["ours"].dtype == torch.bfloat16 and torch.equal(seen["ours"], seen["hf"])
    assert torch.equal(seen["ours"], ours.wte.weight[x] * 8.5)


def test_configs_transformers_would_run_differently_are_refused_in_one_line():
    base = {**COMMON, "model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh"}
    with pytest.raises(ConfigError, match="hidden_activation 'gelu'"):
        ModelConfig.from_hf({**base, "hidden_activation": "gelu"})
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        ModelConfig.from_hf({**base, "model_type": "gemma3_text", "use_bidirectional_attention": True})
    with pytest.raises(ConfigError, match="'yarn' on the global layers"):
        ModelConfig.from_hf({**base, "model_type": "gemma3_text",
                             "rope_parameters": {FULL: {"rope_type": "yarn", "factor": 2.0}}})
    with pytest.raises(ConfigError, match="'linear' on gemma2"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    g2 = ModelConfig.from_hf(base)  # transformers' Gemma 2 defaults: both caps, alternating windows
    assert (g2.attn_softcap, g2.final_softcap, g2.layer_types[:2]) == (50.0, 30.0, [SLIDING, FULL])
    with pytest.raises(ConfigError, match="cannot express this model's qk_norm"):
        g2.model_copy(update={"qk_norm": True}).to_hf()


def test_the_cpu_short_attention_path_takes_the_query_pre_attn_scale():
    """bf16 on a CPU attends through plain ops up to 256 positions: with Gemma's scale, as SDPA does."""
    from microft.models.transformer import causal_attention_math

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 32, generator=g) for _ in range(3))
    for scale in (None, 20**-0.5):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        torch.testing.assert_close(causal_attention_math(q, k, v, scale=scale), want, atol=1e-6, rtol=1e-5)


# config.json as the Hub's checkpoints carry it (the older layout; keys transformers 5 no longer writes kept)
HUB = {
    "gemma-2-2b": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
        "initializer_range": 0.02, "intermediate_size": 9216, "max_position_embeddings": 8192,
        "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
        "torch_dtype": "float32", "vocab_size": 256000},
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
        "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
        "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144},
}


@pytest.mark.parametrize("preset", list(HUB))
def test_presets_are_the_hub_configs(preset):
    """The presets read back from the Hub's config.json; their parameter counts are the checkpoints'."""
    assert ModelConfig.from_hf(HUB[preset], name=preset) == ModelConfig.from_preset(preset)
    counts = {"gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952}
    for name, n in counts.items():
        assert ModelConfig.from_preset(name).num_params() == n
    g3 = ModelConfig.from_preset("gemma-3-1b")
    assert g3.layer_types.count(FULL) == 4 and g3.layer_types[5] == FULL  # every sixth layer is global


@pytest.mark.parametrize("preset", ["gemma2-tiny", "gemma3-tiny"])
def test_gains_start_at_one_built_whole_or_drawn_by_load_model(preset):
    """(1 + w) gains start at w = 0, as transformers initialises them, whether the model is built whole or a
    preset is drawn tensor by tensor by `load_model`."""
    for model in (Transformer(ModelConfig.from_preset(preset)), load_model(preset)):
        gains = {n: p for n, p in model.named_parameters() if p.dim() == 1}
        assert len(gains) == model.config.n_layer * (6 if model.config.qk_norm else 4) + 1
        assert not any(p.any() for p in gains.values())


@pytest.mark.parametrize("preset", ["gemma-2-2b", "gemma-3-1b"])
def test_replay_matches_the_trace_on_the_real_shapes(preset):
    """The hub shapes (262k / 256k vocabularies, 256-wide heads, windows of 4096 / 512 under 1024 positions),
    as the recipe runs them: LoRA on every linear, bf16-mixed, checkpointed blocks."""
    from microft.config import RunConfig
    from microft.memory.estimate import load_shape, setup_for
    from tests.test_memory_sync import assert_replay_is_the_trace

    cfg = RunConfig(precision="bf16-mixed", max_seq_len=1024, lora=True, lora_targets="all", grad_ckpt=True)
    arch = load_shape(preset)
    assert_replay_is_the_trace(arch, setup_for(cfg, arch, 1), cfg)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_soft_capped_attention_backward_is_autograd_of_its_forward(kv_heads):
    """The hand-written backward of the soft-capped attention against autograd over the plain ops (float64),
    with grouped and ungrouped heads and a window mask."""
    from microft.models.transformer import attention_mask, softcap_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 12, 8, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in "kv")
    allowed = attention_mask(12, 0, 5, "cpu")
    y = softcap_attention(q, k, v, 0.3, 2.0, allowed)
    kk, vv = (x.repeat_interleave(4 // kv_heads, 1) for x in (k, v))
    s = torch.tanh(q @ kk.transpose(-2, -1) * 0.3 / 2.0) * 2.0
    ref = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    got, want = torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_torch_compile_keeps_gemma_gradients():
    """torch.compile (dynamo, eager backend) through the soft-capped attention op and the capped loss."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gemma2-tiny")
    model, ref = Transformer(cfg), Transformer(cfg)
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    torch.compile(model, backend="eager")(idx, idx).backward()
    ref(idx, idx).backward()
    for (n, p), r in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, msg=n)
