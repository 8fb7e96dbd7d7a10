"""slmc: compile small language models from Hugging Face / GGUF to phone runtimes."""

__version__ = "0.1.0"
