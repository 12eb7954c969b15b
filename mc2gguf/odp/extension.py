"""The compiled ODP op (``cpp_ext/``: ``torch.ops.mc2gguf_odp.route``), loaded on first use, never at import.

Backend selection (once, on the first routing or the first look at ``mc2gguf.odp.BACKEND``): the extension
built at install time (``mc2gguf._odp_C``, only when the package was built with torch importable, e.g. ``pip
install --no-build-isolation``), else a JIT build of ``cpp_ext/`` with ``torch.utils.cpp_extension.load``
into ``$MC2GGUF_CACHE/odp-ext`` (default ``~/.cache/mc2gguf``; once per torch version, ~20-60 s on two
cores), else pure torch. The backend is ``"cuda"`` (compiled op with CPU and CUDA kernels), ``"cpp"``
(compiled op, CPU kernel only: CUDA tensors use the torch reference) or ``"torch"``. The active backend is
logged at INFO on the ``mc2gguf.odp`` logger; a build and a fallback are logged as WARNING (so they reach
stderr even with logging unconfigured). ``MC2GGUF_ODP_BACKEND=torch`` skips the extension, ``=cpp`` makes a
failed load an error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

from ..paths import cache_root

log = logging.getLogger("mc2gguf.odp")

OP_NAME = "mc2gguf_odp::route"
SCORES_OP_NAME = "mc2gguf_odp::route_scores"
#: the CUDA route_scores kernel's per-thread scratch
SCORES_MAX_EXPERTS_CUDA = 512


def _source_dir() -> Path | None:
    package = Path(__file__).resolve().parents[1]
    for cand in (package / "_cpp_ext", package.parent / "cpp_ext"):  # wheel install, then source checkout
        if (cand / "odp.cpp").is_file():
            return cand
    return None


def _op_registered() -> bool:
    try:
        torch.ops.mc2gguf_odp.route  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def build_extension(verbose: bool = False) -> str:
    """JIT-build (or find in the cache) and load ``cpp_ext/``; returns where it was loaded from."""
    from torch.utils import cpp_extension

    src = _source_dir()
    if src is None:
        raise RuntimeError("the ODP C++ sources (cpp_ext/) are not shipped with this install")
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("MC2GGUF_ODP_CUDA", "1") != "0"
    )
    sources = [src / "odp.cpp"] + ([src / "odp_cuda.cu"] if with_cuda else [])
    flavour = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{flavour}".replace("+", "_")
    build_dir = cache_root() / "odp-ext" / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        log.warning("building the ODP C++ extension (%s) into %s: once per torch version", flavour, build_dir)
    cpp_extension.load(
        name="mc2gguf_odp_ext",
        sources=[str(s) for s in sources],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        verbose=verbose,
    )
    return str(build_dir)


def _prebuilt_is_stale() -> bool:
    """An install-time build in a source checkout that the C++ sources have changed since (editable installs)."""
    spec = importlib.util.find_spec("mc2gguf._odp_C")
    src = _source_dir()
    if spec is None or spec.origin is None or src is None:
        return False
    built = os.path.getmtime(spec.origin)
    return any(os.path.getmtime(f) > built for f in src.iterdir() if f.suffix in (".cpp", ".cu", ".h"))


def _load_backend() -> tuple[str, str]:
    choice = os.environ.get("MC2GGUF_ODP_BACKEND", "auto").strip().lower()
    if choice not in ("auto", "cpp", "torch"):
        raise ValueError(f"MC2GGUF_ODP_BACKEND must be auto, cpp or torch, got {choice!r}")
    if choice == "torch":
        return "torch", "MC2GGUF_ODP_BACKEND=torch"
    where = None
    prebuilt_error: str | None = None
    if _op_registered():
        where = "already loaded"
    else:
        try:
            if _prebuilt_is_stale():
                raise ImportError("mc2gguf._odp_C is older than cpp_ext/ (sources edited since the install)")
            importlib.import_module("mc2gguf._odp_C")
            where = "built at install (mc2gguf._odp_C)"
        except (ImportError, OSError) as exc:
            # Its message, not the exception: the traceback would hold this frame, a cycle, and through the
            # frames' callers whatever the first importer had (PMQ imports this module lazily, on its first
            # route, with a whole layer's weights and Hessians) until the next full garbage collection.
            prebuilt_error = str(exc)
        if where is None:
            try:
                where = f"JIT build in {build_extension()}"
            except Exception as exc:  # no compiler, no ninja, no sources, build error
                if choice == "cpp":
                    raise RuntimeError(f"MC2GGUF_ODP_BACKEND=cpp but the ODP extension did not load: {exc}") from exc
                detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                log.warning("ODP: C++ extension unavailable (%s); using the pure-torch reference", detail)
                log.debug("prebuilt extension: %s", prebuilt_error)
                return "torch", f"fallback: {detail}"
    for name, fake in ((OP_NAME, _route_fake), (SCORES_OP_NAME, _route_scores_fake)):
        try:  # the shape function torch.compile / FakeTensor need
            torch.library.register_fake(name)(fake)
        except RuntimeError:  # registered already (module reloaded)
            pass
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")
    return ("cuda" if has_cuda else "cpp"), where


def _route_fake(logits, top_k, mu, protect=None, importance=None, protect_ratio=0.0, renormalize=True):
    T = logits.shape[0]
    return (
        logits.new_empty((T, top_k), dtype=torch.int64),
        logits.new_empty((T, top_k), dtype=torch.float32),
        logits.new_empty((), dtype=torch.int64),
    )


def _route_scores_fake(scores, top_k, mu, bias=None, n_group=1, topk_group=1, protect=None, importance=None,
                       protect_ratio=0.0, renormalize=True):
    return _route_fake(scores, top_k, mu)


@functools.cache
def backend() -> tuple[str, str]:
    """``(backend, detail)``, loading the extension the first time."""
    name, detail = _load_backend()
    log.info("ODP backend: %s (%s)", name, detail)
    return name, detail


def supports(logits: torch.Tensor, top_k: int) -> bool:
    """Whether the compiled op runs this routing (else the torch reference does)."""
    if logits.requires_grad and torch.is_grad_enabled():
        return False  # the op is inference-only
    name = backend()[0]
    if name == "torch":
        return False
    if logits.device.type == "cpu":
        return True
    return logits.device.type == "cuda" and name == "cuda" and int(top_k) <= 32
