"""Model spec -> model: a preset (random init), a microft checkpoint directory, or an HF directory.

Checkpoints are built on the meta device and each parameter is then materialised from its
file, one tensor at a time, straight into the requested device and dtype: the weights never
exist twice. A microft directory holds `model.safetensors` (microft names, unpadded
vocabulary) and `config.json` (`{"format": "microft", "model": {...}}`).
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from microft.errors import CheckpointError
from microft.models.config import PRESETS, ModelConfig
from microft.models.hf import VOCAB_ROWS, HFReader, TensorFiles, hf_name
from microft.models.source import config_of, locate, read_model_config  # noqa: F401  (re-exported)
from microft.models.transformer import Transformer, init_weight_
from microft.weights import CONFIG, WEIGHTS, atomic_dir


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with no storage (parameters on the meta device)."""
    with torch.device("meta"):
        return Transformer(cfg)


def expected_names(cfg: ModelConfig) -> list[str]:
    """The parameter names a checkpoint of this config must hold (microft naming)."""
    return [n for n, _ in meta_model(cfg).named_parameters()]


def materialize(model: nn.Module, has: Callable[[str], bool], read: Callable[[str], torch.Tensor], device,
                dtype: torch.dtype | None, source: str) -> None:
    """Replace every (meta) parameter of `model` by `read(name)`, on `device` in `dtype` (None: the file's).

    Vocabulary matrices may have fewer rows than the model's padded ones: the rest are zero.
    A module with `load_full_weight` (an NF4Linear on meta) takes its `weight` from `read` itself, converting
    it at once, so only one full-precision layer exists at a time. Raises CheckpointError naming the missing
    tensors or the first mismatched shape.
    """
    params = list(model.named_parameters())
    own = [(n, m) for n, m in model.named_modules() if hasattr(m, "load_full_weight")]
    params += [(f"{n}.weight", None) for n, _ in own]
    missing = [n for n, _ in params if not has(n)]
    if missing:
        raise CheckpointError(f"{source} does not match the model: missing {len(missing)} tensor(s), e.g. "
                              f"{', '.join(missing[:3])}")
    for name, module in own:
        t = read(f"{name}.weight")
        module.load_full_weight(t.to(device=device, dtype=dtype or t.dtype), f"{name}.weight")
        del t
    for name, p in params:
        if p is None:
            continue
        t = read(name)
        rows_ok = (name in VOCAB_ROWS and t.dim() == 2 and t.shape[1] == p.shape[1]
                   and t.shape[0] <= p.shape[0])
        if tuple(t.shape) != tuple(p.shape) and not rows_ok:
            raise _shape_error(source, name, t, p)
        dt = dtype or t.dtype
        if t.shape != p.shape:
            new = torch.zeros(p.shape, device=device, dtype=dt)
            new[: t.shape[0]].copy_(t)
        else:
            new = t.to(device=device, dtype=dt).contiguous()
        del t
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        module._parameters[leaf] = nn.Parameter(new, requires_grad=p.requires_grad)


def init_reader(cfg: ModelConfig, model: nn.Module) -> Callable[[str], torch.Tensor]:
    """`read(name)` for `materialize` that draws a preset's random init, tensor by tensor, in the order and
    with the rule of `Transformer.reset_parameters` (so the values equal `Transformer(cfg)`'s for a seed)."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    shapes |= {f"{n}.weight": (m.out_features, m.in_features) for n, m in model.named_modules()
               if hasattr(m, "load_full_weight")}

    def read(name: str) -> torch.Tensor:
        t = torch.empty(shapes[name])
        init_weight_(name, t, cfg.n_layer, cfg.norm_unit_offset)
        if name in VOCAB_ROWS:
            t[cfg.vocab_size:].zero_()
        return t

    return read


def _draw_init(model: Transformer, cfg: ModelConfig, device, dtype: torch.dtype | None, source: str) -> None:
    """A preset's random init drawn tensor by tensor, in `reset_parameters`' order (the same values for a
    seed)."""
    names = [n for n, _ in model.named_parameters()]
    names += [f"{n}.weight" for n, m in model.named_modules() if hasattr(m, "load_full_weight")]
    order = {n: i for i, n in enumerate(n for n, _ in meta_model(cfg).named_parameters())}
    read = init_reader(cfg, model)
    cache: dict[str, torch.Tensor] = {}
    done: set[str] = set()

    def in_init_order(name: str) -> torch.Tensor:  # draw every tensor up to `name` in reset_parameters' order
        while name not in cache:
            nxt = min((n for n in names if n not in cache and n not in done), key=order.__getitem__)
            cache[nxt] = read(nxt)
        done.add(name)
        return cache.pop(name)

    materialize(model, lambda n: True, in_init_order, device, dtype, source)


_M_MMAP_THRESHOLD = -3  # glibc mallopt() parameter
MAP_FROM_BYTES = 1 << 20


def map_large_allocations() -> bool:
    """Linux/glibc: give every allocation over 1 MiB its own mapping, returned to the kernel when freed.

    glibc's default threshold is dynamic: once a mapped block is freed it rises (up to 32 MiB), and
    later allocations of that size come from the heap. Quantizing while loading frees each layer's
    full-precision weight and keeps its much smaller codes, so in the heap the codes end up between the
    holes the weights left and the heap cannot shrink: on a Qwen3-1.7B shape that held 0.5 GiB above
    the NF4 model plus one layer (docs/benchmarks.md). A fixed threshold keeps the two apart.
    Process-wide (training on a CPU replaces it with `train.loop.keep_freed_memory`); returns whether it
    took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MAP_FROM_BYTES))
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        return False


def load_model(spec: str | Path, device: str | torch.device = "cpu", dropout: float | None = None,
               dtype: torch.dtype | None = torch.float32,
               prepare: Callable[[Transformer], Any] | None = None) -> Transformer:
    """Build a model from a preset (random init), a microft checkpoint, or an HF directory.

    Checkpoint weights land in `dtype` (None: as stored) on `device`, one tensor at a time.
    `prepare(meta_model)` may swap modules before any weight is read (quant.nf4_meta_blocks_: the block
    linears become NF4 and are quantized as they are read; a preset's init is then drawn tensor by tensor).
    """
    spec = str(spec)
    d, raw = (None, {}) if spec in PRESETS else locate(spec)
    cfg = ModelConfig.from_preset(spec) if d is None else config_of(d, raw)
    if dropout is not None:
        cfg = cfg.model_copy(update={"dropout": dropout})
    # built on the meta device, then filled one tensor at a time: a preset's init is the same values for a
    # seed in every dtype, and a bf16 model never holds an fp32 copy of itself on the way
    model = meta_model(cfg)
    if prepare is not None:
        prepare(model)
        map_large_allocations()  # weights are read and dropped layer by layer: keep the heap from fragmenting
    if d is None:
        _draw_init(model, cfg, device, dtype, spec)
        return model
    if raw.get("format") == "microft":
        wpath = d / WEIGHTS
        if not wpath.exists():
            raise CheckpointError(f"weights file missing: {wpath}")
        with TensorFiles(d) as files:
            keys = set(files.keys())
            wanted = set(dict(model.named_parameters()))
            wanted |= {f"{n}.weight" for n, m in model.named_modules() if hasattr(m, "load_full_weight")}
            unexpected = sorted(keys - wanted)
            if unexpected:
                raise CheckpointError(f"{d} does not match the model: unexpected {unexpected[:3]}")
            materialize(model, keys.__contains__, files.get, device, dtype, str(d))
    else:
        with TensorFiles(d) as files:
            if hf_name(cfg, "wte.weight") not in files.keys() and "wte.weight" not in files.keys():
                raise CheckpointError(f"{files.source} is not a {cfg.model_type} checkpoint (no "
                                      f"{hf_name(cfg, 'wte.weight')} among {len(files.keys())} tensors)")
            read = HFReader(cfg, files)
            materialize(model, read.has, read, device, dtype, str(d))
    return model


def load_hf_state(directory: str | Path, cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Every weight of an HF directory in microft naming (nn.Linear layout, unpadded vocab), in memory.

    For inspection and tests; `load.load_model` materialises a model without this second copy.
    """
    directory = Path(directory)
    cfg = cfg or read_model_config(directory)
    with TensorFiles(directory) as files:
        read = HFReader(cfg, files)
        state = {name: read(name).contiguous() for name in expected_names(cfg) if read.has(name)}
        if "wte.weight" not in state:
            raise CheckpointError(f"{files.source} is not a {cfg.model_type} checkpoint "
                                  f"(no {hf_name(cfg, 'wte.weight')} among {len(files.keys())} tensors)")
    return state


def _shape_error(source: object, name: str, got: torch.Tensor, want: torch.Tensor) -> CheckpointError:
    """The one line for a checkpoint tensor whose shape is not the model's."""
    return CheckpointError(f"{source}: {name} has shape {tuple(got.shape)}, model expects "
                           f"{tuple(want.shape)}")


def model_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Weights in microft naming with the vocabulary unpadded, contiguous, on CPU (LoRA adapters left out).

    `state`: the model's full state dict when gathered elsewhere (FSDP shards, see distributed.py).
    """
    vocab = model.config.vocab_size
    out = {}
    for k, v in (model.state_dict() if state is None else state).items():
        if "lora_" in k:
            continue
        if k in VOCAB_ROWS:
            v = v[:vocab]
        out[k] = v.detach().to("cpu").contiguous()
    return out


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy unpadded microft-named weights into an allocated `model`, checking names and shapes."""
    params = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        what = ((f"missing {missing[:3]}" if missing else "")
                + (f" unexpected {unexpected[:3]}" if unexpected else ""))
        raise CheckpointError(f"{source} does not match the model: {what.strip()}")
    with torch.no_grad():
        for k, dst in params.items():
            src = state[k]
            if k in VOCAB_ROWS:
                if src.shape[1] != dst.shape[1] or src.shape[0] > dst.shape[0]:
                    raise _shape_error(source, k, src, dst)
                dst[: src.shape[0]].copy_(src)
                dst[src.shape[0] :].zero_()
            elif src.shape != dst.shape:
                raise _shape_error(source, k, src, dst)
            else:
                dst.copy_(src)


def save_model(directory: str | Path, model: Transformer, extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` atomically into `directory`."""
    with atomic_dir(directory) as tmp:
        write_model_files(tmp, model, extra)
    return Path(directory)


def write_model_files(directory: Path, model: Transformer, extra: dict[str, Any] | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the weights (`state`: a gathered full state dict) and config into an existing directory."""
    save_file(model_state_dict(model, state), str(directory / WEIGHTS), metadata={"format": "microft"})
    cfg = {"format": "microft", "model": model.config.model_dump(), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(cfg, indent=2))
