"""Exports for other runtimes: `gguf` (llama.cpp, Ollama, LM Studio); transformers' is models/hf.py."""

from microft.errors import ConfigError

HINT = "GGUF export needs the gguf package: pip install 'microft[gguf]'"


def require_gguf():
    """The `gguf` package, or a one-line ConfigError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(HINT) from None
    return gguf
