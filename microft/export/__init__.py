"""Exports for other runtimes: `gguf` (llama.cpp, Ollama, LM Studio); transformers' is models/hf.py."""
