"""mc2gguf: MC-MoE compression of Mixture-of-Experts LLMs, exported to GGUF for llama.cpp."""

__version__ = "0.4.0"
