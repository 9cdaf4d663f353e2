"""LoRA: low-rank adapters on the block linears, merging, and PEFT-compatible adapter files.

A targeted `nn.Linear` is replaced by a `LoRALinear`, which *is* an `nn.Linear` holding the
same weight and bias Parameters (nothing copied) plus two child modules, `lora_A` (in -> r)
and `lora_B` (r -> out), and a `lora_dropout`:

    y = x @ W.T + b + dropout(x) @ A.T @ B.T * (alpha / r)

The model sees adapted linears by type (an exact `nn.Linear` keeps its fused paths). Base
weights keep their state-dict keys (`h.0.attn.c_attn.weight`) and every adapter key contains
`lora_`, which is how `model_state_dict` tells them apart. A is kaiming-uniform(a=sqrt(5)) and
B is zero, so a fresh adapter changes nothing. `merge_lora` folds B @ A into W and puts a
plain `nn.Linear` (the same Parameters) back.

Phi-3 stores q/k/v and gate/up as fused HF tensors (`qkv_proj`, `gate_up_proj`) that microft splits on load:
the adapters on its parts are written as one PEFT adapter on the fused module, concatenated. Its lora_A stacks
the parts' A matrices (rank: the parts' ranks summed) and its lora_B is block-diagonal (part i's B in part i's
rows and columns, zero elsewhere), so B @ A is the parts' updates stacked, exactly; `rank_pattern` and
`alpha_pattern` give that module its rank and an alpha keeping alpha / r. Loading such an adapter gives each
part the whole A and its rows of B.

Target names: GPT-2's `qkv, proj, fc, mlp_proj`; the other families PEFT's `q_proj ... down_proj`
(GPT-2's names work there too, as groups); `attn`, `mlp`, `all` for every family.
Adapter directories follow PEFT's layout (`adapter_model.safetensors` + `adapter_config.json`,
keys `base_model.model.<HF module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained`
loads them on the transformers model. HF GPT-2's Conv1D stores weights (in, out) but lora_A /
lora_B are ordinary linears in PEFT too, so adapter tensors need no transpose.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from microft.errors import CheckpointError, ConfigError
from microft.models.config import lora_target_table, parse_lora_targets
from microft.models.families import family
from microft.models.hf import fused_part, hf_name
from microft.models.linear import linear, run_linear
from microft.models.precision import autocasting
from microft.models.quant import NF4Linear, dequantize_model_
from microft.models.transformer import Transformer
from microft.weights import atomic_dir, read_json, read_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

# PEFT matches a list entry against a module name's dotted suffix, so a bare "c_proj" would
# also catch mlp.c_proj; the qualified names keep a saved GPT-2 adapter exactly as trained.
# The other families' target names are unique: PEFT's bare names.


def parse_targets(spec: str | list[str], model_type: str = "gpt2") -> list[str]:
    """Target names of `model_type` for a spec like "qkv,proj", "attn", "q_proj,v_proj" or "all"."""
    return parse_lora_targets(spec, model_type)


class LoRALinear(nn.Linear):
    """An `nn.Linear` (the base weight and bias, shared, not copied) plus a rank-r update B @ A × alpha / r.

    `adapters_off` (see `adapters_disabled`) makes it the base linear alone: preference tuning's reference.
    """

    adapters_off = False

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's Parameters are reused as they are
        self.in_features, self.out_features = base.in_features, base.out_features
        # QLoRA: the NF4 base computes itself; only its shape/dtype/device are read
        if isinstance(base, NF4Linear):
            self.base_layer = base
        else:
            self.weight = base.weight
            self.bias = base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, **kw)  # weight (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_alpha = float(alpha)
        self.lora_scale = float(alpha) / r

    @property
    def r(self) -> int:
        return self.lora_A.out_features

    def __getattr__(self, name: str):
        if name in ("weight", "bias") and "base_layer" in self._modules:
            return getattr(self._modules["base_layer"], name)
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._modules.get("base_layer")
        out = base(x) if base is not None else linear(x, self.weight, self.bias)
        if self.adapters_off:
            return out
        a = self.lora_A.weight
        if x.dtype != a.dtype and not autocasting(x.device.type):  # autocast casts both operands itself
            x = x.to(a.dtype)
        # bf16 via fp32 where emulated
        delta = run_linear(self.lora_B, run_linear(self.lora_A, self.lora_dropout(x)))
        return out + (delta * self.lora_scale).to(out.dtype)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """Fold B @ A × scale into the weight in place; return a plain nn.Linear sharing its Parameters."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.lora_scale  # (out, in)
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        # NF4: dequantize (fp32), fold, store in the weight's original dtype
        if "base_layer" in self._modules:
            w = self.weight
            plain.weight = nn.Parameter((w.dequantize(torch.float32) + delta).to(w.dtype),
                                        requires_grad=False)
            plain.bias = self.bias
            return plain
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        plain.weight, plain.bias = self.weight, self.bias
        return plain


def _block_linears(model: Transformer) -> list[tuple[str, str, str]]:
    """(target, block submodule, linear name) of every target name this family has."""
    targets, _ = lora_target_table(model.config.model_type)
    return [(t, parent, name) for t, (parent, name) in targets.items()]


def _target_linears(model: Transformer, targets: list[str]) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(microft path, parent module, attribute, linear) for every targeted linear, layer by layer."""
    table, _ = lora_target_table(model.config.model_type)
    out = []
    for i, block in enumerate(model.h):
        for t in targets:
            parent, name = table[t]
            mod = getattr(block, parent)
            out.append((f"h.{i}.{parent}.{name}", mod, name, getattr(mod, name)))
    return out


def lora_modules(model: Transformer) -> list[tuple[str, LoRALinear]]:
    """(microft path, module) of every block linear that currently carries an adapter."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model: Transformer) -> Iterator[Transformer]:
    """`model` computing as its frozen base (every adapter skipped) inside the block: the reference policy of
    DPO/IPO with LoRA, with no second copy of the model in memory."""
    mods = [m for _, m in lora_modules(model)]
    for m in mods:
        m.adapters_off = True
    try:
        yield model
    finally:
        for m in mods:
            m.adapters_off = False


@torch.no_grad()
def reset_lora_parameters(model: Transformer) -> None:
    """A <- kaiming-uniform(a=sqrt(5)) (as PEFT and nn.Linear do), B <- 0. Needed after `to_empty`."""
    for _, m in lora_modules(model):
        m.reset_lora_parameters()


def apply_lora(
    model: Transformer,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: str | list[str] = "qkv,proj",
    *,
    dtype: torch.dtype | None = None,
    ranks: dict[str, tuple[int, float]] | None = None,
) -> int:
    """Freeze every base parameter and add rank-`r` adapters to the targeted linears of every block.

    Adapters live on the base weight's device, in its dtype unless `dtype` is given (e.g.
    fp32 adapters on a bf16 model). `ranks` (target -> (r, alpha)) overrides r and alpha per target (an
    adapter file's rank_pattern). Returns the number of adapter (trainable) parameters.
    """
    names = parse_targets(targets, model.config.model_type)
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
    for path, parent, attr, lin in _target_linears(model, names):
        r_t, alpha_t = (ranks or {}).get(_site_target(model, path), (r, alpha))
        lora = LoRALinear(lin, r_t, alpha_t, dropout, dtype)
        setattr(parent, attr, lora)
        count += lora.lora_A.weight.numel() + lora.lora_B.weight.numel()
    reset_lora_parameters(model)
    return count


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold B @ A × scale into each base weight and remove the adapters; returns `model`.

    NF4 bases are dequantized (adapted or not). The result is a plain model with the normal state dict.
    Gradients stay disabled on the base parameters (as `apply_lora` left them); call
    `model.requires_grad_(True)` to train it fully.
    """
    for path, lin in lora_modules(model):
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, lin.merged())
    dequantize_model_(model)  # QLoRA: linears without adapters become plain too
    return model


def _peft_key(model: Transformer, path: str, which: str) -> str:
    """PEFT's key of an adapter matrix: the HF module path of the linear under `base_model.model.`."""
    return f"{PEFT_PREFIX}{hf_name(model.config, path)}.lora_{which}.weight"


def _fused_adapters(model: Transformer) -> dict[str, list[tuple[int, int, int, LoRALinear]]]:
    """The adapters on parts of fused HF tensors (Phi-3), by the fused module's microft path:
    (first row, rows, all rows, adapted linear) each, in row order."""
    out: dict[str, list[tuple[int, int, int, LoRALinear]]] = {}
    for path, lin in lora_modules(model):
        part = fused_part(model.config, path)
        if part is not None:
            out.setdefault(part[0], []).append((part[1], part[2], part[3], lin))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


@torch.no_grad()
def _fused_pair(parts: list[tuple[int, int, int, LoRALinear]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One PEFT adapter for the parts' adapters: A stacked, B block-diagonal, with the first part's scale
    (the others' B rescaled to it); returns (A, B, scale)."""
    scale = parts[0][3].lora_scale
    a = torch.cat([lin.lora_A.weight.detach().to("cpu") for *_, lin in parts])
    b = torch.zeros(parts[0][2], a.shape[0], dtype=a.dtype)
    col = 0
    for row, rows, _, lin in parts:
        b_part = lin.lora_B.weight.detach().to("cpu") * (lin.lora_scale / scale)
        b[row : row + rows, col : col + lin.r] = b_part
        col += lin.r
    return a, b, scale


def lora_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Adapter weights in PEFT's layout, contiguous, on CPU (lora_A (r, in), lora_B (out, r)); the parts of a
    fused HF tensor as one adapter on it (see the module docstring)."""
    out = {}
    for path, lin in lora_modules(model):
        if fused_part(model.config, path) is None:
            out[_peft_key(model, path, "A")] = lin.lora_A.weight.detach().to("cpu").contiguous()
            out[_peft_key(model, path, "B")] = lin.lora_B.weight.detach().to("cpu").contiguous()
    for path, parts in _fused_adapters(model).items():
        out[_peft_key(model, path, "A")], out[_peft_key(model, path, "B")], _ = _fused_pair(parts)
    return out


def _rank_patterns(model: Transformer, r: int, alpha: float) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT's rank_pattern / alpha_pattern for the modules whose rank or alpha differ from (r, alpha): a
    fused module's summed rank, and adapters loaded with their own ranks. Keyed by the HF module name's last
    part (PEFT matches a pattern against the module name's dotted suffix)."""
    modules: dict[str, tuple[int, float]] = {}
    for path, lin in lora_modules(model):
        if fused_part(model.config, path) is None:
            modules[hf_name(model.config, path).rsplit(".", 1)[-1]] = (lin.r, lin.lora_alpha)
    for path, parts in _fused_adapters(model).items():
        rank = sum(lin.r for *_, lin in parts)
        modules[hf_name(model.config, path).rsplit(".", 1)[-1]] = (rank, parts[0][3].lora_scale * rank)
    ranks = {k: rk for k, (rk, _) in modules.items() if rk != r}
    alphas = {k: a for k, (_, a) in modules.items() if a != alpha}
    return ranks, alphas


def lora_settings(model: Transformer) -> dict[str, Any]:
    """{"r", "lora_alpha", "lora_dropout", "targets"} of the adapters on `model`."""
    mods = lora_modules(model)
    if not mods:
        raise ConfigError("the model has no LoRA adapters")
    lin = mods[0][1]
    drop = lin.lora_dropout.p if isinstance(lin.lora_dropout, nn.Dropout) else 0.0
    paths = {p.split(".", 2)[2] for p, _ in mods}  # "attn.c_attn", ...
    targets = [t for t, parent, name in _block_linears(model) if f"{parent}.{name}" in paths]
    return {
        "r": lin.lora_A.out_features,
        "lora_alpha": lin.lora_alpha,
        "lora_dropout": drop,
        "targets": targets,
    }


def adapter_config(model: Transformer, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The PEFT `adapter_config.json` describing the adapters on `model`."""
    s = lora_settings(model)
    fam = family(model.config.model_type)
    peft = fam.peft_names or {}
    ranks, alphas = _rank_patterns(model, s["r"], s["lora_alpha"])
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": s["r"],
        "lora_alpha": s["lora_alpha"],
        "lora_dropout": s["lora_dropout"],
        "target_modules": list(dict.fromkeys(peft.get(t, t) for t in s["targets"])),
        "fan_in_fan_out": bool(fam.transposed),  # HF GPT-2 uses Conv1D, weight (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
    }


def write_adapter_files(directory: Path, model: Transformer,
                        base_model_name_or_path: str | None = None) -> None:
    """Write the adapter files into an existing directory (a checkpoint being assembled)."""
    cfg = adapter_config(model, base_model_name_or_path)
    save_file(lora_state_dict(model), str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (Path(directory) / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))


def save_adapter(directory: str | Path, model: Transformer,
                 base_model_name_or_path: str | None = None) -> Path:
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
    cfg = read_json(p)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{p}: only LoRA adapters are supported (peft_type={cfg.get('peft_type')!r})")
    return cfg


def _targets_from_config(model: Transformer, cfg: dict[str, Any], source: Path) -> list[str]:
    """Apply PEFT's matching rule (regex fullmatch, exact name or dotted suffix) to block linears."""
    spec = cfg.get("target_modules")
    if not spec:
        raise CheckpointError(f"{source}: adapter config has no target_modules")
    found = []
    for t, parent, name in _block_linears(model):
        key = hf_name(model.config, f"h.0.{parent}.{name}")
        if isinstance(spec, str):
            hit = re.fullmatch(spec, key) is not None
        else:
            hit = key in spec or any(key.endswith(f".{s}") for s in spec)
        if hit:
            found.append(t)
    if not found:
        raise CheckpointError(f"{source}: target_modules {spec!r} name no {model.config.model_type} "
                              "block linear")
    return found


def _check_supported(cfg: dict[str, Any], source: Path) -> None:
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "use_rslora": bool(cfg.get("use_rslora")),
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(
            f"{source}: adapter uses LoRA options microft does not support: {', '.join(bad)}"
        )


def _site_target(model: Transformer, path: str) -> str:
    """The target name of an adapted linear's path (`h.3.attn.q_proj` -> `q_proj`)."""
    table, _ = lora_target_table(model.config.model_type)
    site = tuple(path.split(".")[2:])
    return next(t for t, s in table.items() if s == site)


def _ranks_from_config(model: Transformer, cfg: dict[str, Any], targets: list[str], r: int, alpha: float,
                       source: Path) -> dict[str, tuple[int, float]]:
    """(r, alpha) of each target: the config's r / lora_alpha, or its rank_pattern / alpha_pattern entry that
    matches the target's HF module (PEFT's rule: the pattern matches the name's dotted suffix). A pattern
    giving one target different ranks in different layers is refused."""
    patterns = {"rank": cfg.get("rank_pattern") or {}, "alpha": cfg.get("alpha_pattern") or {}}

    def lookup(kind: str, key: str, default: float) -> float:
        for pat, value in patterns[kind].items():
            if re.match(rf"(.*\.)?({pat})$", key):
                return value
        return default

    out: dict[str, tuple[int, float]] = {}
    for path, _, _, _ in _target_linears(model, targets):
        key = hf_name(model.config, path)
        got = (int(lookup("rank", key, r)), float(lookup("alpha", key, alpha)))
        t = _site_target(model, path)
        if out.setdefault(t, got) != got:
            raise CheckpointError(f"{source}: rank_pattern / alpha_pattern give {t} different ranks in "
                                  "different layers, which microft does not support")
    return out


def load_adapter(model: Transformer, directory: str | Path) -> Transformer:
    """Add the adapters described by `directory` to `model` and load their weights; returns `model`.

    Everything is checked (config, key names, shapes) before the model is touched, so a
    CheckpointError leaves `model` as it was.
    """
    d = Path(directory)
    cfg = read_adapter_config(d)
    _check_supported(cfg, d)
    targets = _targets_from_config(model, cfg, d)
    try:
        r, alpha, dropout = int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: invalid r / lora_alpha: {e}") from None
    ranks = _ranks_from_config(model, cfg, targets, r, alpha, d)
    state = read_safetensors(d / ADAPTER_WEIGHTS, "adapter")
    if lora_modules(model):
        raise CheckpointError(f"cannot load {d}: the model already has LoRA adapters")

    expected = {}
    for path, _, _, lin in _target_linears(model, targets):
        r_t = ranks[_site_target(model, path)][0]
        part = fused_part(model.config, path)  # a fused HF tensor's part: the whole A, its rows of B
        rows = lin.out_features if part is None else part[3]
        expected[_peft_key(model, path, "A")] = (r_t, lin.in_features)
        expected[_peft_key(model, path, "B")] = (rows, r_t)
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

    apply_lora(model, r, alpha, dropout, targets, ranks=ranks)
    with torch.no_grad():
        for path, lin in lora_modules(model):
            b = state[_peft_key(model, path, "B")]
            part = fused_part(model.config, path)
            lin.lora_A.weight.copy_(state[_peft_key(model, path, "A")])
            lin.lora_B.weight.copy_(b if part is None else b[part[1] : part[1] + part[2]])
    return model
