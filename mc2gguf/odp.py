"""Online dynamic pruning (ODP) of MoE routing, after MC-MoE (Huang et al., ICLR 2025).

Per token the router's top-k experts are kept unless the token is unprotected and an expert's weight is
small next to the top one's, in which case that expert is dropped (really not computed) and the
survivors' weights are renormalised. The exact rule, including ties and edge cases, is in ``docs/odp.md``;
this module, the compiled op in ``cpp_ext/`` and the llama.cpp patch all follow it.

Entry points:

- :func:`route` — the routing decision, on the compiled op ``torch.ops.mc2gguf_odp.route`` where it is
  available, else on :func:`route_reference` (pure torch). :data:`BACKEND` says which runs.
- :func:`token_importance` / :func:`attention_received` / :func:`attention_received_from_qk` — prefill
  protection scores (L1 norm of the router input x mean attention received from the token itself and
  later tokens, averaged over heads).
- :func:`decode_protect` — the decode-time proxy (L1 norm of the router input above a per-layer threshold).
- :func:`top2_ratios`, :func:`calibrate_mu`, :func:`calibrate_protect_norm` — per-layer calibration.

Backend selection (once, at import): the extension built at install time (``mc2gguf._odp_C``, only when
the package was built with torch importable, e.g. ``pip install --no-build-isolation``), else a JIT build
of ``cpp_ext/`` with ``torch.utils.cpp_extension.load`` into ``$MC2GGUF_CACHE/odp-ext`` (default
``~/.cache/mc2gguf``; once per torch version, ~20-60 s on two cores), else pure torch. ``BACKEND`` is
``"cuda"`` (compiled op with CPU and CUDA kernels), ``"cpp"`` (compiled op, CPU kernel only: CUDA tensors
use the torch reference) or ``"torch"``. The active backend is logged at INFO on the ``mc2gguf.odp``
logger; a build and a fallback are logged as WARNING (so they reach stderr even with logging
unconfigured). ``MC2GGUF_ODP_BACKEND=torch`` skips the extension, ``=cpp`` makes a failed load an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OP_NAME = "mc2gguf_odp::route"
#: Slack in ``n_protect``: a product ``ratio * T`` that is an integer up to rounding does not round up.
PROTECT_EPS = 1e-6
#: Rows of an attention map handled at once by :func:`attention_received` (bounds its temporaries).
_CHUNK_ELEMENTS = 1 << 24

__all__ = [
    "BACKEND", "BACKEND_DETAIL", "route", "route_reference", "n_protect", "protect_mask", "token_importance",
    "attention_received", "attention_received_from_qk", "router_input_norm", "decode_protect", "top2_ratios",
    "calibrate_mu", "calibrate_protect_norm", "build_extension",
]


# --------------------------------------------------------------------------------------------------------
# The routing rule


def n_protect(ratio: float, n_tokens: int) -> int:
    """How many tokens ``protect_ratio`` protects: ``ceil(ratio * T - 1e-6)`` clamped to ``[0, T]``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"protect_ratio must be in [0, 1], got {ratio}")
    n = math.ceil(float(ratio) * float(n_tokens) - PROTECT_EPS)
    return max(0, min(int(n_tokens), n))


def _threshold(mu: float) -> torch.Tensor:
    """fl32(ln(mu)) as a 0-dim fp32 tensor (the same double->float rounding the C++ op does)."""
    mu = float(mu)
    if not mu >= 0.0:  # also rejects NaN
        raise ValueError(f"mu must be >= 0 (and not NaN), got {mu}")
    return torch.tensor(-math.inf if mu == 0.0 else math.log(mu), dtype=torch.float32)


def _check(logits: torch.Tensor, top_k: int, protect, importance, protect_ratio: float) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    T, E = logits.shape
    if E < 1:
        raise ValueError("need at least one expert")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if not 0.0 <= protect_ratio <= 1.0:
        raise ValueError(f"protect_ratio must be in [0, 1], got {protect_ratio}")
    if protect is not None:
        if protect.dim() != 1 or protect.shape[0] != T:
            raise ValueError(f"protect must be [T={T}], got shape {tuple(protect.shape)}")
        if protect.device != logits.device:
            raise ValueError(f"protect is on {protect.device}, logits on {logits.device}")
    if protect_ratio > 0.0 and importance is None:
        raise ValueError("protect_ratio > 0 needs importance")
    if importance is not None:
        if importance.dim() != 1 or importance.shape[0] != T:
            raise ValueError(f"importance must be [T={T}], got shape {tuple(importance.shape)}")
        if not importance.is_floating_point():
            raise TypeError(f"importance must be floating point, got {importance.dtype}")
        if importance.device != logits.device:
            raise ValueError(f"importance is on {importance.device}, logits on {logits.device}")


def protect_mask(
    n_tokens: int,
    protect: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    protect_ratio: float = 0.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The protected tokens, ``[T]`` bool: ``protect`` OR the ``n_protect(protect_ratio, T)`` most important.

    Importance is ranked in its own dtype, NaN as -inf, ties to the lower token index.
    """
    if protect is not None:
        device = protect.device
    elif importance is not None:
        device = importance.device
    mask = torch.zeros(n_tokens, dtype=torch.bool, device=device) if protect is None else protect.to(torch.bool)
    n = n_protect(protect_ratio, n_tokens)
    if importance is not None and n > 0:
        key = importance.masked_fill(importance.isnan(), -math.inf)
        order = torch.sort(key, dim=0, descending=True, stable=True).indices[:n]
        mask = mask.clone()
        mask[order] = True
    return mask


def route_reference(
    logits: torch.Tensor,
    top_k: int,
    mu: float,
    protect: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    protect_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pure-torch ODP routing (docs/odp.md); the compiled op's specification, and its fallback.

    Returns ``ids`` ``[T, k]`` int64 (``-1`` in pruned slots), ``weights`` ``[T, k]`` float32 (``0`` in pruned
    slots, survivors summing to 1) and ``n_pruned``, the number of ``-1`` slots. Slots are ordered by logit,
    descending, lower expert id first among equal logits. Differentiable through the surviving weights.
    """
    top_k = int(top_k)
    _check(logits, top_k, protect, importance, float(protect_ratio))
    thr = _threshold(mu).to(logits.device)
    T = logits.shape[0]
    x = logits.float()
    # A stable descending sort keeps equal logits in expert-id order: the lower id wins ties.
    vals, ids = torch.sort(x, dim=1, descending=True, stable=True)
    vals, ids = vals[:, :top_k], ids[:, :top_k]
    d = vals - vals[:, :1]
    prot = protect_mask(T, protect, importance, float(protect_ratio), device=logits.device)
    keep = ~(d < thr) | prot[:, None]
    keep[:, 0] = True
    e = torch.where(keep, torch.exp(d), torch.zeros((), dtype=torch.float32, device=logits.device))
    total = e[:, 0]
    for s in range(1, top_k):  # summed in slot order, as the C++/CUDA kernels do
        total = total + e[:, s]
    weights = e / total[:, None]
    ids = torch.where(keep, ids, torch.full((), -1, dtype=ids.dtype, device=ids.device))
    return ids, weights, int((~keep).sum())


def route(
    logits: torch.Tensor,
    top_k: int,
    mu: float,
    protect: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    protect_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ODP routing of ``logits`` ``[T, E]`` (fp32/bf16/fp16/fp64, computed in fp32); see :func:`route_reference`.

    ``mu``: the layer's threshold (0 never prunes). ``protect``: ``[T]`` bool mask of protected tokens;
    ``importance`` ``[T]`` with ``protect_ratio``: also protect the ``n_protect(protect_ratio, T)`` most
    important tokens. Runs the compiled op when :data:`BACKEND` supports the tensor's device, the torch
    reference otherwise (and whenever gradients are wanted: the op is inference-only). For
    ``torch.compile`` call ``torch.ops.mc2gguf_odp.route`` directly: it returns ``n_pruned`` as a 0-dim
    tensor, where this wrapper's ``int`` would break the graph.
    """
    if _op_supports(logits, top_k):
        ids, weights, n = torch.ops.mc2gguf_odp.route(
            logits, int(top_k), float(mu), protect, importance, float(protect_ratio)
        )
        return ids, weights, int(n)
    return route_reference(logits, top_k, mu, protect, importance, protect_ratio)


def _op_supports(logits: torch.Tensor, top_k: int) -> bool:
    if BACKEND == "torch" or (logits.requires_grad and torch.is_grad_enabled()):
        return False
    if logits.device.type == "cpu":
        return True
    return logits.device.type == "cuda" and BACKEND == "cuda" and int(top_k) <= 32


# --------------------------------------------------------------------------------------------------------
# Protection scores


def router_input_norm(router_input: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's router input ``[T, H]`` -> ``[T]`` float32 (accumulated in fp32)."""
    return router_input.float().abs().sum(dim=-1)


def _row_blocks(attn, chunk_rows: int | None) -> tuple[Iterable[torch.Tensor], int | None]:
    """Normalise the accepted attention forms to an iterable of ``[heads, rows, T]`` row blocks."""
    if isinstance(attn, torch.Tensor):
        if attn.dim() == 2:
            attn = attn.unsqueeze(0)
        if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
            raise ValueError(f"attention probabilities must be [heads, T, T] or [T, T], got {tuple(attn.shape)}")
        T = attn.shape[-1]
        rows = chunk_rows or max(1, _CHUNK_ELEMENTS // max(1, attn.shape[0] * T))
        return (attn[:, r:r + rows] for r in range(0, T, rows)), T
    if callable(attn):
        raise TypeError("pass a callable as attention_received(..., n_tokens=T)")
    return attn, None


def attention_received(
    attn: torch.Tensor | Iterable[torch.Tensor] | Callable[[int, int], torch.Tensor],
    *,
    n_tokens: int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean causal attention each token receives, averaged over heads: ``[T]`` float32.

    ``a_j = 1 / (heads * (T - j)) * sum_h sum_{i >= j} A[h, i, j]`` with rows ``i`` the queries: the
    column sums of the causal attention map over the ``T - j`` tokens that may attend to token ``j`` (it
    and every later token). Entries above the diagonal (``i < j``) are ignored even if non-zero.

    ``attn`` is the layer's attention probabilities in one of three forms:

    - a tensor ``[heads, T, T]`` (or ``[T, T]`` for one head), processed in row chunks of about 16M
      elements (``chunk_rows`` overrides) so temporaries stay small;
    - an iterable of consecutive row blocks ``[heads, rows, T]`` (or ``[rows, T]``), starting at row 0 and
      covering all ``T`` rows: the map need never exist whole;
    - a callable ``f(start, stop) -> [heads, stop - start, T]`` with ``n_tokens=T``, called for row chunks.
    """
    if callable(attn) and not isinstance(attn, torch.Tensor):
        if n_tokens is None:
            raise ValueError("a callable attention source needs n_tokens")
        fn = attn
        T = int(n_tokens)
        rows = chunk_rows or 256
        blocks: Iterable[torch.Tensor] = (fn(r, min(T, r + rows)) for r in range(0, T, rows))
    else:
        blocks, T = _row_blocks(attn, chunk_rows)
    colsum: torch.Tensor | None = None
    heads = None
    row = 0
    for block in blocks:
        if block.dim() == 2:
            block = block.unsqueeze(0)
        if block.dim() != 3:
            raise ValueError(f"attention row blocks must be [heads, rows, T], got {tuple(block.shape)}")
        if T is None:
            T = block.shape[-1]
        if block.shape[-1] != T or (heads is not None and block.shape[0] != heads):
            raise ValueError(f"attention row block of shape {tuple(block.shape)} does not fit [heads={heads}, *, T={T}]")
        heads = block.shape[0]
        r = block.shape[1]
        if row + r > T:
            raise ValueError(f"attention row blocks cover more than T={T} rows")
        summed = block.float().sum(dim=0)  # [r, T]: over heads
        summed = torch.tril(summed, diagonal=row)  # keep j <= i for rows i = row .. row + r - 1
        part = summed.sum(dim=0)
        colsum = part if colsum is None else colsum + part
        row += r
    if T is None:
        raise ValueError("empty attention source: pass n_tokens or at least one block")
    if row != T:
        raise ValueError(f"attention row blocks covered {row} of T={T} rows")
    if colsum is None:  # T == 0
        return torch.zeros(0, dtype=torch.float32)
    count = torch.arange(T, 0, -1, device=colsum.device, dtype=torch.float32) * heads  # heads * (T - j)
    return colsum / count


def attention_received_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """:func:`attention_received` from the layer's (post-RoPE) queries and keys, for models whose attention
    kernel (SDPA, flash) never materialises the probabilities.

    ``q`` ``[heads, T, D]``, ``k`` ``[kv_heads, T, D]`` (grouped-query attention: ``heads`` a multiple of
    ``kv_heads``, query head ``h`` reading kv head ``h // (heads // kv_heads)``), ``scale`` default
    ``D ** -0.5``. Plain causal softmax, computed in fp32 ``chunk_rows`` query rows at a time: the full
    ``[heads, T, T]`` map is never held.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[1:] != k.shape[1:] or q.shape[0] % k.shape[0]:
        raise ValueError(f"q [heads, T, D] and k [kv_heads, T, D] do not fit: {tuple(q.shape)}, {tuple(k.shape)}")
    heads, T, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    kf = k.float().repeat_interleave(heads // k.shape[0], dim=0)  # [heads, T, D]
    cols = torch.arange(T, device=q.device)

    def rows(start: int, stop: int) -> torch.Tensor:
        s = torch.matmul(q[:, start:stop].float(), kf.transpose(1, 2)) * scale  # [heads, r, T]
        future = cols[None, :] > torch.arange(start, stop, device=q.device)[:, None]
        return torch.softmax(s.masked_fill(future, -math.inf), dim=-1)

    return attention_received(rows, n_tokens=T, chunk_rows=chunk_rows)


def token_importance(hidden: torch.Tensor, attn) -> torch.Tensor:
    """Per-token importance ``I_j = ||t_j||_1 * a_j`` ``[T]`` float32 (docs/odp.md).

    ``hidden`` ``[T, H]``: the layer's router input (the MoE block's input, after the post-attention norm),
    the same vector the decode proxy takes the norm of. ``attn``: anything :func:`attention_received`
    accepts, or its ``[T]`` result already computed (e.g. by :func:`attention_received_from_qk`).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got {tuple(hidden.shape)}")
    if isinstance(attn, torch.Tensor) and attn.dim() == 1:
        received = attn.float()
    else:
        received = attention_received(attn, n_tokens=hidden.shape[0])
    if received.shape[0] != hidden.shape[0]:
        raise ValueError(f"attention covers {received.shape[0]} tokens, hidden {hidden.shape[0]}")
    return router_input_norm(hidden) * received.to(hidden.device)


def decode_protect(router_input: torch.Tensor, threshold: float) -> torch.Tensor:
    """Decode-time protection proxy: ``||x_t||_1 > threshold`` for router inputs ``[T, H]`` -> ``[T]`` bool."""
    return router_input_norm(router_input) > float(threshold)


# --------------------------------------------------------------------------------------------------------
# Calibration


def top2_ratios(logits: torch.Tensor) -> torch.Tensor:
    """``w_1 / w_0`` of each token's top-2 experts, ``exp(l_1 - l_0)`` in fp32: what :func:`calibrate_mu`
    takes the median of. ``logits`` ``[T, E]`` with ``E >= 2``."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [T, E >= 2], got {tuple(logits.shape)}")
    vals = torch.topk(logits.float(), 2, dim=1).values
    return torch.exp(vals[:, 1] - vals[:, 0])


def _as_1d_float64(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        t = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    else:
        parts = [v.detach().reshape(-1).cpu().double() if isinstance(v, torch.Tensor) else None for v in values]
        if parts and all(p is not None for p in parts):
            t = torch.cat(parts)
        else:
            t = torch.as_tensor(list(values), dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("no calibration values")
    if t.isnan().any():
        raise ValueError("calibration values contain NaN")
    return t


def calibrate_mu(ratios) -> float:
    """A layer's ``mu``: the median of its calibration ``w_1 / w_0`` ratios (mean of the two middle values for
    an even count). ``ratios``: a tensor, a list of tensors (e.g. one per batch) or numbers."""
    t = torch.sort(_as_1d_float64(ratios)).values
    n = t.numel()
    mid = n // 2
    return float(t[mid]) if n % 2 else float((t[mid - 1] + t[mid]) / 2)


def calibrate_protect_norm(norms, ratio: float) -> float:
    """A layer's decode-proxy threshold: the largest norm among the calibration tokens that are *not* in the
    top ``n = n_protect(ratio, N)``, so that exactly ``n`` of them have ``norm > threshold`` (fewer only
    where norms tie at the boundary). ``+inf`` when ``n == 0``, ``-inf`` when ``n == N``."""
    t = torch.sort(_as_1d_float64(norms)).values
    N = t.numel()
    n = n_protect(ratio, N)
    if n == 0:
        return math.inf
    if n == N:
        return -math.inf
    return float(t[N - n - 1])


# --------------------------------------------------------------------------------------------------------
# The compiled op


def _cache_root() -> Path:
    return Path(os.environ.get("MC2GGUF_CACHE", Path.home() / ".cache" / "mc2gguf"))


def _source_dir() -> Path | None:
    here = Path(__file__).resolve().parent
    for cand in (here / "_cpp_ext", here.parent / "cpp_ext"):  # wheel install, then source checkout
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
    build_dir = _cache_root() / "odp-ext" / tag
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
    try:  # the shape function torch.compile / FakeTensor need
        torch.library.register_fake(OP_NAME)(_route_fake)
    except RuntimeError:  # registered already (module reloaded)
        pass
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")
    return ("cuda" if has_cuda else "cpp"), where


def _route_fake(logits, top_k, mu, protect=None, importance=None, protect_ratio=0.0):
    T = logits.shape[0]
    return (
        logits.new_empty((T, top_k), dtype=torch.int64),
        logits.new_empty((T, top_k), dtype=torch.float32),
        logits.new_empty((), dtype=torch.int64),
    )


BACKEND, BACKEND_DETAIL = _load_backend()
log.info("ODP backend: %s (%s)", BACKEND, BACKEND_DETAIL)


if __name__ == "__main__":  # python3 -m mc2gguf.odp: build/load the extension now and say which backend runs
    print(f"ODP backend: {BACKEND} ({BACKEND_DETAIL})")
    sys.exit(0 if BACKEND != "torch" or os.environ.get("MC2GGUF_ODP_BACKEND") == "torch" else 1)
