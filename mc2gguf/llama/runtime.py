"""Run the pinned (patched) llama.cpp: its Python bindings and its command-line tools."""

from __future__ import annotations

import functools
import os
import sys
from types import ModuleType

from .build import LlamaBuild, find_llama_build


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


# --- MoE pruning (patches 0004-0006): the functions the patch series adds to llama.h -----------------------

_MOE_FUNCTIONS = {
    "llama_set_moe_prune": ("c_bool", ["c_void_p", "c_bool"]),
    "llama_get_moe_prune": ("c_bool", ["c_void_p"]),
    "llama_set_moe_protect_ratio": ("c_bool", ["c_void_p", "c_float"]),
    "llama_get_moe_protect_ratio": ("c_float", ["c_void_p"]),
    "llama_get_moe_routed_slots": ("c_int64", ["c_void_p"]),
    "llama_get_moe_pruned_slots": ("c_int64", ["c_void_p"]),
}


@functools.cache
def moe_api(build: LlamaBuild | None = None):
    """libllama with ``argtypes``/``restype`` set for the MoE pruning functions (``llama_set_moe_prune`` ...).

    Raises ``AttributeError`` on a build without the patch series."""
    import ctypes

    lib = bindings(build).llama_cpp._lib
    for name, (res, args) in _MOE_FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.restype = getattr(ctypes, res)
        fn.argtypes = [getattr(ctypes, a) for a in args]
    return lib


@functools.cache
def _ggml_base(build: LlamaBuild | None = None):
    import ctypes

    build = build or find_llama_build()
    bindings(build)
    lib = ctypes.CDLL(str(build.ggml_library))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def eval_tokens(model_path, tokens: list[int], *, prune: bool | None = None, protect_ratio: float | None = None,
                capture: tuple[str, ...] = (), n_threads: int = 2, n_ubatch: int | None = None,
                decode_steps: int = 0, flash_attn: bool = False, all_logits: bool = True, repack: bool = True,
                build: LlamaBuild | None = None) -> dict:
    """Run ``tokens`` through llama.cpp in one batch (all logits, or with ``all_logits=False`` only the last
    token's, as generation does), then ``decode_steps`` more single tokens.

    ``capture`` names graph tensors (without the ``-<layer>`` suffix llama.cpp appends, e.g.
    ``ffn_moe_odp_prune``) whose values are read back with the eval callback: the result's ``tensors`` maps
    ``name-layer`` to the list of arrays, one per graph evaluation (ubatch), each in ggml's shape reversed
    (numpy order). Also returns ``logits`` (float32 ``[n_outputs + decode_steps, n_vocab]``) and the
    pruning counters ``routed``/``pruned`` after the run. Flash attention is off unless asked for (as in
    :func:`llama_logits`: on CPU it rounds Q to F16); ``repack=False`` keeps the weights in their file layout
    (no CPU repacking, llama.cpp's ``--no-repack``)."""
    import ctypes

    import numpy as np

    llama_cpp = bindings(build)
    try:
        lib = moe_api(build)
    except AttributeError:  # a build without the patch series: no switches, no counters
        lib = None
        if prune is not None or protect_ratio is not None:
            raise
    ggml = _ggml_base(build)
    captured: dict[str, list] = {}
    errors: list[str] = []
    prefixes = tuple(f"{name}-" for name in capture)
    dtypes = {0: np.float32, 26: np.int32}  # GGML_TYPE_F32, GGML_TYPE_I32

    def callback(t, ask, _user):
        name = ggml.ggml_get_name(t).decode()
        wanted = name.startswith(prefixes) and name.rsplit("-", 1)[-1].isdigit()
        if ask:
            return wanted
        if wanted:
            try:
                raw = ctypes.cast(t, ctypes.POINTER(ctypes.c_int64))
                ttype = ctypes.cast(t, ctypes.POINTER(ctypes.c_int32))[0]
                ne = [raw[2 + i] for i in range(4)]  # type (4 + 4 padding), buffer pointer, ne[4], nb[4]
                nb = [raw[6 + i] for i in range(4)]
                buf = np.empty(ggml.ggml_nbytes(t), dtype=np.uint8)
                ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
                n_dims = max([2] + [i + 1 for i in range(4) if ne[i] > 1])
                arr = np.ndarray(tuple(reversed(ne[:n_dims])), dtype=dtypes[ttype], buffer=buf,
                                 strides=tuple(reversed(nb[:n_dims])))  # views too
                captured.setdefault(name, []).append(arr.copy())
            except Exception as exc:  # an exception would stop the graph evaluation: record it instead
                errors.append(f"{name}: {exc!r}")
        return True

    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)
    n_tokens = len(tokens)
    n_ctx = max(64, n_tokens + decode_steps + 8)
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_extra_bufts = repack
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    try:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = max(n_tokens, 1)
        cparams.n_ubatch = n_ubatch or max(n_tokens, 1)
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if capture:
            cparams.cb_eval = cb
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        try:
            if prune is not None and not lib.llama_set_moe_prune(ctx, prune):
                raise RuntimeError("llama_set_moe_prune refused")
            if protect_ratio is not None and not lib.llama_set_moe_protect_ratio(ctx, protect_ratio):
                raise RuntimeError(f"llama_set_moe_protect_ratio({protect_ratio}) refused")
            n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
            logits = []

            def decode(chunk: list[int], pos0: int) -> None:
                batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
                try:
                    batch.n_tokens = len(chunk)
                    for i, tok in enumerate(chunk):
                        batch.token[i] = tok
                        batch.pos[i] = pos0 + i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = all_logits or i == len(chunk) - 1
                    if llama_cpp.llama_decode(ctx, batch) != 0:
                        raise RuntimeError("llama_decode failed")
                    n_outputs = len(chunk) if all_logits else 1
                    out = llama_cpp.llama_get_logits(ctx)
                    logits.append(np.ctypeslib.as_array(out, shape=(n_outputs, n_vocab)).copy())
                finally:
                    llama_cpp.llama_batch_free(batch)

            decode(list(tokens), 0)
            if errors:
                raise RuntimeError("could not read back: " + "; ".join(errors))
            for step in range(decode_steps):
                decode([int(logits[-1][-1].argmax())], n_tokens + step)
            return {
                "logits": np.concatenate(logits).astype(np.float32),
                "tensors": captured,
                "routed": int(lib.llama_get_moe_routed_slots(ctx)) if lib else None,
                "pruned": int(lib.llama_get_moe_pruned_slots(ctx)) if lib else None,
                "prune": bool(lib.llama_get_moe_prune(ctx)) if lib else None,
            }
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
