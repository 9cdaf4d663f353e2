"""Phi-4-mini end to end on a tiny random model: its chat format (`<|user|> ... <|end|><|assistant|>`, stops
at `<|end|>` and `<|endoftext|>`), LoRA and QLoRA fine-tuning through the CLI with adapters on the fused
`qkv_proj` / `gate_up_proj` that peft loads, export and merge, exact accumulation splits and bit-exact resume;
the Phi-4-mini QLoRA recipe's estimate lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

import tests.familycheck as fc  # noqa: E402
from microft.cli import app  # noqa: E402
from microft.config import RunConfig  # noqa: E402
from microft.data.tokenizer_files import tokenizer_for  # noqa: E402
from microft.weights import read_safetensors  # noqa: E402
from tests.tokdirs import QWEN_TEMPLATE, trained_tokenizer_json  # noqa: E402

runner = CliRunner()
PHI_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Phi-4-mini's turn format (no newlines between the role tag, the text and <|end|>), written for these tests
PHI_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|' + m.role + '|>' + m.content + '<|end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)
PHI_TEMPLATE_GEN = (  # the same, the assistant's text marked for transformers' return_assistant_tokens_mask
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|assistant|>' }}{% generation %}{{- m.content + '<|end|>' }}{% endgeneration %}"
    "{%- else %}{{- '<|' + m.role + '|>' + m.content + '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


def write_phi_dir(d: Path) -> Path:
    """A tiny Phi-4-mini: partial rotary, LongRoPE, tied embeddings, random weights; a BPE with Phi's chat
    tokens; EOS <|end|> in tokenizer_config, <|endoftext|> too in generation_config."""
    from tokenizers import Tokenizer

    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(trained_tokenizer_json())
    tok.add_special_tokens(PHI_SPECIALS)
    tok.save(str(d / "tokenizer.json"))
    end, eot = tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=32,
        partial_rotary_factor=0.5, initializer_range=0.2, tie_word_embeddings=True, bos_token_id=eot,
        eos_token_id=end, pad_token_id=eot,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.5, 2.5, 4.0, 8.0]})
    transformers.Phi3ForCausalLM(cfg).save_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|end|>",
        "pad_token": "<|endoftext|>", "chat_template": PHI_TEMPLATE_GEN}), encoding="utf-8")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, end]}), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    return write_phi_dir(root / "model"), fc.chat_file(root / "chat.jsonl", n=16)


def finetune(phi, out: Path, *extra: str):
    model, data = phi
    res = runner.invoke(app, ["finetune", "--model", str(model), "--data", str(data), "--out", str(out),
                              "--lora", "--lora-r", "4", "--lora-targets", "all", "--micro-bs", "2",
                              "--accum", "2",
                              "--max-steps", "3", "--eval-every", "0", "--lr", "1e-2", "--device", "cpu",
                              "--log-format", "plain", "--max-seq-len", "96", "--val-frac", "0", *extra])
    assert res.exit_code == 0, res.output
    return out / "final"


def test_the_tokenizer_stops_at_end_and_endoftext(phi):
    model, _ = phi
    from microft.models.load import read_model_config

    tok = tokenizer_for(str(model), read_model_config(model))
    assert {tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")} <= set(tok.eos_ids)


def test_loss_masks_cover_exactly_the_assistant_tokens(phi, tmp_path):
    from microft.data.instruct import load_instruct_data
    from microft.models.load import read_model_config

    model, data = phi
    cfg = RunConfig(model=str(model), data=str(data), val_frac=0.0)
    samples = load_instruct_data(cfg, 256, tokenizer_for(str(model), read_model_config(model))).train
    hf_tok = transformers.AutoTokenizer.from_pretrained(model)
    fc.assert_masks_match(samples, hf_tok, fc.records_of(data), "<|end|>")


@pytest.fixture(scope="module")
def lora_run(phi, tmp_path_factory):
    return finetune(phi, tmp_path_factory.mktemp("phi-lora") / "out", "--precision", "fp32")


def test_lora_adapter_on_fused_projections_loads_in_peft_and_generates_the_same(phi, lora_run):
    peft = pytest.importorskip("peft")
    from microft.models.artifacts import load_any

    model, _ = phi
    cfg = json.loads((lora_run / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert cfg["rank_pattern"] == {"qkv_proj": 12, "gate_up_proj": 8}
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    ref = peft.PeftModel.from_pretrained(base, lora_run).eval()
    x = torch.randint(0, 600, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (load_any(str(lora_run)).eval()(x) - ref(x).logits).abs().max().item() <= 1e-5
    res = runner.invoke(app, ["generate", "--model", str(lora_run), "--chat", "--prompt", "Say red and blue.",
                              "--temperature", "0", "--max-new-tokens", "40", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model)
    assert got["prompt"] == "<|user|>Say red and blue.<|end|><|assistant|>"
    stops = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    # 40 new tokens pass the original context of 32: the long factors, the cache rebuilt
    assert got["completion"] == fc.greedy_completion(ref, hf_tok, got["prompt"], 40, stops)


def test_export_and_merge_fuse_the_projections_again(phi, lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = phi
    res = runner.invoke(app, ["export", "--model", str(lora_run), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "Phi3ForCausalLM"
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    ref = peft.PeftModel.from_pretrained(base, lora_run).eval()
    x = torch.randint(0, 600, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (exported(x).logits - ref(x).logits).abs().max().item() <= 1e-4
    res = runner.invoke(app, ["merge", "--model", str(lora_run), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output


def test_qlora_trains_adapters_peft_loads_on_the_fused_projections(phi, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = phi
    final = finetune(phi, tmp_path / "q", "--quantize", "nf4", "--precision", "fp32")
    state = read_safetensors(final / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in state
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    peft.PeftModel.from_pretrained(base, final)  # shapes and names fit the fused modules
    res = runner.invoke(app, ["merge", "--model", str(final), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    from microft.models.artifacts import load_any

    x = torch.randint(0, 600, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the merged weights are the dequantized base plus B @ A
        merged, adapted = load_any(str(tmp_path / "merged")).eval(), load_any(str(final)).eval()
        diff = (merged(x) - adapted(x)).abs().max().item()
    assert diff <= 1e-4


def run_cfg(phi, out: Path, micro_bs: int, accum: int, **kw) -> RunConfig:
    return fc.run_config(*phi, out, micro_bs, accum, **kw)


def test_splits_of_the_global_batch_give_the_same_weights(phi, tmp_path):
    """Within the original context (32 here; 4096 for Phi-3.5/4-mini): past it LongRoPE's long factors apply
    to a whole padded micro-batch, as in transformers, so the split would change which samples get them."""
    def config(out: Path, mb: int, acc: int, **kw) -> RunConfig:
        return run_cfg(phi, out, mb, acc, max_seq_len=32, grad_ckpt=mb == 1, **kw)

    finals = fc.splits_finals(config, tmp_path, [(1, 4), (4, 1)])
    ref = finals[(4, 1)]
    start = read_safetensors(phi[0] / "model.safetensors")["model.layers.0.self_attn.qkv_proj.weight"]
    assert not torch.equal(torch.cat([ref[f"h.0.attn.{p}_proj.weight"] for p in "qkv"]), start)
    fc.assert_same_weights(finals, (4, 1))


def test_resume_after_sigint_is_bit_exact(phi, tmp_path):
    events: list[dict] = []
    fc.assert_resume_is_bit_exact(run_cfg(phi, tmp_path / "ref", 2, 2, save_every=2),  # 64 positions > 32
                                  run_cfg(phi, tmp_path / "cut", 2, 2, save_every=2),
                                  ref_events=events.append)
    assert any(e["kind"] == "note" and e["text"].startswith("LongRoPE: a micro-batch padded past 32")
               for e in events)


def test_the_phi4_mini_qlora_recipe_estimate_lines_say_what_estimate_mem_says():
    fc.assert_recipe_estimates_hold("phi-4-mini-qlora.toml", runner, app, spare=True)


# the chat formats of OLMo 2 (Tülu's tags, EOS after each answer) and Granite 3 (role markers,
# <|end_of_text|> after every turn), written for these tests with transformers' generation marks; SmolLM3
# speaks ChatML (its masks: tests/test_families_e2e.py, with Qwen's)
OTHER_FORMATS = {
    "smollm3": (["<|im_start|>", "<|im_end|>"], "<|im_end|>", QWEN_TEMPLATE),
    "olmo2": (["<|system|>", "<|user|>", "<|assistant|>"], "<|endoftext|>", (
        "{%- for m in messages %}"
        "{%- if m.role == 'assistant' %}"
        "{{- '<|assistant|>\\n' }}{% generation %}{{- m.content + eos_token }}{% endgeneration %}"
        "{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
        "{%- else %}{{- '<|' + m.role + '|>\\n' + m.content + '\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}")),
    "granite": (["<|start_of_role|>", "<|end_of_role|>"], "<|end_of_text|>", (
        "{%- for m in messages %}"
        "{{- '<|start_of_role|>' + m.role + '<|end_of_role|>' }}"
        "{%- if m.role == 'assistant' %}"
        "{% generation %}{{- m.content + '<|end_of_text|>' }}{% endgeneration %}"
        "{%- else %}{{- m.content + '<|end_of_text|>' }}{%- endif %}"
        "{{- '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}")),
}


def write_family_dir(d: Path, family: str) -> Path:
    """A random-weight tiny preset of `family` exported as transformers saves it, with a BPE carrying the
    family's chat tokens, its chat format and EOS."""
    from tokenizers import Tokenizer

    from microft.models.config import ModelConfig
    from microft.models.hf import export_hf
    from microft.models.transformer import Transformer

    specials, eos, template = OTHER_FORMATS[family]
    tok = Tokenizer.from_str(trained_tokenizer_json())
    tok.add_special_tokens(specials)
    cfg = ModelConfig.from_preset(f"{family}-tiny").model_copy(update={
        "vocab_size": 640, "eos_token_id": tok.token_to_id(eos), "bos_token_id": None})
    torch.manual_seed(0)
    export_hf(Transformer(cfg), d)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": eos,
        "chat_template": template}), encoding="utf-8")
    return d


@pytest.mark.parametrize("family", ["olmo2", "granite"])
def test_chat_formats_mask_exactly_the_assistant_tokens_and_stop_at_their_end(family, tmp_path):
    from microft.data.instruct import load_instruct_data
    from microft.models.load import read_model_config

    _, eos, _ = OTHER_FORMATS[family]
    d = write_family_dir(tmp_path / family, family)
    data = fc.chat_file(tmp_path / "chat.jsonl", n=6)
    ours = tokenizer_for(str(d), read_model_config(d))
    assert ours.token_to_id(eos) in ours.eos_ids
    samples = load_instruct_data(RunConfig(model=str(d), data=str(data), val_frac=0.0), 256, ours).train
    fc.assert_masks_match(samples, transformers.AutoTokenizer.from_pretrained(d), fc.records_of(data), eos)


@pytest.mark.parametrize("family", list(OTHER_FORMATS))
def test_splits_and_resume_are_exact(family, tmp_path):
    """SmolLM3, OLMo 2, Granite 3 through `run_finetune`: one global batch split 1 × 4 (checkpointed) or
    4 × 1 gives the same weights, and a run stopped by SIGINT and resumed ends bit-exact."""
    model = write_family_dir(tmp_path / "model", family)
    fam = (model, fc.chat_file(tmp_path / "chat.jsonl", n=16))
    finals = fc.splits_finals(lambda out, mb, acc, **kw: run_cfg(fam, out, mb, acc, grad_ckpt=mb == 1, **kw),
                              tmp_path, [(1, 4), (4, 1)])
    fc.assert_same_weights(finals, (4, 1))
    fc.assert_resume_is_bit_exact(run_cfg(fam, tmp_path / "ref", 2, 2, save_every=2),
                                  run_cfg(fam, tmp_path / "cut", 2, 2, save_every=2))
