"""Llama, Qwen2, Qwen3 and Mistral against transformers: tiny random models, sharded files, both RoPE
layouts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import tests.familycheck as fc  # noqa: E402
from microft.errors import CheckpointError, ConfigError  # noqa: E402
from microft.generate import generate  # noqa: E402
from microft.models.config import PRESETS, ModelConfig  # noqa: E402
from microft.models.families import FAMILIES as REGISTRY  # noqa: E402
from microft.models.load import load_model, read_model_config  # noqa: E402
from microft.models.lora import apply_lora  # noqa: E402
from microft.models.transformer import Transformer, set_grad_checkpointing  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    # llama: llama3 RoPE scaling, GQA, untied head; its config.json rewritten in the older rope_scaling layout
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # qwen2: q/k/v bias, tied head, a vocabulary that is not a multiple of 64 (padded inside microft)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=250, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # qwen3: q/k RMSNorm before RoPE, head_dim (32) != hidden / heads (16)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(vocab_size=256, head_dim=32, tie_word_embeddings=True)),
    # mistral: a sliding window shorter than the test sequences
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(vocab_size=256, sliding_window=8,
                                                           tie_word_embeddings=False)),
}
OLD_LAYOUT = {"llama"}


def to_old_rope_layout(config_path) -> None:
    """Rewrite a transformers-5 config.json into the rope_theta + rope_scaling layout of 4.x hub files."""
    raw = json.loads(config_path.read_text())
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params if params.get("rope_type") != "default" else None
    config_path.write_text(json.dumps(raw))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its save_pretrained directory: shards + index)."""
    name = request.param
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    hf = getattr(transformers, model_cls)(cfg).eval()
    d = fc.save_sharded(hf, tmp_path_factory.mktemp(name) / "hf")
    if name in OLD_LAYOUT:
        to_old_rope_layout(d / "config.json")
    return name, hf, d


def test_config_reads_the_family_switches(family):
    name, hf, d = family
    cfg = read_model_config(d)
    assert cfg.model_type == name and cfg.n_kv_head == 2 and cfg.norm == "rmsnorm" and cfg.positions == "rope"
    assert (cfg.rope_scaling is not None) == (name == "llama")
    assert cfg.qkv_bias == (name == "qwen2") and cfg.qk_norm == (name == "qwen3")
    assert cfg.head_dim == (32 if name == "qwen3" else 16)
    assert cfg.sliding_window == (8 if name == "mistral" else None)
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) == Transformer(cfg).num_params()


def test_logits_match_transformers(family):
    name, hf, d = family
    ours = load_model(d)
    assert fc.max_diff(hf, ours, fc.tokens()) <= 1e-5


def test_greedy_generation_with_kv_cache_matches(family):
    name, hf, d = family
    fc.assert_generates_like(hf, load_model(d))


def test_export_round_trips_through_transformers(family, tmp_path):
    name, hf, d = family
    fc.assert_export_round_trips(hf, load_model(d), tmp_path / "out", fc.tokens())


def test_lora_adapter_loads_in_peft_with_equal_logits(family, tmp_path):
    name, hf, d = family
    fc.assert_peft_round_trip(hf, d, tmp_path / "adapter", want=fc.LORA_NAMES)


def test_lora_targets_by_family():
    llama = Transformer(ModelConfig.from_preset("llama-tiny"))
    # layers × (q: A + B, v: A + B)
    assert apply_lora(llama, 2, 4, targets="q_proj,v_proj") == 2 * ((2 * 64 + 64 * 2) + (2 * 64 + 32 * 2))
    qwen = Transformer(ModelConfig.from_preset("qwen2-tiny"))
    apply_lora(qwen, 2, 4, targets="qkv,proj")  # GPT-2's names are groups on the other families
    adapted = {n.split(".")[3] for n, p in qwen.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    gpt2 = Transformer(ModelConfig.from_preset("gpt2-tiny"))
    with pytest.raises(ConfigError, match="q_proj"):
        apply_lora(gpt2, 2, 4, targets="q_proj")


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-tiny"])
def test_grad_checkpointing_and_fused_loss_give_reference_gradients(preset):
    """Checkpointed blocks, the fused loss (tied: HeadGradLink; untied: lm_head) vs plain F.cross_entropy."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    model = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 40))  # longer than mistral-tiny's window of 16
    y = torch.roll(x, -1, 1)
    y[:, :3] = -100

    def grads(ckpt: bool, fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
        set_grad_checkpointing(model, ckpt)
        if fused:
            return fc.loss_and_grads(model, lambda: model(x, y))
        return fc.loss_and_grads(model, lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten(),
                                                                ignore_index=-100, reduction="sum"))

    fc.assert_variants_match(grads)


def test_kv_cache_holds_only_key_value_heads_and_matches_full_forward():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("mistral-tiny")
    model = Transformer(cfg).eval()
    from microft.models.transformer import KVCache

    x = torch.randint(0, cfg.vocab_size, (1, 30))
    cache = KVCache.empty(cfg, 1, 30, "cpu", torch.float32)
    assert cache.k.shape == (cfg.n_layer, 1, cfg.n_kv_head, 30, cfg.head_dim)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, :10], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(10, 25)]
        parts.append(model(x[:, 25:], cache=cache))  # several new positions past the window at once
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_generate_stops_at_any_stop_id():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny"))
    free = list(generate(model, [5, 6, 7], 10, stop_at_eot=False))
    assert list(generate(model, [5, 6, 7], 10, stop_ids=[free[3], 99999])) == free[:3]


def test_both_rope_layouts_give_one_config():
    new = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 256,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}}
    old = {**{k: v for k, v in new.items() if k != "rope_parameters"}, "rope_theta": 5e5,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32}}
    assert ModelConfig.from_hf(new) == ModelConfig.from_hf(old)
    assert ModelConfig.from_hf(old).rope_theta == 5e5


def test_unsupported_model_type_and_missing_tensor_are_named(family, tmp_path):
    name, hf, d = family
    raw = json.loads((d / "config.json").read_text())
    with pytest.raises(ConfigError, match="'gemma'.*supported: gpt2, llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf({**raw, "model_type": "gemma"})
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_hf({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((d / "config.json").read_text())
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in set(index["weight_map"].values()):
        (broken / f).symlink_to(d / f)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*h\.1\.mlp\.up_proj\.weight"):
        load_model(broken)


def test_presets_have_the_hub_shapes():
    want = {"llama-3.2-1b": 1.236e9, "llama-3.1-8b": 8.030e9, "qwen3-0.6b": 0.596e9, "qwen2.5-0.5b": 0.494e9,
            "smollm2-135m": 0.1345e9, "mistral-7b": 7.242e9, "gpt2": 124.44e6}
    for name, n in want.items():
        assert abs(ModelConfig.from_preset(name).num_params() / n - 1) < 1e-3, name
    for name in ("llama-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-tiny"):
        cfg = ModelConfig.from_preset(name)
        assert Transformer(cfg).num_params() == cfg.num_params()
        assert cfg.flops_per_token(64) > 6 * cfg.matmul_params()
    assert {"qwen3-8b", "qwen2.5-7b", "smollm2-1.7b", "llama-3.2-3b"} <= PRESETS.keys()


@pytest.mark.parametrize("model_type", list(REGISTRY))
def test_every_family_entry_is_whole(model_type):
    """A registry entry is everything the tool needs of a family: its tiny preset builds, its config.json
    round-trips through the entry's reader and writer, every weight has a distinct HF name, and its LoRA
    targets name block linears of the built model."""
    fam = REGISTRY[model_type]
    assert fam.tiny in fam.presets and all(name in PRESETS for name in fam.presets)
    cfg = ModelConfig.from_preset(fam.tiny)
    assert cfg.model_type == model_type
    hf = cfg.to_hf()
    assert hf["architectures"] == [fam.architecture] and hf["model_type"] == model_type
    back = ModelConfig.from_hf(hf, name=cfg.name)
    ids = {"dropout", "bos_token_id", "eos_token_id"}  # GPT-2's export names its <|endoftext|> where unset
    assert back.model_dump(exclude=ids) == cfg.model_dump(exclude=ids) and back.eos_ids == cfg.eos_ids
    model = Transformer(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert len({fam.hf_key(n) for n in names}) == len(names)
    linears = {n.rsplit(".", 1)[0].split(".", 2)[2] for n in names
               if n.startswith("h.0.") and n.endswith("weight")}
    assert {".".join(fam.lora_targets[t]) for t in fam.lora_targets} <= linears
