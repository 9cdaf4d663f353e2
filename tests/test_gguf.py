"""GGUF export: the file's layout and metadata, and llama.cpp (llama-cpp-python) running it as microft does.

The llama.cpp checks skip when `llama_cpp` is not importable; the rest needs only the `gguf` package.
Tolerances, on these models' logits (spread over about ±30; docs/benchmarks.md has the measured numbers):
an f32 file with an f32 KV cache gives llama.cpp's logits within F32_ATOL of microft's (GPT-2's GELU and
Gemma's GeGLU go through ggml's f16 lookup table: 0.008-0.014 here; the other families agree to 1e-4); an f16
file (llama.cpp's default f16 KV cache) within F16_ATOL. bf16, q8_0 and q4_0 files are compared with
microft running the same rounded weights (dequantized from the very blocks written), within ROUNDED_ATOL:
what is left is llama.cpp rounding its activations for those matmuls; against the unrounded model q4_0 is
off by ~15 here, so a misplaced block fails.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("gguf")
pytest.importorskip("transformers")

import gguf  # noqa: E402

from microft.cli import app  # noqa: E402
from microft.data.chat import ChatTemplate, render_chat  # noqa: E402
from microft.data.templates import BUILTIN_TEMPLATES, load_template  # noqa: E402
from microft.data.tokenizer_files import tokenizer_for  # noqa: E402
from microft.errors import ConfigError  # noqa: E402
from microft.export.gguf import permute_rows  # noqa: E402
from microft.export.gguf_templates import template_jinja  # noqa: E402
from microft.export.gguf_vocab import tiktoken_vocab  # noqa: E402
from microft.generate import generate  # noqa: E402
from microft.models.artifacts import load_any  # noqa: E402
from microft.models.families import FAMILIES  # noqa: E402
from tests.ggufdirs import FAMILY_TOKENIZERS, rounded_model, write_family_dir  # noqa: E402

runner = CliRunner()
NAMES = list(FAMILY_TOKENIZERS)  # gpt2, llama (Llama 3.1 rope scaling), qwen2, qwen3, smollm2, mistral, phi3,
# smollm3, olmo2, granite, gemma2, gemma3 (ggufdirs.newer_family_config: each switch away from its default)
F32_ATOL, F16_ATOL, ROUNDED_ATOL = 0.02, 0.1, {"bf16": 0.5, "q8_0": 1.5, "q4_0": 1.5}
TEXTS = [
    "Hello world, how are you?",
    "  two  spaces and\ttabs\n\nnew lines; it's they're we'll",
    "digits 1234567 and 3.14159, 100% (x) [y] {z} <w> a+b=c",
    "héllo wörld, ça va? 日本語のテキスト 😀 emoji",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3? héllo 😀"},
    {"role": "assistant", "content": "6."},
]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """`family_dir(name)`: the family's tiny checkpoint, written once for the module."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = write_family_dir(root / name, name)
        return made[name]

    return get


def export(model: str, out: Path, *args: str) -> Path:
    res = runner.invoke(app, ["export", "--model", model, "--out", str(out), "--format", "gguf", *args])
    assert res.exit_code == 0, res.output
    return next(out.glob("*.gguf"))


def read_fields(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}


# --------------------------------------------------------------------------- without llama.cpp


def _rope_halves(x: torch.Tensor, pos: float) -> torch.Tensor:  # microft / HF: rotate (i, i + d/2)
    d = x.shape[-1]
    f = pos / 10000.0 ** (torch.arange(0, d, 2).double() / d)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * f.cos() - b * f.sin(), a * f.sin() + b * f.cos()], -1)


def _rope_pairs(x: torch.Tensor, pos: float) -> torch.Tensor:  # llama.cpp's llama: rotate (2i, 2i + 1)
    d = x.shape[-1]
    f = pos / 10000.0 ** (torch.arange(0, d, 2).double() / d)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * f.cos() - b * f.sin(), a * f.sin() + b * f.cos()], -1).reshape(x.shape)


def test_permuted_rows_rotated_in_pairs_give_the_same_attention_scores():
    g = torch.Generator().manual_seed(0)
    n_head, hd, C = 3, 8, 12
    wq, wk = (
        torch.randn(n_head * hd, C, generator=g).double(),
        torch.randn(n_head * hd, C, generator=g).double(),
    )
    x1, x2 = torch.randn(C, generator=g).double(), torch.randn(C, generator=g).double()

    def scores(rope, wq, wk):
        q = rope((wq @ x1).view(n_head, hd), 5.0)
        k = rope((wk @ x2).view(n_head, hd), 2.0)
        return (q * k).sum(-1)

    want = scores(_rope_halves, wq, wk)
    got = scores(_rope_pairs, permute_rows(wq, n_head), permute_rows(wk, n_head))
    assert torch.allclose(got, want, atol=1e-10)
    assert not torch.allclose(scores(_rope_pairs, wq, wk), want, atol=1e-3)  # unpermuted: wrong


def test_merges_rebuilt_from_tiktoken_ranks_encode_like_tiktoken():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from microft.data.tokenizer import gpt2_tokenizer

    enc = gpt2_tokenizer().enc
    tokens, merges = tiktoken_vocab(enc._mergeable_ranks)
    assert len(tokens) == 50256 and len(merges) == 50000
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    for text in TEXTS:
        assert bpe.encode(text).ids == enc.encode_ordinary(text)


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, "file"])
def test_a_microft_template_as_jinja_renders_the_training_text(name, tmp_path):
    if name == "file":
        (tmp_path / "t.toml").write_text(
            'prompt = "Q: {instruction}\\n{input}\\nA:"\nturn = "[{role}] {content} {{x}}\\n"\n'
            'response_end = " <END>"\nroles = {assistant = "bot\'s"}\n'
        )
        name = str(tmp_path / "t.toml")
    t = load_template(name)
    jinja, eos = template_jinja(t), "<|endoftext|>"
    chat = "".join(text for text, _ in t.chat_segments([(m["role"], m["content"]) for m in CHAT]))
    assert render_chat(jinja, CHAT, eos_token=eos) == chat + eos
    assert render_chat(jinja, CHAT[:4], add_generation_prompt=True, eos_token=eos) == "".join(
        text for text, _ in t.chat_segments([(m["role"], m["content"]) for m in CHAT[:4]])
    ) + t.turn.split("{content}")[0].format(role=t.roles["assistant"])
    one = CHAT[1:3]  # one user message and its answer: an instruction record
    assert (
        render_chat(jinja, one, eos_token=eos)
        == "".join(s for s, _ in t.instruction_segments(one[0]["content"], "", one[1]["content"])) + eos
    )
    assert render_chat(jinja, one[:1], add_generation_prompt=True) == t.render_prompt(one[0]["content"])


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	src, _ := os.ReadFile(os.Args[1])
	var msgs []Message
	if err := json.Unmarshal([]byte(os.Args[2]), &msgs); err != nil {
		panic(err)
	}
	t := template.Must(template.New("t").Parse(string(src)))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": msgs}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, "file"])
def test_the_modelfiles_go_template_renders_like_microft(name, tmp_path):
    """Ollama's TEMPLATE, run by Go's own text/template (as Ollama runs it): `.Messages` of Role/Content."""
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain")
    from microft.export.gguf_templates import template_go

    (tmp_path / "main.go").write_text(GO_RENDER)
    (tmp_path / "go.mod").write_text("module render\n\ngo 1.19\n")
    subprocess.run([go, "build", "-o", "render", "."], cwd=tmp_path, check=True, capture_output=True)
    if name == "file":
        (tmp_path / "t.toml").write_text(
            'prompt = "Q: {instruction}\\n{input}\\nA:"\nturn = "[{role}] {content} {{x}}\\n"\n'
            'roles = {assistant = "bot\'s \\"x\\""}\n'
        )
        name = str(tmp_path / "t.toml")
    t = load_template(name)
    (tmp_path / "tmpl").write_text(template_go(t))
    chat = [*CHAT[:3], {"role": "user", "content": "And {{ .Role }}? héllo 😀"}]
    head = t.turn.split("{content}")[0].format(role=t.roles["assistant"])
    for msgs, want in (
        (chat, "".join(x for x, _ in t.chat_segments([(m["role"], m["content"]) for m in chat])) + head),
        (chat[1:2], t.render_prompt(chat[1]["content"])),
    ):
        arg = json.dumps([{"Role": m["role"], "Content": m["content"]} for m in msgs])
        out = subprocess.run(
            [str(tmp_path / "render"), str(tmp_path / "tmpl"), arg], capture_output=True, check=True
        )
        assert out.stdout.decode() == want


def test_the_file_carries_architecture_tokenizer_stops_and_template(family_dir, tmp_path):
    d = family_dir("llama")
    path = export(str(d), tmp_path / "out")
    f, tok = read_fields(path), tokenizer_for(str(d), load_any(str(d)).config)
    assert path.name == f"{d.name}-f16.gguf"
    assert f["general.architecture"] == "llama" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == f["llama.vocab_size"]
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_id and f["tokenizer.ggml.add_bos_token"] is True
    stops = [f[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")]
    assert stops == tok.eos_ids and len(stops) == 3
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["rope_freqs.weight"] == "F32"  # Llama 3's frequency scaling
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}\n")
    assert [ln for ln in modelfile.splitlines() if ln.startswith("PARAMETER stop")] == [
        f"PARAMETER stop {json.dumps(tok.decode([i]))}" for i in tok.eos_ids
    ]


def test_the_template_a_run_trained_with_is_the_one_written(family_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(family_dir("gpt2"), run / "final")
    (run / "run.json").write_text(json.dumps({"config": {"template": "chatml", "data": "chat.jsonl"}}))
    path = export(str(run / "final"), tmp_path / "a")
    assert path.name == "run-f16.gguf"  # named after the run
    f = read_fields(path)
    assert f["tokenizer.chat_template"] == template_jinja(load_template("chatml"))
    modelfile = (tmp_path / "a" / "Modelfile").read_text()
    assert 'TEMPLATE """' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    f = read_fields(export(str(run / "final"), tmp_path / "b", "--template", str(jinja)))
    assert f["tokenizer.chat_template"] == jinja.read_text()
    (run / "run.json").write_text(json.dumps({"config": {"template": str(tmp_path / "gone.toml")}}))
    res = runner.invoke(
        app, ["export", "--model", str(run / "final"), "--out", str(tmp_path / "c"), "--format", "gguf"]
    )
    assert (
        res.exit_code == 2
        and "gone.toml, which can't be read now" in res.output
        and "pass --template" in res.output
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quant", "q5_k"], "unknown --quant 'q5_k'"),
        (["--format", "onnx"], "unknown export format 'onnx'"),
        (["--format", "hf", "--quant", "f16"], "--quant and --template are for --format gguf"),
    ],
)
def test_bad_flags_are_one_line(args, message, tmp_path):
    argv = ["export", "--model", "gpt2-tiny", "--out", str(tmp_path / "o")]
    res = runner.invoke(app, argv + (args if "--format" in args else ["--format", "gguf", *args]))
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_without_the_gguf_package_a_one_line_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    res = runner.invoke(
        app, ["export", "--model", "gpt2-tiny", "--out", str(tmp_path / "o"), "--format", "gguf"]
    )
    assert res.exit_code == 2 and "pip install 'microft[gguf]'" in res.output
    assert not (tmp_path / "o").exists()


def test_an_earlier_export_is_kept_without_force(tmp_path):
    export("gpt2-tiny", tmp_path / "o", "--quant", "q8_0")
    res = runner.invoke(
        app, ["export", "--model", "gpt2-tiny", "--out", str(tmp_path / "o"), "--format", "gguf"]
    )
    assert res.exit_code == 2 and "pass --force" in res.output
    assert [p.name for p in (tmp_path / "o").glob("*.gguf")] == ["gpt2-tiny-q8_0.gguf"]


def test_the_readme_states_the_tested_tolerances():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    text = " ".join(readme.split())
    assert f"an f32 file within {F32_ATOL} of microft's" in text
    assert f"an f16 file within {F16_ATOL} with llama.cpp's default f16 KV cache" in text
    r = ROUNDED_ATOL
    assert f"bf16, q8_0 and q4_0 files within {r['bf16']}, {r['q8_0']} and {r['q4_0']} of microft" in text


def test_every_family_has_a_gguf_entry_and_a_tested_checkpoint():
    assert all(f.gguf is not None for f in FAMILIES.values())
    tested = {"smollm2": "llama", "gemma3": "gemma3_text", "phi3.5": "phi3", "phi4": "phi3"}
    assert {tested.get(n, n) for n in NAMES} == set(FAMILIES)


@pytest.mark.parametrize(
    "preset, update, message",
    [
        ("smollm3-tiny", {}, "llama.cpp's smollm3 leaves RoPE out of every 4th layer only; this model's "
         "no-RoPE layers are [1]"),
        ("olmo2-tiny", {"qkv_bias": True}, "llama.cpp's olmo2 adds no attention or MLP biases"),
        ("gemma2-tiny", {"tie_embeddings": False}, "llama.cpp's gemma2 ties the LM head to the embeddings"),
        ("gemma2-tiny", {"final_softcap": None}, "llama.cpp's gemma2 always soft-caps attention and logits"),
        ("gemma3-tiny", {"final_softcap": 5.0}, "llama.cpp's gemma3 applies no soft-capping"),
    ],
)
def test_a_model_llama_cpp_would_run_differently_is_refused_in_one_line(preset, update, message, tmp_path):
    from microft.data.tokenizer import gpt2_tokenizer
    from microft.export.gguf import export_gguf
    from microft.models.config import ModelConfig
    from microft.models.transformer import Transformer

    cfg = ModelConfig.from_preset(preset).model_copy(update=update)
    with pytest.raises(ConfigError, match="GGUF export is refused") as err:
        export_gguf(Transformer(cfg), gpt2_tokenizer(), tmp_path / "o")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_the_newer_families_hyper_parameters_and_tensors(family_dir, tmp_path):
    """What llama.cpp reads beyond the shared keys: Phi-3's fused q/k/v and gate/up, LongRoPE factors and
    partial rotary, Phi-4-mini's split regex named; Gemma 3's per-layer window pattern, local base, linear
    scaling and (1 + w) norms."""
    phi = export(str(family_dir("phi3")), tmp_path / "phi", "--quant", "f32")
    f, r = read_fields(phi), gguf.GGUFReader(str(phi))
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (64, 64 + 2 * 32) and shapes["blk.0.ffn_up.weight"] == (64, 256)
    assert "blk.0.attn_q.weight" not in shapes and "output.weight" not in shapes  # tied: token_embd
    assert f["phi3.rope.dimension_count"] == 8 and f["phi3.rope.scaling.original_context_length"] == 256
    factors = {t.name: t.data.tolist() for t in r.tensors if t.name.startswith("rope_factors")}
    assert factors == {"rope_factors_long.weight": [2.0, 3.0, 5.0, 9.0],
                       "rope_factors_short.weight": [1.0, 1.5, 2.0, 4.0]}
    assert read_fields(export(str(family_dir("phi4")), tmp_path / "phi4"))["tokenizer.ggml.pre"] == "gpt-4o"
    d = family_dir("gemma3")
    f = read_fields(export(str(d), tmp_path / "gemma", "--quant", "f32"))
    assert f["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    assert f["gemma3.rope.freq_base_swa"] == 20000.0 and f["gemma3.rope.freq_base"] == 1e6
    assert f["gemma3.rope.scaling.type"] == "linear" and f["gemma3.rope.scaling.factor"] == 2.0
    norm = next(t for t in gguf.GGUFReader(str(next((tmp_path / "gemma").glob("*.gguf")))).tensors
                if t.name == "blk.0.ffn_norm.weight")
    ours = load_any(str(d)).h[0].ln_2.weight.detach().numpy()
    assert np.allclose(norm.data, ours + 1.0)


def test_a_phi3_file_tells_llama_cpp_to_strip_after_phis_turn_markers(family_dir, tmp_path):
    """llama.cpp strips the whitespace after Phi-3's special tokens, as its tokenizer.json does, only when
    general.name says phi3: a run named otherwise gets it added, and tokenizes its chat as microft does."""
    run = tmp_path / "mine"
    shutil.copytree(family_dir("phi3"), run)
    path = export(str(run), tmp_path / "o")
    assert read_fields(path)["general.name"] == "mine (phi3)"
    tok = tokenizer_for(str(run), load_any(str(run)).config)
    ids, _ = ChatTemplate(tok).encode_chat(CHAT)
    text = ChatTemplate(tok).render(CHAT)
    assert "<|user|>\n" in text and llama(path).tokenize(text.encode(), add_bos=False, special=True) == ids


# --------------------------------------------------------------------------- llama.cpp runs the file


def llama(path: Path, n_ctx: int = 128, f32_cache: bool = False):
    llama_cpp = pytest.importorskip("llama_cpp")
    kv = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32; llama.cpp's default is f16
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True, verbose=False, **kv
    )


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def is_eog(llm, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def prompt_ids(tok) -> list[int]:
    return tok.prefix + tok.encode("Hello world, how are you? 1234 héllo", special=False)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, family_dir):
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name in NAMES:
        d = family_dir(name)
        out[name] = {q: export(str(d), root / f"{name}-{q}", "--quant", q) for q in ("f32", "f16")}
    return out


@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_logits_and_greedy_text_equal_microfts(family_dir, name, exports):
    d = family_dir(name)
    model = load_any(str(d)).eval()
    tok = tokenizer_for(str(d), model.config)
    ids = prompt_ids(tok)
    with torch.no_grad():
        want = model(torch.tensor([ids])).double()[0].numpy()
    assert np.abs(want).max() > 5  # logits far apart: the comparisons below can fail
    for quant, atol in (("f32", F32_ATOL), ("f16", F16_ATOL)):
        got = cpp_logits(llama(exports[name][quant], f32_cache=quant == "f32"), ids)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= atol, (quant, np.abs(got - want).max())
    ours = list(generate(model, ids, 20, temperature=0.0, stop_ids=[]))
    assert len(ours) == 20
    assert cpp_greedy(llama(exports[name]["f16"]), ids, 20) == ours


@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_tokenizes_like_microft_and_stops_at_every_stop_id(family_dir, name, exports):
    d = family_dir(name)
    tok = tokenizer_for(str(d), load_any(str(d)).config)
    llm = llama(exports[name]["f16"])
    specials = "".join(tok.decode([i]) for i in sorted(tok.special_ids))
    for text in [*TEXTS, specials + TEXTS[2] + specials]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, special=True), (
            text
        )
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    assert llm.tokenize(b"hi", add_bos=True, special=False)[: len(tok.prefix)] == tok.prefix
    assert all(is_eog(llm, i) for i in tok.eos_ids)
    if tok.bos_id is not None:
        assert llm.token_bos() == tok.bos_id


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILY_TOKENIZERS[n][5]])
def test_the_files_chat_template_renders_the_text_microft_trains_on(family_dir, name, exports):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    d = family_dir(name)
    tok = tokenizer_for(str(d), load_any(str(d)).config)
    llm = llama(exports[name]["f16"])
    source = llm.metadata["tokenizer.chat_template"]
    bos = llm.detokenize([llm.token_bos()], special=True).decode() if tok.bos_id is not None else ""
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    ours = ChatTemplate(tok)
    chat = CHAT[1:] if name == "mistral" else CHAT  # Mistral's template has no system turn
    full = Jinja2ChatFormatter(source, eos, bos, add_generation_prompt=False)(messages=chat).prompt
    assert full == ours.render(chat)
    ids, _ = ours.encode_chat(chat)  # what training tokenizes, token for token
    assert llm.tokenize(full.encode(), add_bos=False, special=True) == ids
    prompt = Jinja2ChatFormatter(source, eos, bos)(messages=chat[:-1]).prompt
    assert prompt == ours.render(chat[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3", "granite", "gemma3"])
def test_rounded_files_give_the_logits_of_their_rounded_weights(family_dir, name, tmp_path):
    d = family_dir(name)
    model = load_any(str(d)).eval()
    ids = prompt_ids(tokenizer_for(str(d), model.config))
    with torch.no_grad():
        exact = model(torch.tensor([ids])).double()[0].numpy()
    for quant, atol in ROUNDED_ATOL.items():
        path = export(str(d), tmp_path / quant, "--quant", quant)
        with torch.no_grad():
            want = rounded_model(d, path).eval()(torch.tensor([ids])).double()[0].numpy()
        got = cpp_logits(llama(path), ids)
        assert np.abs(got - want).max() <= atol, (quant, np.abs(got - want).max())
        assert np.abs(got - exact).max() > np.abs(got - want).max()  # the rounding is what was left


def test_llama_cpp_reads_a_llama3_tiktoken_vocabulary(tmp_path):
    """A Llama 3 `tokenizer.model` (tiktoken ranks, no tokenizer.json): merges rebuilt, Llama 3's split."""
    from microft.data.tokenizer import load_tokenizer
    from microft.export.gguf import export_gguf
    from microft.models.config import ModelConfig
    from microft.models.transformer import Transformer
    from tests.tokdirs import N_BASE, write_llama3_tiktoken

    cfg = ModelConfig.from_preset("llama-tiny").model_copy(update={"vocab_size": N_BASE + 256})
    write_llama3_tiktoken(
        tmp_path / "m", config={"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}
    )
    tok = load_tokenizer(tmp_path / "m")
    llm = llama(export_gguf(Transformer(cfg), tok, tmp_path / "o", "f16").path)
    for text in TEXTS + ["<|begin_of_text|>hello 1234<|eot_id|>"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, special=True), (
            text
        )
    assert all(is_eog(llm, i) for i in tok.eos_ids) and len(tok.eos_ids) == 3


def test_llama_cpp_reads_gpt2s_own_vocabulary(tmp_path):
    """The gpt2 presets' tokenizer (GPT-2's 50257 tokens, from tiktoken ranks) as llama.cpp splits text."""
    from microft.data.tokenizer import gpt2_tokenizer

    llm = llama(export("gpt2-tiny", tmp_path / "o"))
    for text in TEXTS + ["<|endoftext|> and text"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == gpt2_tokenizer().encode(
            text, special=True
        )


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_a_lora_or_qlora_run_is_merged_on_the_way(family_dir, quantized, tmp_path):
    """The adapters are folded in (an NF4 base dequantized): llama.cpp's logits are the adapted model's."""
    from microft.models.artifacts import load_quantized
    from microft.models.lora import apply_lora, lora_modules, save_adapter
    from microft.models.quant import write_quant_record

    d = family_dir("llama")
    model = load_quantized(str(d), "nf4", False, seed=0) if quantized else load_any(str(d))
    apply_lora(model, 4, 8.0, 0.0, "all")
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    run = tmp_path / "final"
    save_adapter(run, model, str(d))
    if quantized:
        write_quant_record(run, model)
    ids = prompt_ids(tokenizer_for(str(d), model.config))
    with torch.no_grad():
        want = model.eval()(torch.tensor([ids])).double()[0].numpy()
        plain = load_any(str(d)).eval()(torch.tensor([ids])).double()[0].numpy()
    got = cpp_logits(llama(export(str(run), tmp_path / "out", "--quant", "f32"), f32_cache=True), ids)
    assert np.abs(got - want).max() <= F32_ATOL
    assert np.abs(plain - want).max() > 1.0  # the adapters (and NF4) change the logits: a dropped one fails


def test_mistral_records_its_window_and_its_tokenizer_kind(family_dir, tmp_path):
    """llama.cpp runs Mistral as `llama`, whose graph attends to the whole context: the window is written for
    the record, and the logits agree while the context is within it (the tiny model's window, 64, holds the
    prompt and the 20 generated tokens above)."""
    f = read_fields(export(str(family_dir("mistral")), tmp_path / "o"))
    assert f["general.architecture"] == "llama" and f["llama.attention.sliding_window"] == 64
    # Mistral 7B's SentencePiece-style tokenizer: llama.cpp's "llama" tokenizer, merging by score
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
    assert "tokenizer.ggml.merges" not in f and f["tokenizer.ggml.unknown_token_id"] == 0


def test_a_tokenizer_that_is_not_bpe_is_refused_in_one_line(family_dir, tmp_path):
    from tokenizers import Tokenizer, models

    d = tmp_path / "wordlevel"
    shutil.copytree(family_dir("qwen2"), d)
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3}
    Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(d / "tokenizer.json"))
    res = runner.invoke(app, ["export", "--model", str(d), "--out", str(tmp_path / "o"), "--format", "gguf"])
    assert (
        res.exit_code == 2
        and "writes BPE tokenizers; this tokenizer.json has a WordLevel model" in res.output
    )
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_finetune_run_exports_with_the_template_it_trained_with(family_dir, tmp_path):
    """`microft finetune --lora --template alpaca`, then `export --format gguf` of its final/: the adapters
    merged, alpaca as the file's template, and llama.cpp's prompt for one user message is `generate`'s."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    rows = [
        {"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}"}
        for w in "red green blue cat dog".split()
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    res = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(family_dir("gpt2")),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "run"),
            "--template",
            "alpaca",
            "--lora",
            "--max-steps",
            "2",
            "--micro-bs",
            "2",
            "--lr",
            "1e-2",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--log-format",
            "plain",
            "--val-frac",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    path = export(str(tmp_path / "run" / "final"), tmp_path / "gguf", "--quant", "f32")
    assert path.name == "run-f32.gguf"
    llm = llama(path, f32_cache=True)
    source = llm.metadata["tokenizer.chat_template"]
    assert source == template_jinja(load_template("alpaca"))
    prompt = Jinja2ChatFormatter(source, "<|endoftext|>", "")(
        messages=[{"role": "user", "content": "Repeat red."}]
    )
    assert prompt.prompt == load_template("alpaca").render_prompt("Repeat red.")
    model = load_any(str(tmp_path / "run" / "final")).eval()
    ids = prompt_ids(tokenizer_for(str(tmp_path / "run" / "final"), model.config))
    with torch.no_grad():
        want = model(torch.tensor([ids])).double()[0].numpy()
    assert np.abs(cpp_logits(llm, ids) - want).max() <= F32_ATOL


def test_a_microft_template_writing_special_tokens_is_noted(family_dir, tmp_path):
    """chatml's markers are plain text to microft's templates but control tokens to llama.cpp: said."""
    res = runner.invoke(
        app,
        [
            "export",
            "--model",
            str(family_dir("qwen2")),
            "--out",
            str(tmp_path / "o"),
            "--format",
            "gguf",
            "--template",
            "chatml",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "note: template 'chatml' writes '<|im_end|>', which microft trained on as plain text" in res.output
