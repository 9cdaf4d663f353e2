"""GGUF export: one file that llama.cpp, Ollama and LM Studio run, written with ggml's own `gguf` package.

What goes in: the architecture and its hyper-parameters, every weight under llama.cpp's tensor names and
in its layout, the tokenizer (a byte-level BPE's vocabulary, merges, token types and the pre-tokenizer name
that picks llama.cpp's split regex, or a SentencePiece-style BPE's pieces and scores; bos/eos/pad and every
stop id) and the chat template the model was tuned with. Beside it, an Ollama `Modelfile`.

Each family's llama.cpp side is its `Gguf` in the family registry (`models/families/`): llama.cpp's
architecture name, the pre-tokenizer it falls back to, whether q/k rows are permuted for llama.cpp's
pairwise RoPE, the tensor-name map, the tensors llama.cpp keeps fused (Phi-3's), the family's own
hyper-parameters (and the checks refusing what llama.cpp's graph would run differently) and a per-tensor
transform (Gemma's norms). The switches several families share (partial rotary, LongRoPE, sliding-layer
patterns, local RoPE base, soft-caps) are written here from `ModelConfig`. Tensors are streamed: the file's
header is written from shapes alone, then each tensor is converted and written on its own, so the export
holds the model plus one converted tensor, never a second copy of the model. The tokenizer is
`gguf_vocab.py`, the chat templates and the Modelfile's `gguf_templates.py`; `write` is the writer the
export registry (`export/__init__.py`) names for `--format gguf`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from microft.errors import ConfigError
from microft.export import OPTIONS, Exported, ExportJob, require_gguf
from microft.export.gguf_templates import chat_template_of, plain_text_specials, template_go
from microft.export.gguf_vocab import Vocab, vocab_of, write_vocab
from microft.models import families
from microft.models.config import ModelConfig
from microft.models.families import Gguf

if TYPE_CHECKING:
    from microft.data.chat import ChatTemplate
    from microft.data.templates import Template
    from microft.data.tokenizer import Tokenizer

QUANTS = OPTIONS["quant"].choices  # `--quant`'s registry entry: the default first
DEFAULT_QUANT = OPTIONS["quant"].default
MODELFILE = "Modelfile"
QK = 32  # ggml's block size for q8_0 / q4_0: rows must be a multiple of it


# --------------------------------------------------------------------------- the families
TOP_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}


def family(cfg: ModelConfig) -> Gguf:
    """The family's llama.cpp entry (`models.families.Family.gguf`)."""
    fam = families.FAMILIES.get(cfg.model_type)
    if fam is None or fam.gguf is None:
        known = ", ".join(t for t, f in families.FAMILIES.items() if f.gguf is not None)
        raise ConfigError(f"GGUF export does not know model_type {cfg.model_type!r} yet; known: {known}")
    return fam.gguf


def gguf_name(cfg: ModelConfig, name: str) -> str:
    """llama.cpp's name for a microft parameter (`h.3.attn.q_proj.weight` -> `blk.3.attn_q.weight`)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    head, i, rest = name.split(".", 2)
    module, _, kind = rest.rpartition(".")
    fam = family(cfg)
    block = {**fam.block, **{part: fused for fused, parts in fam.fused.items() for part in parts}}
    if head != "h" or module not in block or kind not in ("weight", "bias"):
        raise ConfigError(f"GGUF export has no llama.cpp name for {name}")
    return f"blk.{i}.{block[module]}.{kind}"


def write_hparams(w: Any, cfg: ModelConfig) -> None:
    """The architecture's hyper-parameters under llama.cpp's keys: the shared ones, then the family's."""
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if not family(cfg).rotary:  # GPT-2: LayerNorm's eps (learned positions, no RoPE)
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        return
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.layer_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.rotary_dim)  # Phi-4-mini: RoPE on the leading 3/4 of each head
    if cfg.sliding_window:  # recorded; llama.cpp's llama graph attends to the whole context (see README)
        w.add_sliding_window(cfg.sliding_window)
    _write_rope_and_caps(w, cfg)
    hparams = family(cfg).hparams
    for method, value in (hparams(cfg) if hparams else {}).items():
        getattr(w, method)(value)


def _write_rope_and_caps(w: Any, cfg: ModelConfig) -> None:
    """The switches of the newer families under llama.cpp's keys: which layers slide (Gemma), the sliding
    layers' RoPE base and the others' linear scaling (Gemma 3), LongRoPE's attention factor and original
    context (Phi-3; the factors are tensors), attention and final soft-capping (Gemma 2)."""
    gg = require_gguf()
    if cfg.layer_types is not None:
        w.add_sliding_window_pattern([cfg.layer_window(i) is not None for i in range(cfg.n_layer)])
    if cfg.rope_local_theta or cfg.rope_linear_factor:
        w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
    if cfg.rope_linear_factor:
        w.add_rope_scaling_type(gg.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_linear_factor)
    if cfg.longrope is not None:
        w.add_rope_scaling_attn_factors(cfg.longrope.attention_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.longrope.original_max_position_embeddings)
    if cfg.attn_softcap is not None:
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap is not None:
        w.add_final_logit_softcapping(cfg.final_softcap)


# --------------------------------------------------------------------------- tensors


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from the rotate-halves order (HF, microft) to llama.cpp's rotate-adjacent-pairs order.

    Within each head, row j of the first half and row j of the second half become rows 2j and 2j + 1.
    """
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_freqs(cfg: ModelConfig) -> torch.Tensor | None:
    """Llama 3's RoPE scaling as llama.cpp reads it: a `rope_freqs` tensor that divides each frequency."""
    if cfg.rope_scaling is None:
        return None
    from microft.models.transformer import rope_inv_freq

    plain = rope_inv_freq(cfg.model_copy(update={"rope_scaling": None}))
    return (plain / rope_inv_freq(cfg)).float()


def gguf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 CPU tensor in llama.cpp's layout) of each weight, one at a time.

    Vocabulary rows are unpadded; a tied head is left out (llama.cpp reuses token_embd).
    """
    cfg: ModelConfig = model.config
    fam = family(cfg)
    freqs = rope_freqs(cfg)
    if freqs is not None:
        yield "rope_freqs.weight", freqs
    if cfg.longrope is not None:  # Phi-3's LongRoPE: llama.cpp divides each frequency by these
        yield "rope_factors_long.weight", torch.tensor(cfg.longrope.long_factor, dtype=torch.float32)
        yield "rope_factors_short.weight", torch.tensor(cfg.longrope.short_factor, dtype=torch.float32)
    params = dict(model.named_parameters(remove_duplicate=True))
    for name, p in params.items():
        if "lora_" in name:
            raise ConfigError("the model has unmerged LoRA adapters; merge them before exporting")
        parts = _fused_parts(fam, name)
        if parts is not None and parts[0] != name:
            continue  # written with the first part of its fused tensor
        if parts:
            t = torch.cat([_converted(cfg, fam, n, params[n]) for n in parts])
        else:
            t = _converted(cfg, fam, name, p)
        yield gguf_name(cfg, name), t.contiguous()


def _fused_parts(fam: Gguf, name: str) -> list[str] | None:
    """The microft parameters stacked into the llama.cpp tensor that `name` belongs to (None: its own)."""
    head, i, rest = name.split(".", 2) if name.startswith("h.") else ("", "", name)
    module, _, kind = rest.rpartition(".")
    for parts in fam.fused.values():
        if module in parts:
            return [f"{head}.{i}.{part}.{kind}" for part in parts]
    return None


def _converted(cfg: ModelConfig, fam: Gguf, name: str, p: torch.Tensor) -> torch.Tensor:
    """One parameter as fp32 in llama.cpp's layout: vocabulary rows unpadded, the family's transform, q/k
    rows permuted for pairwise RoPE."""
    t = p.detach().to("cpu", torch.float32)
    if name in ("wte.weight", "lm_head.weight"):
        t = t[: cfg.vocab_size]
    if fam.transform is not None:
        t = fam.transform(cfg, name, t)
    if fam.rope_pairs and (".attn.q_proj." in name or ".attn.k_proj." in name):
        t = permute_rows(t, cfg.n_head if ".q_proj." in name else cfg.n_kv_head)
    return t


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> str:
    """The storage type of one tensor: vectors (norms, biases, rope_freqs) stay f32, as llama.cpp's own
    converter keeps them; q8_0/q4_0 rows that are not a multiple of 32 fall back to f16."""
    if len(shape) < 2 or quant == "f32":
        return "f32"
    if quant in ("q8_0", "q4_0") and shape[-1] % QK:
        return "f16"
    return quant


def _qtype(kind: str):
    g = require_gguf().GGMLQuantizationType
    return {"f32": g.F32, "f16": g.F16, "bf16": g.BF16, "q8_0": g.Q8_0, "q4_0": g.Q4_0}[kind]


def encode_tensor(t: torch.Tensor, kind: str) -> np.ndarray:
    """A fp32 tensor as the bytes (or f32/f16 array) GGUF stores for `kind`."""
    a = t.numpy()
    if kind == "f32":
        return a
    if kind == "f16":
        return a.astype(np.float16)
    return require_gguf().quants.quantize(a, _qtype(kind))


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    n = 1
    for d in quant_shape_to_byte_shape(shape, _qtype(kind)) if kind not in ("f32", "f16") else shape:
        n *= d
    return n * {"f32": 4, "f16": 2}.get(kind, 1)


# --------------------------------------------------------------------------- writing


def file_stem(spec: str, model_dir: Path | None) -> str:
    """The file's name: the run's for its `final/`, `best/` or a step checkpoint, else the model directory's
    (or the preset's)."""
    if model_dir is None:
        return Path(spec).name or "model"
    d = model_dir.resolve()
    while d.name in ("final", "best", "checkpoints") or d.name.startswith("step-"):
        d = d.parent
    return d.name or "model"


@dataclass
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    modelfile: Path
    quant: str
    n_tensors: int
    template: str | None
    notes: list[str]


def _modelfile(gguf_file: str, v: Vocab, tmpl: Template | ChatTemplate | None) -> str:
    from microft.data.templates import Template

    lines = [f"FROM ./{gguf_file}"]
    if isinstance(tmpl, Template):
        lines.append('TEMPLATE """' + template_go(tmpl) + '"""')
    elif tmpl is not None:
        lines.append(
            "# no TEMPLATE: Ollama matches the GGUF's jinja chat template (tokenizer.chat_template) to one "
            "of its own; add a TEMPLATE in Go template syntax where it has none that fits"
        )
    stops = list(dict.fromkeys(v.stops + ([tmpl.stop] if isinstance(tmpl, Template) and tmpl.stop else [])))
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


def general_name(name: str, fam: Gguf, tok: Tokenizer) -> str:
    """The file's general.name: `name`, with the family's `rstrip_name` added where llama.cpp needs it to
    strip whitespace after special tokens as the tokenizer does (Phi-3's turn markers)."""
    tag = fam.rstrip_name
    if tag is None or tag in name.lower().replace("-", "") or not hasattr(tok, "raw"):
        return name
    added = json.loads(tok.raw.to_str()).get("added_tokens", [])
    return f"{name} ({tag})" if any(a.get("special") and a.get("rstrip") for a in added) else name


def write_gguf(
    path: Path, model: torch.nn.Module, v: Vocab, quant: str, chat_template: str | None, name: str
) -> int:
    """Write the GGUF file: header and metadata from the shapes, then each tensor converted on its own."""
    gg = require_gguf()
    cfg: ModelConfig = model.config
    w = gg.GGUFWriter(str(path), family(cfg).arch)
    w.add_name(name)
    w.add_file_type(_file_type(quant))
    w.add_quantization_version(gg.GGML_QUANT_VERSION)
    write_hparams(w, cfg)
    write_vocab(w, v)
    if chat_template:
        w.add_chat_template(chat_template)
    kinds = []
    for tname, t in gguf_tensors(model):  # shapes only: nothing is converted yet
        kind = tensor_type(tname, tuple(t.shape), quant)
        kinds.append(kind)
        w.add_tensor_info(
            tname, tuple(t.shape), np.dtype(np.float32), _nbytes(tuple(t.shape), kind), raw_dtype=_qtype(kind)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for (_, t), kind in zip(gguf_tensors(model), kinds):
        w.write_tensor_data(encode_tensor(t, kind))
    w.close()
    return len(kinds)


def _file_type(quant: str) -> int:
    ft = require_gguf().LlamaFileType
    return {
        "f32": ft.ALL_F32,
        "f16": ft.MOSTLY_F16,
        "bf16": ft.MOSTLY_BF16,
        "q8_0": ft.MOSTLY_Q8_0,
        "q4_0": ft.MOSTLY_Q4_0,
    }[quant]


def export_gguf(
    model: torch.nn.Module,
    tok: Tokenizer,
    out_dir: str | Path,
    quant: str = DEFAULT_QUANT,
    template: Template | ChatTemplate | None = None,
    overwrite: bool = False,
    name: str = "model",
) -> GGUFExport:
    """Write `out_dir/<name>-<quant>.gguf` and an Ollama `Modelfile`, atomically.

    `template`: the template the model was tuned with (its jinja form goes into the file). Refuses a
    non-empty `out_dir` unless `overwrite`.
    """
    from microft.weights import atomic_dir

    if quant not in QUANTS:
        raise ConfigError(f"unknown --quant {quant!r}; choose one of: {', '.join(QUANTS)}")
    require_gguf()
    hparams = family(model.config).hparams
    if hparams is not None:  # a model llama.cpp cannot run as microft does is refused before any file
        hparams(model.config)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; pass --force to overwrite it")
    v = vocab_of(tok, model.config, family(model.config).pre)
    v.notes += plain_text_specials(tok, template)
    jinja = chat_template_of(template)
    fname = f"{name}-{quant}.gguf"
    general = general_name(name, family(model.config), tok)
    with atomic_dir(out_dir) as tmp:
        n = write_gguf(tmp / fname, model, v, quant, jinja, general)
        (tmp / MODELFILE).write_text(_modelfile(fname, v, template), encoding="utf-8")
    return GGUFExport(
        out_dir / fname, out_dir / MODELFILE, quant, n, getattr(template, "name", None), v.notes
    )


def write(job: ExportJob) -> Exported:
    """`export --format gguf`: load (LoRA merged, NF4 dequantized), find the tuned template, write the file
    and its Modelfile."""
    import time

    from microft.data.tokenizer_files import tokenizer_for
    from microft.models.artifacts import load_any, model_dir
    from microft.models.lora import merge_lora

    t0 = time.perf_counter()
    net = merge_lora(load_any(job.model))  # adapters folded in, an NF4 base dequantized; a no-op otherwise
    tok = tokenizer_for(job.model, net.config)
    tmpl = _job_template(job, tok)
    quant = job.options["quant"]
    with job.writing():
        res = export_gguf(net, tok, job.out, quant, tmpl, overwrite=job.force,
                          name=file_stem(job.model, model_dir(job.model)))
    summary = (f"(GGUF {quant}, {res.n_tensors} tensors, chat template {res.template or 'none'}, "
               f"{time.perf_counter() - t0:.1f} s); Ollama: ollama create NAME -f {res.modelfile}")
    return Exported(res.path, summary, notes=tuple(res.notes))


def _job_template(job: ExportJob, tok: Tokenizer) -> Template | ChatTemplate | None:
    """The chat template to write: --template, else the one the run trained with, else the tokenizer's own."""
    from microft.data.chat import resolve_template
    from microft.export.gguf_templates import trained_template_spec
    from microft.models.artifacts import model_dir

    template = job.options["template"]
    spec = template if template is not None else trained_template_spec(model_dir(job.model))
    if template is None and spec is not None:  # the run's own: a template file it named may be gone since
        try:
            return resolve_template(spec, tok)
        except ConfigError as e:
            raise ConfigError(f"the run trained with --template {spec}, which can't be read now ({e}); "
                              "pass --template") from None
    if spec is not None:
        return resolve_template(spec, tok)
    if tok.chat_template:
        return resolve_template("chat", tok)
    return None
