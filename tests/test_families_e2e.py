"""The new families end to end: a tiny Qwen3 reached by hub repo id in the local HF cache, fine-tuned with
LoRA on chat JSONL through the CLI, checked with peft and transformers; a tiny Llama through `run_finetune`
for exact accumulation, bit-exact resume and pretraining with its own BOS/EOS."""

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
from microft.data.tokenizer_files import TOKENIZER_FILES, tokenizer_for  # noqa: E402
from microft.errors import ConfigError  # noqa: E402
from microft.runs import run_pretrain  # noqa: E402
from microft.weights import read_safetensors  # noqa: E402
from tests.tokdirs import LLAMA3_TEMPLATE, QWEN_TEMPLATE_GEN, write_llama_dir, write_qwen_dir  # noqa: E402

runner = CliRunner()
COMMIT = "c0ffee" * 6 + "c0ff"
SHAPE = dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


def hf_dir(d: Path, family: str) -> Path:
    """A random-weight transformers model of `family` saved with save_pretrained, with a small BPE tokenizer
    and that family's chat template beside it."""
    torch.manual_seed(0)
    if family == "qwen3":
        cfg = transformers.Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=True)
        transformers.Qwen3ForCausalLM(cfg).save_pretrained(d)
        # renders as QWEN_TEMPLATE; marks assistant text for transformers
        write_qwen_dir(d, QWEN_TEMPLATE_GEN)
    else:
        cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False)
        transformers.LlamaForCausalLM(cfg).save_pretrained(d)
        write_llama_dir(d, LLAMA3_TEMPLATE)
    return d  # the tokenizer's generation_config.json (a list of EOS ids) replaced save_pretrained's


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """An HF cache holding `tiny/qwen3` (refs/main -> a snapshot), as `microft download` leaves it."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--tiny--qwen3"
    hf_dir(repo / "snapshots" / COMMIT, "qwen3")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, repo / "snapshots" / COMMIT


@pytest.fixture(scope="module")
def qwen_run(qwen_cache, tmp_path_factory):
    """`microft finetune --model tiny/qwen3 --lora` on chat JSONL, offline from the cache (template: auto)."""
    cache, snap = qwen_cache
    root = tmp_path_factory.mktemp("qwen-run")
    data = fc.chat_file(root / "chat.jsonl")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        res = runner.invoke(app, ["finetune", "--model", "tiny/qwen3", "--data", str(data),
                                  "--out", str(root / "out"), "--lora", "--lora-r", "4",
                                  "--lora-targets", "all", "--micro-bs", "2", "--accum", "2",
                                  "--max-steps", "4", "--eval-every", "4", "--save-every", "2",
                                  "--lr", "1e-2", "--device", "cpu", "--precision", "fp32",
                                  "--log-format", "plain", "--max-seq-len", "96", "--val-frac", "0.2"])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return root / "out", snap, res.output


def test_chat_finetune_by_repo_id_writes_an_adapter_peft_loads_with_equal_logits(qwen_run):
    peft = pytest.importorskip("peft")
    from microft.models.artifacts import load_any

    out, snap, output = qwen_run
    final = out / "final"
    assert "sample  step" in output  # per-eval samples generated through the model's tokenizer
    base = transformers.AutoModelForCausalLM.from_pretrained(snap)
    ours = load_any(str(final)).eval()
    peft_model = peft.PeftModel.from_pretrained(base, final).eval()
    x = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = peft_model(x).logits
        assert (ours(x) - want).abs().max().item() <= 1e-5
    lora_b = read_safetensors(final / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in lora_b.items() if "lora_B" in k)  # the adapter trained


def test_every_saved_model_dir_carries_the_tokenizer_files(qwen_run):
    out, snap, _ = qwen_run
    have = {f for f in TOKENIZER_FILES if (snap / f).is_file()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= have
    dirs = [out / "final", out / "best", *sorted((out / "checkpoints").iterdir())]
    for d in dirs:
        assert {f for f in TOKENIZER_FILES if (d / f).is_file()} == have, d
        assert (d / "tokenizer.json").read_bytes() == (snap / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")  # transformers finds them too
    assert tok.eos_token == "<|im_end|>"


def test_loss_masks_cover_exactly_the_assistant_tokens(qwen_cache, tmp_path):
    from microft.data.instruct import load_instruct_data
    from microft.models.load import read_model_config

    _, snap = qwen_cache
    data = fc.chat_file(tmp_path / "chat.jsonl", n=6)
    cfg = RunConfig(model=str(snap), data=str(data), val_frac=0.0)
    tok = tokenizer_for(str(snap), read_model_config(snap))
    samples = load_instruct_data(cfg, 256, tok).train
    fc.assert_masks_match(samples, transformers.AutoTokenizer.from_pretrained(snap), fc.records_of(data))


def test_generate_chat_streams_what_transformers_generates(qwen_run):
    peft = pytest.importorskip("peft")
    out, snap, _ = qwen_run
    res = runner.invoke(app, ["generate", "--model", str(out / "final"), "--chat", "--prompt",
                              "Say red and blue.", "--temperature", "0", "--max-new-tokens", "12", "--device",
                              "cpu", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    hf_tok = transformers.AutoTokenizer.from_pretrained(snap)
    assert got["prompt"] == hf_tok.apply_chat_template([{"role": "user", "content": "Say red and blue."}],
                                                       tokenize=False, add_generation_prompt=True)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(snap),
                                           out / "final").eval()
    stops = json.loads((snap / "generation_config.json").read_text())["eos_token_id"]
    assert got["completion"] == fc.greedy_completion(model, hf_tok, got["prompt"], 12, stops)


def test_export_and_merge_fold_the_adapter_in_and_keep_the_tokenizer(qwen_run, tmp_path):
    peft = pytest.importorskip("peft")
    out, snap, _ = qwen_run
    res = runner.invoke(app, ["export", "--model", str(out / "final"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert "model_type qwen3" in res.output
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "Qwen3ForCausalLM"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|im_end|>"
    base = transformers.AutoModelForCausalLM.from_pretrained(snap)
    ref = peft.PeftModel.from_pretrained(base, out / "final").eval()
    x = torch.randint(0, 600, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (exported(x).logits - ref(x).logits).abs().max().item() <= 1e-4
    res = runner.invoke(app, ["merge", "--model", str(out / "final"), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = tmp_path / "merged"
    assert (merged / "tokenizer.json").is_file() and not (merged / "adapter_config.json").exists()
    res = runner.invoke(app, ["generate", "--model", str(merged), "--prompt", "hello", "--temperature", "0",
                              "--max-new-tokens", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_a_random_preset_of_a_new_family_is_refused_in_one_line(tmp_path):
    data = fc.chat_file(tmp_path / "chat.jsonl", n=4)
    res = runner.invoke(app, ["finetune", "--model", "llama-tiny", "--data", str(data),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "randomly initialised llama preset without a tokenizer" in res.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- a tiny Llama through run_finetune


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return hf_dir(root / "model", "llama"), fc.chat_file(root / "chat.jsonl", n=16)


def llama_cfg(llama, out: Path, micro_bs: int, accum: int, **kw) -> RunConfig:
    return fc.run_config(*llama, out, micro_bs, accum, **kw)


def test_llama_splits_of_the_global_batch_give_the_same_weights(llama, tmp_path):
    finals = fc.splits_finals(lambda *a, **kw: llama_cfg(llama, *a, **kw), tmp_path, [(1, 4), (2, 2), (4, 1)])
    ref = finals[(4, 1)]
    start = read_safetensors(llama[0] / "model.safetensors")
    rows = ref["wte.weight"].shape[0]
    assert not torch.equal(ref["wte.weight"], start["model.embed_tokens.weight"][:rows])
    fc.assert_same_weights(finals, (4, 1))


def test_llama_resume_after_sigint_is_bit_exact(llama, tmp_path):
    def stopped_at_2() -> None:
        assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-0000002"]

    fc.assert_resume_is_bit_exact(llama_cfg(llama, tmp_path / "ref", 2, 2, save_every=2),
                                  llama_cfg(llama, tmp_path / "cut", 2, 2, save_every=2), stopped_at_2)


def test_llama_pretrain_packs_with_its_bos_and_eos_and_generates(llama, tmp_path):
    from microft.data.batches import pack_documents
    from microft.models.load import read_model_config

    model, _ = llama
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, how are you?\n\nThe quick brown fox jumps over the lazy dog.\n\n" * 20)
    tok = tokenizer_for(str(model), read_model_config(model))
    blocks = pack_documents(["hello world", "the cat"], lambda d: tok.prefix + tok.encode(d), 4,
                            eos_id=tok.eos_id)
    want = [tok.bos_id, *tok.encode("hello world"), tok.eos_id, tok.bos_id, *tok.encode("the cat"),
            tok.eos_id]
    assert blocks.tokens.tolist() == want
    assert tok.bos_id == tok.token_to_id("<|begin_of_text|>") and tok.eos_id == tok.token_to_id("<|eot_id|>")
    cfg = RunConfig(model=str(model), data=str(corpus), out=str(tmp_path / "pt"), micro_bs=2, accum=1,
                    max_steps=2, max_seq_len=32, precision="fp32", device="cpu", log_format="plain",
                    group_by_length=False)
    run_pretrain(cfg, lambda e: None)
    assert (tmp_path / "pt" / "final" / "tokenizer.json").is_file()
    res = runner.invoke(app, ["generate", "--model", str(tmp_path / "pt" / "final"), "--prompt", "hello",
                              "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["prompt"] == "hello"


def test_a_tokenizer_bigger_than_the_model_is_refused(llama, tmp_path):
    from microft.models.load import read_model_config

    model, _ = llama
    small = read_model_config(model).model_copy(update={"vocab_size": 100})
    with pytest.raises(ConfigError, match="do not belong together"):
        tokenizer_for(str(model), small)


@pytest.mark.parametrize("recipe", ["qwen3-0.6b-lora.toml", "llama-3.2-1b-lora.toml",
                                    "llama-3.2-1b-qlora.toml"])
def test_the_recipes_estimate_mem_lines_say_what_estimate_mem_says(recipe):
    fc.assert_recipe_estimates_hold(recipe, runner, app)
