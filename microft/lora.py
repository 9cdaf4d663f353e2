"""LoRA: low-rank adapters on the block linears, merging, and PEFT-compatible adapter files.

A targeted `nn.Linear` stays where it is, with its weight and bias under their usual names;
it gains two child modules, `lora_A` (in -> r) and `lora_B` (r -> out), a `lora_dropout`, and
an instance-level `forward` computing

    y = x @ W.T + b + dropout(x) @ A.T @ B.T * (alpha / r)

So the base weights keep their state-dict keys (`h.0.attn.c_attn.weight`) and every adapter
key contains `lora_`, which is how `checkpoint.model_state_dict` tells them apart.
A is kaiming-uniform(a=sqrt(5)) and B is zero, so a fresh adapter changes nothing.

Adapter directories follow PEFT's layout for GPT-2 (`adapter_model.safetensors` +
`adapter_config.json`, keys `base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight`).
HF's Conv1D stores weights (in, out) but lora_A / lora_B are ordinary linears in PEFT too,
so the adapter tensors need no transpose.
"""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from microft.config import LORA_TARGETS as TARGETS
from microft.config import parse_lora_targets as parse_targets
from microft.errors import CheckpointError, ConfigError
from microft.model import GPT, autocasting
from microft.weights import atomic_dir, read_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model.transformer."

# PEFT matches a list entry against a module name's dotted suffix, so a bare "c_proj" would
# also catch mlp.c_proj; the qualified names keep a saved adapter exactly as trained.
PEFT_NAMES: dict[str, str] = {"qkv": "c_attn", "proj": "attn.c_proj", "fc": "c_fc", "mlp_proj": "mlp.c_proj"}


def _target_linears(model: GPT, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """(microft path, module) for every targeted linear, layer by layer."""
    out = []
    for i, block in enumerate(model.h):
        for t in targets:
            parent, name = TARGETS[t]
            out.append((f"h.{i}.{parent}.{name}", getattr(getattr(block, parent), name)))
    return out


def lora_modules(model: GPT) -> list[tuple[str, nn.Linear]]:
    """(microft path, module) of every block linear that currently carries an adapter."""
    return [(p, m) for p, m in _target_linears(model, list(TARGETS)) if hasattr(m, "lora_A")]


def _lora_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Forward of a LoRA-carrying linear (bound to the instance by `apply_lora`)."""
    out = F.linear(x, self.weight, self.bias)
    a = self.lora_A.weight
    if x.dtype != a.dtype and not autocasting(x.device.type):  # autocast casts both operands itself
        x = x.to(a.dtype)
    delta = self.lora_B(self.lora_A(self.lora_dropout(x)))
    return out + (delta * self.lora_scale).to(out.dtype)


@torch.no_grad()
def reset_lora_parameters(model: GPT) -> None:
    """A <- kaiming-uniform(a=sqrt(5)) (as PEFT and nn.Linear do), B <- 0. Needed after `to_empty`."""
    for _, m in lora_modules(model):
        nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(m.lora_B.weight)


def apply_lora(
    model: GPT,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: str | list[str] = "qkv,proj",
    *,
    dtype: torch.dtype | None = None,
) -> int:
    """Freeze every base parameter and add rank-`r` adapters to the targeted linears of every block.

    Adapters live on the base weight's device, in its dtype unless `dtype` is given (e.g.
    fp32 adapters on a bf16 model). Returns the number of adapter (trainable) parameters.
    """
    names = parse_targets(targets)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ConfigError(f"LoRA alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; merge them first")
    model.requires_grad_(False)
    count = 0
    for _, lin in _target_linears(model, names):
        w = lin.weight
        kw = dict(bias=False, device=w.device, dtype=dtype or w.dtype)
        lin.lora_A = nn.Linear(lin.in_features, r, **kw)  # weight (r, in)
        lin.lora_B = nn.Linear(r, lin.out_features, **kw)  # weight (out, r)
        lin.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        lin.lora_alpha = float(alpha)
        lin.lora_scale = float(alpha) / r
        lin.forward = types.MethodType(_lora_forward, lin)
        count += lin.lora_A.weight.numel() + lin.lora_B.weight.numel()
    reset_lora_parameters(model)
    return count


def _strip(lin: nn.Linear) -> None:
    for attr in ("lora_A", "lora_B", "lora_dropout", "lora_alpha", "lora_scale", "forward"):
        delattr(lin, attr)


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold B @ A × scale into each base weight and remove the adapters; returns `model`.

    The result is a plain GPT with the normal state dict. Gradients stay disabled on the base
    parameters (as `apply_lora` left them); call `model.requires_grad_(True)` to train it fully.
    """
    for _, lin in lora_modules(model):
        delta = lin.lora_B.weight.float() @ lin.lora_A.weight.float() * lin.lora_scale  # (out, in)
        lin.weight.copy_((lin.weight.float() + delta).to(lin.weight.dtype))
        _strip(lin)
    return model


def _peft_key(path: str, which: str) -> str:
    return f"{PEFT_PREFIX}{path}.lora_{which}.weight"


def lora_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Adapter weights in PEFT's GPT-2 layout, contiguous, on CPU (lora_A (r, in), lora_B (out, r))."""
    out = {}
    for path, lin in lora_modules(model):
        out[_peft_key(path, "A")] = lin.lora_A.weight.detach().to("cpu").contiguous()
        out[_peft_key(path, "B")] = lin.lora_B.weight.detach().to("cpu").contiguous()
    return out


def lora_settings(model: GPT) -> dict[str, Any]:
    """{"r", "lora_alpha", "lora_dropout", "targets"} of the adapters on `model`."""
    mods = lora_modules(model)
    if not mods:
        raise ConfigError("the model has no LoRA adapters")
    lin = mods[0][1]
    drop = lin.lora_dropout.p if isinstance(lin.lora_dropout, nn.Dropout) else 0.0
    paths = {p.split(".", 2)[2] for p, _ in mods}  # "attn.c_attn", ...
    targets = [t for t, (parent, name) in TARGETS.items() if f"{parent}.{name}" in paths]
    return {
        "r": lin.lora_A.out_features,
        "lora_alpha": lin.lora_alpha,
        "lora_dropout": drop,
        "targets": targets,
    }


def adapter_config(model: GPT, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The PEFT `adapter_config.json` describing the adapters on `model`."""
    s = lora_settings(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": s["r"],
        "lora_alpha": s["lora_alpha"],
        "lora_dropout": s["lora_dropout"],
        "target_modules": [PEFT_NAMES[t] for t in s["targets"]],
        "fan_in_fan_out": True,  # HF GPT-2 uses Conv1D, weight (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
    }


def write_adapter_files(directory: Path, model: GPT, base_model_name_or_path: str | None = None) -> None:
    """Write the adapter files into an existing directory (a checkpoint being assembled)."""
    cfg = adapter_config(model, base_model_name_or_path)
    save_file(lora_state_dict(model), str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (Path(directory) / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))


def save_adapter(directory: str | Path, model: GPT, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` atomically into `directory`."""
    with atomic_dir(directory) as tmp:
        write_adapter_files(tmp, model, base_model_name_or_path)
    return Path(directory)


def is_adapter_dir(path: str | Path) -> bool:
    """True for a directory holding an `adapter_config.json` (microft's or PEFT's)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The parsed `adapter_config.json`; CheckpointError if missing, unreadable or not LoRA."""
    p = Path(directory) / ADAPTER_CONFIG
    if not p.is_file():
        raise CheckpointError(f"{directory} is not an adapter directory (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {p}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{p}: only LoRA adapters are supported (peft_type={cfg.get('peft_type')!r})")
    return cfg


def _targets_from_config(cfg: dict[str, Any], source: Path) -> list[str]:
    """Apply PEFT's matching rule (regex fullmatch, exact name or dotted suffix) to block linears."""
    spec = cfg.get("target_modules")
    if not spec:
        raise CheckpointError(f"{source}: adapter config has no target_modules")
    found = []
    for t, (parent, name) in TARGETS.items():
        key = f"transformer.h.0.{parent}.{name}"
        if isinstance(spec, str):
            hit = re.fullmatch(spec, key) is not None
        else:
            hit = key in spec or any(key.endswith(f".{s}") for s in spec)
        if hit:
            found.append(t)
    if not found:
        raise CheckpointError(f"{source}: target_modules {spec!r} name no GPT-2 block linear")
    return found


def _check_supported(cfg: dict[str, Any], source: Path) -> None:
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "use_rslora": bool(cfg.get("use_rslora")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(
            f"{source}: adapter uses LoRA options microft does not support: {', '.join(bad)}"
        )


def load_adapter(model: GPT, directory: str | Path) -> GPT:
    """Add the adapters described by `directory` to `model` and load their weights; returns `model`.

    Everything is checked (config, key names, shapes) before the model is touched, so a
    CheckpointError leaves `model` as it was.
    """
    d = Path(directory)
    cfg = read_adapter_config(d)
    _check_supported(cfg, d)
    targets = _targets_from_config(cfg, d)
    try:
        r, alpha, dropout = int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: invalid r / lora_alpha: {e}") from None
    wpath = d / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"adapter weights missing: {wpath}")
    state = read_safetensors(wpath, "adapter")
    if lora_modules(model):
        raise CheckpointError(f"cannot load {d}: the model already has LoRA adapters")

    expected = {}
    for path, lin in _target_linears(model, targets):
        expected[_peft_key(path, "A")] = (r, lin.in_features)
        expected[_peft_key(path, "B")] = (lin.out_features, r)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + (
            f" unexpected {unexpected[:3]}" if unexpected else ""
        )
        raise CheckpointError(f"adapter {d} does not match the model: {what.strip()}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"adapter {d}: {k} has shape {tuple(state[k].shape)}, model expects {shape}"
            )

    apply_lora(model, r, alpha, dropout, targets)
    with torch.no_grad():
        for path, lin in lora_modules(model):
            lin.lora_A.weight.copy_(state[_peft_key(path, "A")])
            lin.lora_B.weight.copy_(state[_peft_key(path, "B")])
    return model
