"""llama.cpp: the pinned, patched build and its cache (``build``), the Python bindings bound to that same
library (``runtime``), and ``mc2gguf chat`` / ``serve`` on top of them (``interactive``)."""
