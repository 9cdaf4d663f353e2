"""microft: fine-tune GPT-2-class models on the memory you have."""

__version__ = "0.1.0"
