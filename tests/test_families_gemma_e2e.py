"""Gemma end to end: a tiny Gemma 3 with a small BPE tokenizer and a chat template in Gemma's turn format
(`<start_of_turn>user ... <end_of_turn>`, the assistant's role written `model`), fine-tuned through
`run_finetune`: assistant-only masks equal to transformers', every stop id in `generate --chat`, exact splits
of the global batch, bit-exact resume, QLoRA; and the Gemma recipe's estimate lines."""

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
from microft.runs import run_finetune  # noqa: E402
from microft.weights import read_safetensors  # noqa: E402
from tests.tokdirs import CORPUS  # noqa: E402

runner = CliRunner()
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
# Gemma's turn format (a system message is folded into the first user turn), written for these tests; the
# {% generation %} marks tell transformers which text is the assistant's and change nothing in the rendering
GEMMA_TEMPLATE_GEN = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set prefix = messages[0].content | trim + '\\n\\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for m in turns %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{% generation %}{{- m.content | trim + '<end_of_turn>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<start_of_turn>' + m.role + '\\n' + (prefix if loop.first else '') }}"
    "{{- m.content | trim + '<end_of_turn>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
SHAPE = dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2,
             query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=3,
             final_logit_softcapping=8.0,
             pad_token_id=0, eos_token_id=1, bos_token_id=2)


def write_gemma_tokenizer(d: Path) -> dict[str, int]:
    """A byte-level BPE with Gemma's specials; the post-processor adds <bos> as Gemma's does; EOS <eos> in
    tokenizer_config.json and, as the Hub's instruction-tuned Gemmas carry it, [<eos>, <end_of_turn>] in
    generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=GEMMA_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    ids = {t: tok.token_to_id(t) for t in GEMMA_SPECIALS}
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                      special_tokens=[("<bos>", ids["<bos>"])]),
    ])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "chat_template": GEMMA_TEMPLATE_GEN}), encoding="utf-8")
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<bos>"], "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]]}),
        encoding="utf-8")
    return ids


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(model directory: a random Gemma 3 text model, tokenizer and template; chat data; special ids)."""
    root = tmp_path_factory.mktemp("gemma")
    d = root / "model"
    torch.manual_seed(0)
    transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**SHAPE)).save_pretrained(d)
    ids = write_gemma_tokenizer(d)
    assert (ids["<pad>"], ids["<eos>"], ids["<bos>"]) == (0, 1, 2)  # the config's ids, as in Gemma's
    return d, fc.chat_file(root / "chat.jsonl", n=16), ids


def cfg_for(gemma, out: Path, micro_bs: int, accum: int, **kw) -> RunConfig:
    model, data, _ = gemma
    return fc.run_config(model, data, out, micro_bs, accum, **kw)


def test_assistant_masks_equal_transformers_and_the_stop_ids_include_end_of_turn(gemma, tmp_path):
    from microft.data.instruct import load_instruct_data
    from microft.models.load import read_model_config

    model, data, ids = gemma
    tok = tokenizer_for(str(model), read_model_config(model))
    assert tok.eos_ids == [ids["<eos>"], ids["<end_of_turn>"]] and tok.bos_id == ids["<bos>"]
    samples = load_instruct_data(RunConfig(model=str(model), data=str(data), val_frac=0.0), 256, tok).train
    hf_tok = transformers.AutoTokenizer.from_pretrained(model)
    # each turn's target ends with its stop token
    for ids_ in fc.assert_masks_match(samples, hf_tok, fc.records_of(data), "<end_of_turn>"):
        assert ids_[0] == ids["<bos>"] and ids_.count(ids["<bos>"]) == 1


def test_generate_chat_renders_gemma_turns_and_generates_what_transformers_does(gemma):
    model, _, ids = gemma
    res = runner.invoke(app, ["generate", "--model", str(model), "--chat", "--prompt", "Say red and blue.",
                              "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["prompt"] == "<bos><start_of_turn>user\nSay red and blue.<end_of_turn>\n<start_of_turn>model\n"
    hf_tok = transformers.AutoTokenizer.from_pretrained(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    stops = [ids["<eos>"], ids["<end_of_turn>"]]
    assert got["completion"] == fc.greedy_completion(hf, hf_tok, got["prompt"], 12, stops)


def test_splits_of_the_global_batch_give_the_same_weights(gemma, tmp_path):
    finals = fc.splits_finals(lambda *a, **kw: cfg_for(gemma, *a, **kw), tmp_path, [(1, 4), (4, 1)])
    ref = finals[(4, 1)]
    start = read_safetensors(gemma[0] / "model.safetensors")
    rows = ref["wte.weight"].shape[0]
    assert not torch.equal(ref["wte.weight"], start["model.embed_tokens.weight"][:rows])
    fc.assert_same_weights(finals, (4, 1))


def test_resume_after_sigint_is_bit_exact_with_checkpointed_blocks(gemma, tmp_path):
    fc.assert_resume_is_bit_exact(cfg_for(gemma, tmp_path / "ref", 2, 2, save_every=2, grad_ckpt=True),
                                  cfg_for(gemma, tmp_path / "cut", 2, 2, save_every=2, grad_ckpt=True))


def test_qlora_trains_and_its_adapter_loads_in_peft(gemma, tmp_path):
    peft = pytest.importorskip("peft")
    model, _, _ = gemma
    run_finetune(cfg_for(gemma, tmp_path / "q", 2, 1, max_steps=2, lora=True, quantize="nf4",
                         lora_targets="all", lr=1e-3), lambda e: None)
    adapter = tmp_path / "q" / "final"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == fc.LORA_NAMES
    peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model), adapter)


def test_the_gemma_recipes_estimate_mem_lines_say_what_estimate_mem_says():
    """Its peak and fit (the shared recipe check), and the batch split each line says the planner suggests."""
    fc.assert_recipe_estimates_hold("gemma-3-1b-lora.toml", runner, app)
    for output, claim in fc.recipe_estimates("gemma-3-1b-lora.toml", runner, app, args=()):
        split = claim.split("suggests ")[1].split(" (")[0]
        assert f"recommended: your settings: change {split}" in output
