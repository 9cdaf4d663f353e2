"""Llama, Qwen2, Qwen3 and Mistral against transformers: tiny random models, sharded files, both RoPE layouts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from microft.errors import CheckpointError, ConfigError  # noqa: E402
from microft.generate import generate  # noqa: E402
from microft.lora import apply_lora, load_adapter, merge_lora, save_adapter  # noqa: E402
from microft.models.config import PRESETS, ModelConfig  # noqa: E402
from microft.models.families import FAMILIES as REGISTRY  # noqa: E402
from microft.models.hf import export_hf  # noqa: E402
from microft.models.load import load_model, read_model_config  # noqa: E402
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
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=250, tie_word_embeddings=True,
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
    d = tmp_path_factory.mktemp(name) / "hf"
    hf.save_pretrained(d, max_shard_size="200KB")
    assert (d / "model.safetensors.index.json").exists()
    if name in OLD_LAYOUT:
        to_old_rope_layout(d / "config.json")
    return name, hf, d


def tokens(n: int = 20, vocab: int = 250, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(7))


def max_diff(hf, ours, x) -> float:
    with torch.no_grad():
        return (hf(x).logits - ours.eval()(x)).abs().max().item()


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
    assert max_diff(hf, ours, tokens()) <= 1e-5


def test_greedy_generation_with_kv_cache_matches(family):
    name, hf, d = family
    ours = load_model(d)
    prompt = tokens(6, batch=1)
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    got = list(generate(ours, prompt[0].tolist(), 30, stop_at_eot=False))
    assert got == want


def test_export_round_trips_through_transformers(family, tmp_path):
    name, hf, d = family
    ours = load_model(d)
    out = export_hf(ours, tmp_path / "out", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    back, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_diff(back.eval(), ours, tokens()) <= 1e-5
    again = load_model(out)  # and microft reads its own export
    assert max_diff(hf, again, tokens()) <= 1e-5


def test_lora_adapter_loads_in_peft_with_equal_logits(family, tmp_path):
    peft = pytest.importorskip("peft")
    name, hf, d = family
    ours = load_model(d)
    apply_lora(ours, r=4, alpha=8, targets="all")
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_adapter(tmp_path / "adapter", ours, str(d))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base = type(hf).from_pretrained(d)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = tokens()
    assert max_diff(peft_model, ours, x) <= 1e-5
    reloaded = load_adapter(load_model(d), tmp_path / "adapter")
    assert max_diff(peft_model, reloaded, x) <= 1e-5
    with torch.no_grad():
        before = ours(x)
    merge_lora(ours)
    assert not any("lora_" in n for n, _ in ours.named_parameters())
    with torch.no_grad():  # folding B @ A into W rounds differently: fp32 noise on logits of size ~10
        assert torch.allclose(ours(x), before, atol=1e-4, rtol=0)


def test_lora_targets_by_family():
    llama = Transformer(ModelConfig.from_preset("llama-tiny"))
    assert apply_lora(llama, 2, 4, targets="q_proj,v_proj") == 2 * ((2 * 64 + 64 * 2) + (2 * 64 + 32 * 2))  # layers × (q: A + B, v: A + B)
    qwen = Transformer(ModelConfig.from_preset("qwen2-tiny"))
    apply_lora(qwen, 2, 4, targets="qkv,proj")  # GPT-2's names are groups on the other families
    assert {n.split(".")[3] for n, p in qwen.named_parameters() if "lora_A" in n} == {"q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"}
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
        model.zero_grad(set_to_none=True)
        set_grad_checkpointing(model, ckpt)
        if fused:
            loss = model(x, y)
        else:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads(False, False)
    for ckpt, fused in ((True, False), (False, True), (True, True)):
        loss, got = grads(ckpt, fused)
        assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
        for n, g in ref.items():
            torch.testing.assert_close(got[n], g, atol=1e-5, rtol=1e-4, msg=n)


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
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
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
    linears = {n.rsplit(".", 1)[0].split(".", 2)[2] for n in names if n.startswith("h.0.") and n.endswith("weight")}
    assert {".".join(fam.lora_targets[t]) for t in fam.lora_targets} <= linears
