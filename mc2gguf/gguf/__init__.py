"""GGUF files: the names mc2gguf adds (``keys``), the per-expert type-group layout (``layout``), the streaming
writer, the reader back into PyTorch, llama.cpp's own metadata (``upstream``) and ``mc2gguf inspect``."""
