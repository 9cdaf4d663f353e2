"""Every directory microft writes for other tools loads in transformers with the tokenizer microft trained
with.

`AutoTokenizer.from_pretrained` on an export, a merge or a run's `final/` must encode text to the same ids as
microft's own tokenizer for that model: a preset (GPT-2's vendored BPE, written as vocab.json + merges.txt),
an HF directory (its files copied), a checkpoint (old ones without tokenizer files too), a LoRA merge, and the
demo's own tokenizer. An export with no tokenizer would let transformers build an empty one (`[]` for any
text).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microft.cli import app
from microft.data.tokenizer import gpt2_tokenizer, load_tokenizer
from microft.data.tokenizer_files import TOKENIZER_MODELS
from tests.test_finetune import alpaca_file

transformers = pytest.importorskip("transformers")
runner = CliRunner()

TEXTS = [
    "Hello world",
    "  two  spaces,\ttabs\tand\n\nnew lines  ",
    "digits 0 7 42 3.14159 -1,234,567 and 2026-12-07",
    "punctuation: (a) [b] {c} <d> 'e' \"f\" !?;:... it's we'll they're",
    "non-ASCII: naïve café, Ünïcödé, 日本語のテキスト, emoji 😀 and — dashes",
]


def assert_same_ids(directory: Path, ours) -> None:
    """transformers' tokenizer of `directory` gives microft's ids for every text (and decodes them back)."""
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ids, f"transformers built an empty tokenizer from {directory}"
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == text
    if ours.eos_token is not None:
        assert theirs.eos_token == ours.eos_token and theirs.eos_token_id == ours.eos_id


def run(*args: str) -> None:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory) -> Path:
    """A LoRA fine-tune of the gpt2-tiny preset, with a step checkpoint."""
    tmp = tmp_path_factory.mktemp("preset")
    data = alpaca_file(tmp / "data.json", n=24)
    out = tmp / "run"
    run("finetune", "--model", "gpt2-tiny", "--data", str(data), "--out", str(out), "--micro-bs", "2",
        "--accum", "1", "--max-steps", "2", "--save-every", "1", "--eval-every", "0", "--lora",
        "--lora-r", "2",
        "--max-seq-len", "48", "--log-format", "plain", "--device", "cpu")
    return out


def test_a_preset_run_writes_gpt2s_tokenizer_into_every_model_directory(preset_run):
    for d in (preset_run / "final", *sorted((preset_run / "checkpoints").iterdir())):
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in d.iterdir()}, d
    assert_same_ids(preset_run / "final", gpt2_tokenizer())
    assert load_tokenizer(preset_run / "final") is gpt2_tokenizer()  # microft still reads it as GPT-2's own


def test_export_and_merge_of_a_preset_run_load_its_tokenizer(preset_run, tmp_path):
    run("export", "--model", str(preset_run / "final"), "--out", str(tmp_path / "hf"))
    assert_same_ids(tmp_path / "hf", gpt2_tokenizer())
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "GPT2LMHeadModel"
    run("merge", "--model", str(preset_run / "final"), "--out", str(tmp_path / "merged"))
    assert_same_ids(tmp_path / "merged", gpt2_tokenizer())
    step = sorted((preset_run / "checkpoints").iterdir())[-1]
    run("export", "--model", str(step), "--out", str(tmp_path / "from-step"))
    assert_same_ids(tmp_path / "from-step", gpt2_tokenizer())


def test_export_of_a_preset_and_of_a_checkpoint_saved_without_tokenizer_files(preset_run, tmp_path):
    run("export", "--model", "gpt2-tiny", "--out", str(tmp_path / "preset"))
    assert_same_ids(tmp_path / "preset", gpt2_tokenizer())
    old = tmp_path / "old-final"  # what microft saved before it wrote tokenizer files
    run("merge", "--model", str(preset_run / "final"), "--out", str(old))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (old / name).unlink()
    run("export", "--model", str(old), "--out", str(tmp_path / "hf"))
    assert_same_ids(tmp_path / "hf", gpt2_tokenizer())


def test_export_of_an_hf_directory_copies_its_own_tokenizer(tmp_path):
    from tests.tokdirs import write_qwen_dir

    src = write_qwen_dir(tmp_path / "src")
    transformers.Qwen3Config(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             max_position_embeddings=64, tie_word_embeddings=True).save_pretrained(src)
    config = transformers.AutoConfig.from_pretrained(src)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    run("export", "--model", str(src), "--out", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not (tmp_path / "hf" / "vocab.json").exists()  # never GPT-2's files for another tokenizer
    assert_same_ids(tmp_path / "hf", load_tokenizer(src))


def test_a_gpt2_directory_without_tokenizer_files_exports_gpt2s(tmp_path):
    """A GPT-2-shaped HF directory with only config and weights (saved by transformers) trains with GPT-2's
    tokenizer in microft; its export carries that tokenizer."""
    cfg = transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2)  # GPT-2's 50257 ids
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "src")
    run("export", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "hf"))
    assert_same_ids(tmp_path / "hf", gpt2_tokenizer())
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 32 and config["tokenizer_class"] == "GPT2Tokenizer"


def test_a_model_without_a_tokenizer_exports_with_a_note_not_an_empty_tokenizer(tmp_path):
    res = runner.invoke(app, ["export", "--model", "llama-tiny", "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert "has no tokenizer files" in res.output and "randomly initialised llama preset" in res.output
    assert not any((tmp_path / "hf" / f).exists() for f in TOKENIZER_MODELS)


def test_the_demo_tokenizer_loads_in_transformers(tmp_path):
    from microft.data.demo import demo_tokenizer, write_demo_tokenizer

    write_demo_tokenizer(tmp_path)
    ours = demo_tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["Reverse the order of these words.\nlemon tiger river", "42 7 19", *TEXTS]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    assert theirs.eos_token_id == ours.eos_id == 0


def test_gpt2_files_are_written_once_and_never_over_a_models_own(tmp_path):
    from microft.data.tokenizer import write_gpt2_tokenizer

    assert write_gpt2_tokenizer(tmp_path, 64) == ["vocab.json", "merges.txt", "tokenizer_config.json"]
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 50000 and merges[1] == "Ġ t"
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert write_gpt2_tokenizer(tmp_path) == []
    assert (tmp_path / "tokenizer_config.json").read_text() == "{}"
    shutil.rmtree(tmp_path)


def test_gpt2s_files_encode_like_the_vendored_bpe_on_random_text(tmp_path):
    """The merges derived from the ranks reproduce tiktoken's byte-pair encoding: random strings over words,
    digits, punctuation, whitespace runs, accented, CJK and emoji characters, and raw byte-level oddities."""
    import random

    from microft.data.tokenizer import write_gpt2_tokenizer

    write_gpt2_tokenizer(tmp_path)
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), gpt2_tokenizer()
    rng = random.Random(0)
    pieces = ["the", " The", "ing", " tokenization", "'s", "'ll", "n't", " 1", "2024", "3.5", "--", "...",
              "!?", " ", "  ", "\n", "\t", "\r\n", "é", "ß", "Ω", "中文", "ー", "😀", "👍🏽",
              "\u200b", "\x00", "~", "@#$%"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), repr(text)


def test_a_gpt2_directory_with_another_vocab_json_is_refused_not_read_as_gpt2s(tmp_path):
    """vocab.json + merges.txt of another vocabulary (no tokenizer.json) used to train with GPT-2's ids
    without a word, and its export would now carry the other vocabulary: refused in one line instead."""
    from microft.data.tokenizer import write_gpt2_tokenizer
    from microft.errors import ConfigError

    transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path)
    write_gpt2_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path) is gpt2_tokenizer()  # GPT-2's own files: read as GPT-2's
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ConfigError, match="vocab.json is not GPT-2's vocabulary") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
