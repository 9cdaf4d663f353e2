"""Hugging Face GPT-2 checkpoints: read their key layouts into microft naming, and export back.

HF GPT-2 stores the attention and MLP projections as `Conv1D` with weight (in, out); microft
uses `nn.Linear` with weight (out, in), so those four matrices are transposed both ways.
Hub checkpoints come in two key layouts: `transformer.h.0...` (what `save_pretrained` writes)
and bare `h.0...` (the original `openai-community/gpt2` upload, with `attn.bias` mask buffers).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from microft.errors import CheckpointError, one_line
from microft.model import GPT
from microft.weights import CONFIG, atomic_dir, model_state_dict, read_safetensors

SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
PREFIX = "transformer."
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older checkpoints saved


def _read_raw(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The checkpoint's tensors as stored, preferring safetensors over a pickled .bin."""
    st, pt = directory / SAFETENSORS, directory / PYTORCH_BIN
    if st.exists():
        return read_safetensors(st), st
    if pt.exists():
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which runs pickled code
            raise CheckpointError(f"corrupt weights file {pt}: not a plain PyTorch state dict of tensors") from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"corrupt weights file {pt}: {one_line(e)}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{pt} does not hold a state dict")
        return state, pt
    if (directory / f"{SAFETENSORS}.index.json").exists() or (directory / f"{PYTORCH_BIN}.index.json").exists():
        raise CheckpointError(f"{directory}: sharded checkpoints are not supported; GPT-2 fits in one file")
    raise CheckpointError(f"no weights in {directory}: expected {SAFETENSORS} or {PYTORCH_BIN}")


def load_hf_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """Weights of an HF GPT-2 directory in microft naming (nn.Linear layout, unpadded vocab)."""
    directory = Path(directory)
    raw, source = _read_raw(directory)
    state: dict[str, torch.Tensor] = {}
    lm_head = None
    for key, value in raw.items():
        if key == "lm_head.weight":
            lm_head = value
            continue
        name = key.removeprefix(PREFIX)
        if name.endswith(BUFFERS):
            continue
        if any(name.endswith(c) for c in CONV1D):
            if value.dim() != 2:
                raise CheckpointError(f"{source}: {key} should be a matrix, has shape {tuple(value.shape)}")
            value = value.t()
        state[name] = value.contiguous()
    if "wte.weight" not in state:
        raise CheckpointError(f"{source} is not a GPT-2 checkpoint (no wte.weight among {len(raw)} tensors)")
    if lm_head is not None and (lm_head.shape != state["wte.weight"].shape or not torch.equal(lm_head, state["wte.weight"])):
        raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; untied LM heads are unsupported")
    return state


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """`model`'s weights as `GPT2LMHeadModel.save_pretrained` names them (tied head left out)."""
    out = {}
    for name, value in model_state_dict(model).items():
        if any(name.endswith(c) for c in CONV1D):
            value = value.t()
        out[PREFIX + name] = value.contiguous()
    return out


def export_hf(model: GPT, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `config.json` + `model.safetensors` that `GPT2LMHeadModel.from_pretrained` loads.

    LoRA adapters must be merged first. Refuses to replace a non-empty `out_dir` unless
    `overwrite` (the CLI's `--force`); the directory is written atomically.
    """
    out_dir = Path(out_dir)
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise CheckpointError("the model has unmerged LoRA adapters; merge them before exporting")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} is not empty; pass --force to overwrite it")
    state = hf_state_dict(model)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
    return out_dir
