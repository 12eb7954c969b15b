"""Run the pinned (patched) llama.cpp: its Python bindings and its command-line tools."""

from __future__ import annotations

import functools
import os
import sys
from types import ModuleType

from .llama_build import LlamaBuild, find_llama_build


@functools.cache
def bindings(build: LlamaBuild | None = None) -> ModuleType:
    """The ``llama_cpp`` module of llama-cpp-python 0.3.36, bound to this project's llama.cpp build."""
    build = build or find_llama_build()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build.bin_dir)
    if str(build.python_dir) not in sys.path:
        sys.path.insert(0, str(build.python_dir))
    import llama_cpp

    return llama_cpp
