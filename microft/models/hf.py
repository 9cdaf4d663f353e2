"""Hugging Face checkpoints: key maps per model_type, (sharded) weight files, import into place, export.

microft names modules the same way for every family (`wte`, `h.{i}.ln_1`, `h.{i}.attn.q_proj`, ...);
`hf_name` maps a parameter or module path to the family's HF name:

    gpt2     transformer.h.0.attn.c_attn.weight     (Conv1D: weight stored (in, out), transposed here)
    llama…   model.layers.0.self_attn.q_proj.weight, model.embed_tokens, model.norm, lm_head

Old GPT-2 uploads (`openai-community/gpt2`) have bare `h.0…` keys and causal-mask buffers; both
are read. Weights load one tensor at a time (plain file reads, no memory map), straight into the parameter's
place, device and dtype (see `load.materialize`); export writes shards with an index above a size.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from microft.errors import CheckpointError
from microft.models.config import ModelConfig
from microft.models.families import family
from microft.weights import atomic_dir

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
MAX_SHARD_BYTES = 2 * 2**30
VOCAB_ROWS = ("wte.weight", "lm_head.weight")  # padded in the model, unpadded in files


def fused_part(cfg: ModelConfig, name: str) -> tuple[str, int, int, int] | None:
    """Where HF keeps a microft linear (or its weight/bias) inside a fused tensor (Phi-3's qkv_proj): (the
    fused module's microft path, with the same suffix, first row, rows, all rows), else None."""
    fused = family(cfg.model_type).fused
    m = re.fullmatch(r"(h\.\d+)\.([^.]+\.[^.]+)(\..+)?", name) if fused else None
    if m is None:
        return None
    block, module, suffix = m[1], m[2], m[3] or ""
    for whole, parts in fused.items():
        rows = [getattr(cfg, size) for _, size in parts]
        for i, (part, _) in enumerate(parts):
            if part == module:
                return f"{block}.{whole}{suffix}", sum(rows[:i]), rows[i], sum(rows)
    return None


def hf_name(cfg: ModelConfig, name: str) -> str:
    """The HF name of a microft parameter or module path (`h.0.attn.q_proj.weight` -> `model.layers.0...`; a
    part of a fused tensor: the fused one's, `...self_attn.qkv_proj.weight` for phi3)."""
    part = fused_part(cfg, name)
    return family(cfg.model_type).hf_key(part[0] if part else name)


def is_transposed(cfg: ModelConfig, name: str) -> bool:
    """Whether HF stores this weight (in, out): GPT-2's Conv1D projections."""
    suffixes = family(cfg.model_type).transposed
    return bool(suffixes) and name.endswith(suffixes)


# --- reading -----------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class TensorFiles:
    """The tensors of a checkpoint directory, read one at a time.

    `model.safetensors`, or shards listed by `model.safetensors.index.json` (nothing read until
    asked, then only that tensor's bytes); a pickled `pytorch_model.bin` is loaded whole
    (weights_only), as it must be. Use as a context manager.
    """

    def __init__(self, directory: str | Path):
        self.directory = d = Path(directory)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        self._dict: dict[str, torch.Tensor] | None = None
        st, index, pt = d / SAFETENSORS, d / SAFETENSORS_INDEX, d / PYTORCH_BIN
        if st.exists():
            self.source = st
            self.where = {k: st for k in self._open(st).keys()}
        elif index.exists():
            self.source = index
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"cannot read {index}: {_one_line(e)}") from None
            self.where = {k: d / f for k, f in weight_map.items()}
            for f in sorted(set(self.where.values())):
                if not f.exists():
                    raise CheckpointError(f"shard missing: {f} (listed in {index.name})")
        elif pt.exists():
            self.source = pt
            self._dict = _load_bin(pt)
            self.where = {k: pt for k in self._dict}
        elif (d / f"{PYTORCH_BIN}.index.json").exists():
            raise CheckpointError(f"{d}: sharded pytorch_model.bin checkpoints are not supported; "
                                  "use the safetensors files")
        else:
            raise CheckpointError(f"no weights in {d}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or "
                                  f"{PYTORCH_BIN}")

    def _open(self, path: Path) -> _SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(_SafetensorsFile(path))
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        if self._dict is not None:
            return self._dict[key]
        path = self.where[key]
        return self._open(path).get_tensor(key)

    def __enter__(self) -> TensorFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._dict = None


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class _SafetensorsFile:
    """One safetensors file, read with plain file reads rather than a memory map.

    Each tensor is read into memory of its own; the file's pages stay in the kernel's page cache
    instead of this process's resident set, so loading (and quantizing) a model tensor by tensor
    holds only what it keeps. The layout: an 8-byte little-endian header length, a JSON header
    (name -> dtype, shape, data_offsets), then the data.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.f = open(path, "rb")  # noqa: SIM115  (closed by __exit__)
            size = path.stat().st_size
            n = int.from_bytes(self.f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(self.f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8 too
            raise CheckpointError(f"corrupt weights file {path}: {_one_line(e)}") from None
        header.pop("__metadata__", None)
        self.entries, self.base, self.size = header, 8 + n, size

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, key: str) -> torch.Tensor:
        try:
            e = self.entries[key]
            dtype, shape = ST_DTYPES[e["dtype"]], list(e["shape"])
            start, end = (int(x) for x in e["data_offsets"])
            count = 1
            for d in shape:
                count *= int(d)
            if not 0 <= start <= end <= self.size - self.base or end - start != count * dtype.itemsize:
                raise ValueError(f"{key}: offsets {start}..{end} do not hold a {e['dtype']} tensor of shape "
                                 f"{shape}")
            buf = torch.empty(end - start, dtype=torch.uint8)
            self.f.seek(self.base + start)
            if self.f.readinto(buf.numpy()) != end - start:
                raise ValueError(f"{key}: the file ends early")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"corrupt weights file {self.path}: {_one_line(e)}") from None
        return buf.view(dtype).reshape(shape)

    def __enter__(self) -> _SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def _load_bin(pt: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which runs pickled code
        raise CheckpointError(f"corrupt weights file {pt}: not a plain PyTorch state dict of "
                              "tensors") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"corrupt weights file {pt}: {_one_line(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{pt} does not hold a state dict")
    return state


class HFReader:
    """Reads microft-named weights from HF files: `has(name)`, and `reader(name)` (nn.Linear layout)."""

    def __init__(self, cfg: ModelConfig, files: TensorFiles):
        self.cfg, self.files, self.keys = cfg, files, set(files.keys())
        self.bare = family(cfg.model_type).bare_keys
        # the last fused tensor read: its parts come in turn
        self._fused: tuple[str, torch.Tensor] | None = None
        if cfg.model_type == "gpt2":
            _check_gpt2_head(files, self.keys)

    def key(self, name: str) -> str | None:
        key = hf_name(self.cfg, name)
        if key not in self.keys and self.bare and name in self.keys:  # an old upload's unprefixed layout
            key = name
        return key if key in self.keys else None

    def has(self, name: str) -> bool:
        return self.key(name) is not None

    def __call__(self, name: str) -> torch.Tensor:
        key = self.key(name)
        part = fused_part(self.cfg, name)
        if part is not None:
            if self._fused is None or self._fused[0] != key:
                self._fused = (key, self.files.get(key))
            t = self._fused[1]
            if t.shape[0] != part[3]:
                raise CheckpointError(f"{self.files.source}: {key} has {t.shape[0]} rows, the model expects "
                                      f"{part[3]}")
            if part[1] + part[2] == part[3]:  # its last part: nothing holds the fused tensor any longer
                self._fused = None
            return t[part[1] : part[1] + part[2]].clone()  # its own storage, not a view of the fused tensor
        t = self.files.get(key)
        if is_transposed(self.cfg, name):
            if t.dim() != 2:
                raise CheckpointError(f"{self.files.source}: {key} should be a matrix, has shape "
                                      f"{tuple(t.shape)}")
            t = t.t()
        return t


def _check_gpt2_head(files: TensorFiles, keys: set[str]) -> None:
    if "lm_head.weight" not in keys:
        return
    wte_key = next((k for k in ("transformer.wte.weight", "wte.weight") if k in keys), None)
    head = files.get("lm_head.weight")
    if wte_key is not None:
        wte = files.get(wte_key)
        if head.shape == wte.shape and torch.equal(head, wte):
            return
    raise CheckpointError(f"{files.source}: lm_head.weight differs from wte.weight; untied LM heads are "
                          "unsupported for gpt2")


# --- writing -----------------------------------------------------------------------------------
def hf_layout(model: torch.nn.Module) -> list[tuple[str, list[str], int]]:
    """(HF key, the microft parameters it holds in row order, bytes) of each tensor `save_pretrained` writes:
    one parameter each, or the parts of a fused tensor (Phi-3's q/k/v_proj in qkv_proj). Vocabulary rows
    unpadded; a tied head is left out (transformers ties it on load)."""
    cfg = model.config
    out: dict[str, tuple[list[tuple[int, str]], int]] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if "lora_" in name:
            raise CheckpointError("the model has unmerged LoRA adapters; merge them before exporting")
        rows = cfg.vocab_size if name in VOCAB_ROWS else p.shape[0]
        size = p[:rows].numel() * p.element_size()
        part = fused_part(cfg, name)
        names, total = out.get(hf_name(cfg, name), ([], 0))
        out[hf_name(cfg, name)] = ([*names, (part[1] if part else 0, name)], total + size)
    return [(key, [n for _, n in sorted(names)], size) for key, (names, size) in out.items()]


def hf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, CPU tensor) of each tensor of `hf_layout`, one at a time, as `save_pretrained` lays them
    out."""
    cfg = model.config
    params = dict(model.named_parameters())
    for key, names, _ in hf_layout(model):
        parts = []
        for name in names:
            t = params[name].detach()
            if name in VOCAB_ROWS:
                t = t[: cfg.vocab_size]
            if is_transposed(cfg, name):
                t = t.t()
            parts.append(t.to("cpu"))
        yield key, (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()


def write_hf(directory: Path, model: torch.nn.Module, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `config.json` and the weights into an existing directory; returns the weight file names.

    One `model.safetensors` up to `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` shards
    with `model.safetensors.index.json`. Shards are written as they fill: at most one shard of
    tensors is held on the CPU at a time.
    """
    config = model.config.to_hf()  # refuses switches the family's config.json cannot express
    layout = hf_layout(model)
    sizes = {key: size for key, _, size in layout}
    groups: list[list[str]] = [[]]
    filled = 0
    for key, _, size in layout:
        if groups[-1] and filled + size > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(key)
        filled += size
    files = [SAFETENSORS] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    tensors = hf_tensors(model)
    for fname, group in zip(files, groups):
        shard = dict(next(tensors) for _ in group)
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        del shard
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return files


def export_hf(model: torch.nn.Module, out_dir: str | Path, overwrite: bool = False,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `config.json` + weights that transformers' `from_pretrained` loads as the same model.

    Shards with an index above `max_shard_bytes`. LoRA adapters must be merged first. Refuses to
    replace a non-empty `out_dir` unless `overwrite` (the CLI's `--force`); written atomically.
    """
    out_dir = Path(out_dir)
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise CheckpointError("the model has unmerged LoRA adapters; merge them before exporting")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} is not empty; pass --force to overwrite it")
    model.config.to_hf()  # a ConfigError before anything is written
    with atomic_dir(out_dir) as tmp:
        write_hf(tmp, model, max_shard_bytes)
    return out_dir
