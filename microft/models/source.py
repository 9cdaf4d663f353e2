"""Where a `--model` spec points: a preset, a local directory, or a hub repo id in the local HF cache.

Offline only: a repo id resolves to the snapshot `microft download` (or transformers) left in the
shared Hugging Face cache; nothing here touches the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from microft.errors import CheckpointError, ConfigError, one_line
from microft.models.config import PRESETS, ModelConfig
from microft.weights import CONFIG, read_json

CONFIG_SOURCE = "__microft_source__"  # the key `locate` adds: which file a config dict came from
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def hub_cache_dir() -> Path:
    """The shared cache: $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub,
    else ~/.cache/huggingface/hub (huggingface_hub's own order, read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def is_repo_id(spec: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return bool(REPO_ID_RE.match(spec)) and not Path(spec).exists()


def repo_dir(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def resolve_model_dir(spec: str, revision: str = "main", cache_dir: str | Path | None = None) -> Path | None:
    """The cached snapshot directory of a repo id such as `Qwen/Qwen3-0.6B`, found offline.

    None when `spec` is not a repo id (a preset, a local path). Raises ConfigError when the repo
    is not in the cache, so the caller can say which command fetches it.
    """
    if not is_repo_id(spec):
        return None
    root = repo_dir(spec, cache_dir)
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    ref = root / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snap = root / "snapshots" / commit if commit else None
    if snap is None or not (snap / "config.json").is_file():
        where = Path(cache_dir or hub_cache_dir())
        raise ConfigError(f"{spec}: no such directory, and not in the local Hugging Face cache ({where}); "
                          f"run `microft download {spec}`")
    return snap


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a preset name, a microft checkpoint, an HF directory, a bare config.json, or a
    cached hub repo id. Reads JSON only (no torch): the memory estimator calls it too."""
    spec = str(path)
    if spec in PRESETS:
        return ModelConfig.from_preset(spec)
    return config_of(*locate(spec))


def locate(spec: str) -> tuple[Path, dict[str, Any]]:
    """(directory, parsed config.json) of a model that is not a preset: a path or a cached hub repo id.
    The dict remembers the file it was read from (`CONFIG_SOURCE`) for error messages."""
    p = resolve_model_dir(spec) or Path(spec).expanduser()  # a hub repo id: its cached snapshot
    cfg_path = p / CONFIG if p.is_dir() else p
    if not cfg_path.exists() and (p / "adapter_config.json").is_file():  # lora.ADAPTER_CONFIG
        raise CheckpointError(f"{spec} holds LoRA adapters, not a whole model: use the base model they were "
                              f"trained on, or fold them in first (microft merge)")
    if not cfg_path.exists():
        raise CheckpointError(f"model not found: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                              "checkpoint")
    raw = read_json(cfg_path, CONFIG)
    return cfg_path.parent, {**raw, CONFIG_SOURCE: str(cfg_path)} if isinstance(raw, dict) else raw


def config_of(directory: Path, raw: dict[str, Any], name: str | None = None) -> ModelConfig:
    """The ModelConfig a parsed config.json describes (microft's own layout or an HF model_type); an HF
    config is named `name`, else after its directory."""
    raw = dict(raw)
    where = raw.pop(CONFIG_SOURCE, str(directory / CONFIG))
    if raw.get("format") == "microft":
        try:
            return ModelConfig(**raw["model"])
        except Exception as e:
            raise CheckpointError(f"{where}: invalid microft config: {one_line(e)}") from None
    return ModelConfig.from_hf(raw, name=name or directory.name, where=where)
