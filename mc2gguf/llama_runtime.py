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


def llama_logits(model_path, tokens: list[int], n_threads: int = 2):
    """llama.cpp's logits ``[len(tokens), n_vocab]`` for one sequence (float32 numpy)."""
    import numpy as np

    llama_cpp = bindings()
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=max(64, len(tokens)), n_batch=max(64, len(tokens)),
                          logits_all=True, verbose=False, n_threads=n_threads)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
