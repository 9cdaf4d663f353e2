"""Gemma end to end: a tiny Gemma 3 with a small BPE tokenizer and a chat template in Gemma's turn format
(`<start_of_turn>user ... <end_of_turn>`, the assistant's role written `model`), fine-tuned through
`run_finetune`: assistant-only masks equal to transformers', every stop id in `generate --chat`, exact splits
of the global batch, bit-exact resume, QLoRA; and the Gemma recipe's estimate lines."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from microft.cli import app  # noqa: E402
from microft.config import RunConfig  # noqa: E402
from microft.errors import Interrupted  # noqa: E402
from microft.models.config import IGNORE_INDEX  # noqa: E402
from microft.runs import run_finetune, tokenizer_for  # noqa: E402
from microft.weights import read_safetensors  # noqa: E402
from tests.test_families_e2e import chat_file  # noqa: E402
from tests.test_families_gemma import LORA_NAMES  # noqa: E402
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
    return d, chat_file(root / "chat.jsonl", n=16), ids


def cfg_for(gemma, out: Path, micro_bs: int, accum: int, **kw) -> RunConfig:
    model, data, _ = gemma
    base = dict(model=str(model), data=str(data), out=str(out), micro_bs=micro_bs, accum=accum, max_steps=4,
                max_seq_len=64, precision="fp32", device="cpu", lr=1e-2, warmup=0, val_frac=0.0,
                log_format="plain", samples_per_eval=0, seed=5)
    base.update(kw)
    return RunConfig(**base)


def test_assistant_masks_equal_transformers_and_the_stop_ids_include_end_of_turn(gemma, tmp_path):
    from microft.instruct import load_instruct_data
    from microft.models.load import read_model_config

    model, data, ids = gemma
    tok = tokenizer_for(str(model), read_model_config(model))
    assert tok.eos_ids == [ids["<eos>"], ids["<end_of_turn>"]] and tok.bos_id == ids["<bos>"]
    samples = load_instruct_data(RunConfig(model=str(model), data=str(data), val_frac=0.0), 256, tok).train
    hf_tok = transformers.AutoTokenizer.from_pretrained(model)
    records = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    assert len(samples) == len(records)
    for s, msgs in zip(samples, records, strict=True):
        enc = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        ids_, mask = enc["input_ids"], enc["assistant_masks"]
        assert ids_[0] == ids["<bos>"] and ids_.count(ids["<bos>"]) == 1
        last = max(i for i, m in enumerate(mask) if m)
        assert ids_[last] == ids["<end_of_turn>"]  # each turn's target ends with its stop token
        assert s["input_ids"] == ids_[:last]
        want = [t if m else IGNORE_INDEX for t, m in zip(ids_[1 : last + 1], mask[1 : last + 1])]
        assert s["labels"] == want


def test_generate_chat_renders_gemma_turns_and_generates_what_transformers_does(gemma):
    model, _, ids = gemma
    res = runner.invoke(app, ["generate", "--model", str(model), "--chat", "--prompt", "Say red and blue.",
                              "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["prompt"] == "<bos><start_of_turn>user\nSay red and blue.<end_of_turn>\n<start_of_turn>model\n"
    hf_tok = transformers.AutoTokenizer.from_pretrained(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    x = hf_tok(got["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
    stops = [ids["<eos>"], ids["<end_of_turn>"]]
    with torch.no_grad():
        new = hf.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=0)
    new = new[0, x.shape[1]:]
    assert got["completion"] == hf_tok.decode([t for t in new.tolist() if t not in stops]).strip()


def test_splits_of_the_global_batch_give_the_same_weights(gemma, tmp_path):
    finals = {}
    for mb, acc in [(1, 4), (4, 1)]:
        run_finetune(cfg_for(gemma, tmp_path / f"{mb}x{acc}", mb, acc, optimizer="sgd", momentum=0.0,
                             max_grad_norm=None, group_by_length=False), lambda e: None)
        finals[(mb, acc)] = read_safetensors(tmp_path / f"{mb}x{acc}" / "final" / "model.safetensors")
    ref, other = finals[(4, 1)], finals[(1, 4)]
    start = read_safetensors(gemma[0] / "model.safetensors")
    rows = ref["wte.weight"].shape[0]
    assert not torch.equal(ref["wte.weight"], start["model.embed_tokens.weight"][:rows])
    for name, t in ref.items():
        assert (other[name] - t).abs().max().item() <= 1e-6, name


def test_resume_after_sigint_is_bit_exact_with_checkpointed_blocks(gemma, tmp_path):
    run_finetune(cfg_for(gemma, tmp_path / "ref", 2, 2, save_every=2, grad_ckpt=True), lambda e: None)
    cfg = cfg_for(gemma, tmp_path / "cut", 2, 2, save_every=2, grad_ckpt=True)

    def interrupt_at_2(e):
        if e["kind"] == "step" and e["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run_finetune(cfg, interrupt_at_2)
    run_finetune(cfg.model_copy(update={"resume": "auto"}), lambda e: None)
    ref = read_safetensors(tmp_path / "ref" / "final" / "model.safetensors")
    got = read_safetensors(tmp_path / "cut" / "final" / "model.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_qlora_trains_and_its_adapter_loads_in_peft(gemma, tmp_path):
    peft = pytest.importorskip("peft")
    model, _, _ = gemma
    run_finetune(cfg_for(gemma, tmp_path / "q", 2, 1, max_steps=2, lora=True, quantize="nf4",
                         lora_targets="all", lr=1e-3), lambda e: None)
    adapter = tmp_path / "q" / "final"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == LORA_NAMES
    peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model), adapter)


def test_the_gemma_recipes_estimate_mem_lines_say_what_estimate_mem_says():
    """Its peak and fit (the shared recipe check), and the batch split each line says the planner suggests."""
    import shlex

    from tests.test_families_e2e import (
        test_the_recipes_estimate_mem_lines_say_what_estimate_mem_says as check,
    )

    check("gemma-3-1b-lora.toml")
    path = Path(__file__).parent.parent / "recipes" / "gemma-3-1b-lora.toml"
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("#   microft estimate-mem")]
    for line in lines:
        cmd, claim = line.removeprefix("#   microft ").split("#", 1)
        res = runner.invoke(app, shlex.split(cmd.replace("recipes/", f"{path.parent}/")))
        split = claim.split("suggests ")[1].split(" (")[0]
        assert f"recommended: your settings: change {split}" in res.output
