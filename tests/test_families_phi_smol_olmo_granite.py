"""Phi-3 / Phi-4-mini, SmolLM3, OLMo 2 and Granite 3 against transformers: tiny random models with every
family switch away from its default, saved sharded, read in both config layouts (transformers 5's
`rope_parameters` and the older top-level `rope_theta` / `rope_scaling` / `partial_rotary_factor` of hub
checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tests.familycheck as fc  # noqa: E402
from microft.errors import ConfigError  # noqa: E402
from microft.models.config import ModelConfig  # noqa: E402
from microft.models.load import load_model, read_model_config  # noqa: E402
from microft.models.lora import apply_lora  # noqa: E402
from microft.models.transformer import Transformer, set_grad_checkpointing  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 2.0, 4.0],
            "long_factor": [2.0, 3.0, 5.0, 9.0], "partial_rotary_factor": 0.5}
FAMILIES = {
    # phi3 as Phi-4-mini: fused qkv/gate_up tensors, partial rotary (1/2), LongRoPE whose original context
    # (16) the 36-token generation passes (long factors from there on), tied embeddings, a sliding window
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        original_max_position_embeddings=16, partial_rotary_factor=0.5, rope_parameters=LONGROPE,
        sliding_window=12, tie_word_embeddings=True)),
    # phi3.5 as Phi-3/3.5-mini: LongRoPE over every head dim, untied head; its old layout says `type: su`
    "phi3.5": ("Phi3Config", "Phi3ForCausalLM", dict(
        original_max_position_embeddings=16, tie_word_embeddings=False,
        rope_parameters={**LONGROPE, "partial_rotary_factor": 1.0,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                         "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]})),
    # smollm3: layer 0 without RoPE (NoPE), biases on the attention and MLP, untied head
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        no_rope_layers=[0, 1], attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6})),
    # olmo2: norms after attention and MLP, q/k RMSNorm over the whole projection, attention biases
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(attention_bias=True, rms_norm_eps=1e-5,
                                                     tie_word_embeddings=False)),
    # granite: every multiplier away from 1, biases
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        embedding_multiplier=6.0, attention_multiplier=0.09, residual_multiplier=0.4, logits_scaling=3.0,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
}
LAYOUTS = ("new", "old")


def model_type(name: str) -> str:
    return name.split(".")[0]


def to_old_layout(config_path, longrope_as: str = "longrope") -> None:
    """Rewrite a transformers-5 config.json as hub checkpoints carry it: `rope_theta`, `rope_scaling` (type
    `longrope` or `su` for Phi-3, else none) and `partial_rotary_factor` at the top."""
    raw = json.loads(config_path.read_text())
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        raw["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    params.pop("original_max_position_embeddings", None)
    kind = params.pop("rope_type").replace("longrope", longrope_as)
    raw["rope_scaling"] = {"type": kind, **params} if kind != "default" else None
    config_path.write_text(json.dumps(raw))


def build(name: str):
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    return getattr(transformers, model_cls)(cfg).eval()


@pytest.fixture(scope="module", params=[(f, layout) for f in FAMILIES for layout in LAYOUTS],
                ids=[f"{f}-{layout}" for f in FAMILIES for layout in LAYOUTS])
def family(request, tmp_path_factory):
    """(name, HF model, its save_pretrained directory: shards + index, in the given config layout)."""
    name, layout = request.param
    hf = build(name)
    d = fc.save_sharded(hf, tmp_path_factory.mktemp(f"{name}-{layout}") / "hf")
    if layout == "old":
        to_old_layout(d / "config.json", "su" if name == "phi3.5" else "longrope")
        hf = type(hf).from_pretrained(d).eval()  # transformers reads the old layout as the same model
    return name, hf, d


def test_config_reads_every_switch(family):
    name, hf, d = family
    cfg = read_model_config(d)
    assert cfg.model_type == model_type(name) and cfg.n_kv_head == 2
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) == Transformer(cfg).num_params()
    if name == "phi3":
        assert cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == 8 and cfg.sliding_window == 12
        lr = cfg.longrope
        assert lr.original_max_position_embeddings == 16 and lr.long_factor == [2.0, 3.0, 5.0, 9.0]
        assert lr.attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling, abs=0)
        assert cfg.tie_embeddings
    if name == "phi3.5":
        assert cfg.rotary_dim == 16 and cfg.longrope.short_factor[-1] == 4.0 and not cfg.tie_embeddings
        assert cfg.sliding_window is None
    if name == "smollm3":
        assert cfg.rope_layers == [False, True] and cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias
    if name == "olmo2":
        assert cfg.norm_after and cfg.qk_norm and cfg.qk_norm_full and cfg.rms_gain_first and cfg.qkv_bias
    if name == "granite":
        assert (cfg.embedding_multiplier, cfg.attention_multiplier, cfg.residual_multiplier,
                cfg.logits_scaling) == (6.0, 0.09, 0.4, 3.0)


def test_logits_match_transformers(family):
    name, hf, d = family
    ours = load_model(d)
    assert fc.max_diff(hf, ours, fc.tokens()) <= 1e-5
    long = fc.tokens(40, batch=1)  # past phi3's original context (16) and its window (12): the long factors
    assert fc.max_diff(hf, ours, long) <= 1e-5


def test_greedy_generation_with_kv_cache_matches(family):
    name, hf, d = family
    fc.assert_generates_like(hf, load_model(d))


def test_training_loss_equals_transformers(family):
    """The first step's loss (Granite's logits_scaling changes it, not the greedy tokens) and its
    gradients."""
    name, hf, d = family
    ours = load_model(d).train()
    hf = type(hf).from_pretrained(d).train()  # dropout is 0: train mode only switches the paths
    x = fc.tokens(24)
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    want = hf(x, labels=x).loss  # transformers shifts the labels itself
    got = ours(x, y) / (y != -100).sum()
    assert abs(got.item() - want.item()) <= 1e-4
    want.backward()
    got.backward()
    g_hf = hf.get_input_embeddings().weight.grad
    g = ours.wte.weight.grad[: g_hf.shape[0]]
    torch.testing.assert_close(g, g_hf, atol=1e-5, rtol=1e-4)


def test_export_round_trips_through_transformers(family, tmp_path):
    name, hf, d = family
    fc.assert_export_round_trips(hf, load_model(d), tmp_path / "out", fc.tokens(40, batch=1))


PEFT_TARGETS = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}
PEFT_TARGETS["phi3.5"] = PEFT_TARGETS["phi3"]


@pytest.mark.parametrize("targets", ["all", "q_proj,v_proj,up_proj"])
def test_lora_adapter_loads_in_peft_with_equal_logits(family, tmp_path, targets):
    name, hf, d = family
    want = PEFT_TARGETS.get(name, fc.LORA_NAMES) if targets == "all" else None
    fc.assert_peft_round_trip(hf, d, tmp_path / "adapter", targets, want)


@pytest.mark.parametrize("preset", ["phi3-tiny", "smollm3-tiny", "olmo2-tiny", "granite-tiny"])
def test_grad_checkpointing_and_packing_give_reference_gradients(preset):
    """Checkpointed blocks and packed rows (two samples a row) against the plain unpacked step."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    model = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 40))  # past phi3-tiny's original context of 32: long factors
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100

    def grads(ckpt: bool, packed: bool) -> tuple[float, dict[str, torch.Tensor]]:
        set_grad_checkpointing(model, ckpt)
        if packed:  # both samples in one row of 80, positions restarting at the second
            pos = torch.cat([torch.arange(40), torch.arange(40)])[None]
            return fc.loss_and_grads(model, lambda: model(x.reshape(1, 80), y.reshape(1, 80),
                                                          position_ids=pos))
        return fc.loss_and_grads(model, lambda: model(x, y))

    fc.assert_variants_match(grads)


def test_presets_have_the_hub_shapes():
    """Parameter counts of the hub checkpoints these presets stand for (their model cards, rounded)."""
    want = {"phi-4-mini": 3.836e9, "phi-3.5-mini": 3.821e9, "smollm3-3b": 3.075e9, "olmo-2-1b": 1.485e9,
            "granite-3.3-2b": 2.534e9}
    for name, n in want.items():
        assert abs(ModelConfig.from_preset(name).num_params() / n - 1) < 1e-3, name
    phi4 = ModelConfig.from_preset("phi-4-mini")
    assert phi4.rotary_dim == 96 and phi4.tie_embeddings and len(phi4.longrope.short_factor) == 48
    assert ModelConfig.from_preset("smollm3-3b").rope_layers.count(False) == 9


def test_unsupported_switches_are_refused_by_name():
    smol = ModelConfig.from_preset("smollm3-tiny").to_hf()
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_hf({**smol, "use_sliding_window": True, "sliding_window": 8})
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_hf({**smol, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    granite = ModelConfig.from_preset("granite-tiny")
    with pytest.raises(ConfigError, match="logits_scaling"):  # a llama config.json cannot say it
        granite.model_copy(update={"model_type": "llama"}).to_hf()
    with pytest.raises(ValueError, match="short_factor has 4 values"):  # 16 rotary dims need 8 factors
        ModelConfig(**{**ModelConfig.from_preset("phi3-tiny").model_dump(), "partial_rotary_factor": 1.0})


# the estimator against the traced step beyond tests/test_memory_sync.py's grid (which runs each tiny preset
# in fp32, bf16-mixed, checkpointed and LoRA): NF4 bases under the partial rotary, bf16-true gains (OLMo 2
# multiplies them in fp32, Granite scales in bf16), 8-bit AdamW with accumulation
REPLAY_GRID = {
    "phi3-qlora-ckpt": ("phi3-tiny", "bf16-mixed", {"lora": True, "lora_targets": "all", "quantize": "nf4",
                                                    "lora_r": 4, "grad_ckpt": True}, 1),
    "olmo2-bf16-true": ("olmo2-tiny", "bf16-true", {}, 1),
    "granite-bf16-true-8bit": ("granite-tiny", "bf16-true", {"optimizer": "adamw-8bit"}, 2),
    "smollm3-qlora-fp32": ("smollm3-tiny", "fp32", {"lora": True, "lora_targets": "all", "quantize": "nf4",
                                                    "lora_r": 4}, 1),
}


@pytest.mark.parametrize("name", list(REPLAY_GRID))
def test_replay_matches_the_trace_to_the_byte(name):
    from microft.config import RunConfig
    from microft.memory.estimate import load_shape, setup_for
    from tests.test_memory_sync import assert_replay_is_the_trace

    preset, precision, kw, accum = REPLAY_GRID[name]
    cfg = RunConfig(precision=precision, max_seq_len=48, **kw)
    arch = load_shape(preset)
    assert_replay_is_the_trace(arch, setup_for(cfg, arch, 2, accum=accum), cfg)


def test_phi3_takes_its_fused_modules_names_as_lora_targets():
    model = Transformer(ModelConfig.from_preset("phi3-tiny"))
    apply_lora(model, 2, 4, targets="qkv_proj,gate_up_proj")
    adapted = {n.split(".")[3] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


@pytest.mark.parametrize("name", ["phi3", "smollm3", "olmo2", "granite"])
def test_a_minimal_config_json_reads_with_transformers_defaults(name):
    """Keys a config.json leaves out take the family's defaults in transformers, not Llama's."""
    cls = FAMILIES[name][0]
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 vocab_size=256)
    ours = ModelConfig.from_hf({"model_type": name, **shape})
    theirs = getattr(transformers, cls)(**shape)
    assert (ours.rope_theta, ours.tie_embeddings, ours.n_positions, ours.layer_norm_eps, ours.bos_token_id,
            ours.eos_token_id) == (theirs.rope_parameters["rope_theta"], theirs.tie_word_embeddings,
                                   theirs.max_position_embeddings, theirs.rms_norm_eps, theirs.bos_token_id,
                                   theirs.eos_token_id)
    if name == "smollm3":
        assert ours.rope_layers == [bool(f) for f in theirs.no_rope_layers] == [True, True, True, False]


def test_a_fused_tensor_of_the_wrong_size_is_named(family, tmp_path):
    """A Phi-3 checkpoint whose config disagrees with its fused qkv_proj: one CheckpointError naming it."""
    from microft.errors import CheckpointError

    name, hf, d = family
    if model_type(name) != "phi3":
        pytest.skip("fused tensors: phi3 only")
    broken = tmp_path / "broken"
    broken.mkdir()
    raw = json.loads((d / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**raw, "num_key_value_heads": 1}))
    for f in d.glob("model*.safetensors*"):
        (broken / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight has 128 rows, the model expects 96"):
        load_model(broken)
