"""Online dynamic pruning (ODP) of MoE routing, after MC-MoE (Huang et al., ICLR 2025).

Per token the router's top-k experts are kept unless the token is unprotected and an expert's weight is
small next to the top one's, in which case that expert is dropped (really not computed) and the
survivors' weights are renormalised. The exact rule, including ties and edge cases, is in ``docs/odp.md``;
this package, the compiled op in ``cpp_ext/`` and the llama.cpp patch all follow it.

- ``rule``: :func:`route` (softmax gating: on the compiled op where it is available, else
  :func:`route_reference`, pure torch), :func:`route_sigmoid` (DeepSeek-V3's sigmoid scores with a selection
  bias and groups, :class:`SigmoidGating`; the compiled ``route_scores`` or :func:`route_sigmoid_reference`),
  :func:`protect_mask`, :func:`n_protect`;
- ``importance``: :func:`token_importance`, :func:`attention_received`, :func:`attention_received_from_qk`
  (prefill protection), :func:`decode_protect` and :func:`router_input_norm` (the decode proxy);
- ``thresholds``: :func:`slot_ratios`, :func:`calibrate_mu`, :func:`calibrate_protect_norm`, the one
  definition of the per-layer thresholds; ``params``: :class:`OdpParams`, their file and GGUF form;
- ``extension``: the compiled op, loaded on first use. :data:`BACKEND` (``"cuda"``, ``"cpp"`` or
  ``"torch"``) and :data:`BACKEND_DETAIL` say which runs; reading them loads it.

``python3 -m mc2gguf.odp`` builds (or finds) the extension now and prints the backend.
"""

from __future__ import annotations

from .extension import build_extension
from .importance import (attention_received, attention_received_from_qk, decode_protect, router_input_norm,
                         token_importance)
from .params import OdpParams
from .rule import (SigmoidGating, n_protect, protect_mask, route, route_reference, route_sigmoid,
                   route_sigmoid_reference)
from .thresholds import calibrate_mu, calibrate_protect_norm, slot_ratios

__all__ = [
    "BACKEND", "BACKEND_DETAIL", "route", "route_reference", "route_sigmoid", "route_sigmoid_reference", "SigmoidGating", "n_protect", "protect_mask", "token_importance",
    "attention_received", "attention_received_from_qk", "router_input_norm", "decode_protect", "slot_ratios",
    "calibrate_mu", "calibrate_protect_norm", "OdpParams", "build_extension",
]


def __getattr__(name: str):
    if name in ("BACKEND", "BACKEND_DETAIL"):  # loads the extension: only when asked
        from .extension import backend

        return backend()[0 if name == "BACKEND" else 1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
