"""Exports for other runtimes: `gguf` (llama.cpp, Ollama, LM Studio). The transformers export is models/hf.py."""
