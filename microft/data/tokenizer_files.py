"""A model's tokenizer and its files: where they live (an adapter directory borrows its base's), the
tokenizer a model directory or preset gives, and the files a saved model directory carries so that
`generate` and transformers find it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from microft.errors import ConfigError
from microft.models.artifacts import model_dir

# what a saved model directory carries beside its weights so `generate` and transformers find the tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


# any one of these is a tokenizer transformers can build (tokenizer_config.json alone is not)
TOKENIZER_MODELS = ("tokenizer.json", "vocab.json", "tokenizer.model")


def tokenizer_dir(spec: str | None) -> Path | None:
    """Where the tokenizer of `spec` lives: its own directory, or for an adapter directory without
    tokenizer files, its base model's (`base_model_name_or_path`)."""
    d = model_dir(spec)
    if d is None or any((d / f).is_file() for f in TOKENIZER_FILES[:2] + ("tokenizer.model",)):
        return d
    from microft.models.lora import is_adapter_dir, read_adapter_config
    from microft.weights import CONFIG

    if is_adapter_dir(d) and not (d / CONFIG).exists():
        base = read_adapter_config(d).get("base_model_name_or_path")
        return tokenizer_dir(base) if base else d
    return d


def tokenizer_for(spec: str | None, model_cfg: Any):
    """The model's tokenizer: GPT-2's for a GPT-2 preset, else the tokenizer files of the model's directory.

    A randomly initialised preset of another family has no tokenizer of its own: refused, as is a
    tokenizer with more ids than the model has embeddings.
    """
    from microft.data.tokenizer import gpt2_tokenizer, load_tokenizer

    d = tokenizer_dir(spec)
    family = model_cfg.model_type
    if d is None:
        if family != "gpt2":
            raise ConfigError(f"{spec} is a randomly initialised {family} preset without a tokenizer; point "
                              "--model at a model directory (or a cached hub repo id) that has "
                              "tokenizer.json")
        return gpt2_tokenizer()
    tok = load_tokenizer(d)
    if tok is gpt2_tokenizer() and family != "gpt2":  # a microft checkpoint dir without tokenizer files
        raise ConfigError(f"{d}: no tokenizer.json or tokenizer.model for this {family} model; copy the base "
                          "model's tokenizer files into it")
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"{d}: the tokenizer has {tok.vocab_size} ids but the model only "
                          f"{model_cfg.vocab_size} embeddings; they do not belong together")
    return tok


def copy_tokenizer_files(spec: str | None, directory: str | Path) -> list[str]:
    """Copy the tokenizer files of `spec`'s model directory into `directory`; returns the names copied."""
    import shutil

    src = tokenizer_dir(spec)
    copied = []
    for name in TOKENIZER_FILES if src is not None else ():
        if (src / name).is_file() and not (Path(directory) / name).exists():
            shutil.copyfile(src / name, Path(directory) / name)
            copied.append(name)
    return copied


def write_tokenizer_files(spec: str | None, directory: str | Path, model_cfg: Any) -> str | None:
    """Give a saved model directory the tokenizer of `spec` in files transformers reads: the source's own
    files copied, or, where it has none (a GPT-2 preset, a checkpoint saved before microft wrote them),
    GPT-2's vendored BPE as vocab.json + merges.txt. Returns None, or why the directory has no tokenizer
    (a preset of another family, a source without files) for the caller to say."""
    d = Path(directory)
    copy_tokenizer_files(spec, d)
    if any((d / f).is_file() for f in TOKENIZER_MODELS):
        return None
    from microft.data.tokenizer import gpt2_tokenizer, write_gpt2_tokenizer

    try:
        tok = tokenizer_for(spec, model_cfg)
    except ConfigError as e:
        return str(e)
    if tok is not gpt2_tokenizer():
        return f"{spec}: its tokenizer has no files to copy"
    write_gpt2_tokenizer(d, model_cfg.n_positions)
    return None

