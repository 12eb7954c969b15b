"""Every name mc2gguf reads or writes in a GGUF file, declared once (as gguf-py's ``constants.py`` does).

llama.cpp's own tensor names come from gguf-py's tables; the ``mc2gguf.*`` keys are the project's additions,
specified in ``docs/gguf-layout.md`` and read by the llama.cpp patch series.
"""

from __future__ import annotations

import re

from gguf import TENSOR_NAMES, MODEL_TENSOR

#: ``mc2gguf.version``: 1 = per-expert type groups and ODP thresholds as in docs/gguf-layout.md.
FORMAT_VERSION = 1


class Keys:
    VERSION = "mc2gguf.version"
    ODP_MU = "mc2gguf.odp.mu"
    ODP_PROTECT_NORM = "mc2gguf.odp.protect_norm"
    ODP_PROTECT_RATIO = "mc2gguf.odp.protect_ratio"
    ODP_ROUTER_NORM_QUANTILES = "mc2gguf.odp.router_norm_quantiles"
    ALLOCATION = "mc2gguf.allocation"
    CALIBRATION_SOURCE = "mc2gguf.calibration.source"
    CALIBRATION_N_TOKENS = "mc2gguf.calibration.n_tokens"
    CALIBRATION_SEED = "mc2gguf.calibration.seed"
    #: one hex digest per tensor, in file order (TENSOR_CHECKSUM_ALGORITHM of its bytes): mc2gguf verify
    TENSOR_CHECKSUMS = "mc2gguf.tensor_checksums"


#: the hash of Keys.TENSOR_CHECKSUMS: hashlib.blake2b with this digest size, hex
TENSOR_CHECKSUM_DIGEST_BYTES = 16


def tensor_name(tensor: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """llama.cpp's name of a model tensor, e.g. ``blk.3.attn_q.weight``."""
    base = TENSOR_NAMES[tensor].format(bid=layer) if layer is not None else TENSOR_NAMES[tensor]
    return f"{base}.{suffix}"


#: An expert projection (mc2gguf's short name) -> llama.cpp's stacked expert tensor.
EXPERT_TENSORS = {"gate": MODEL_TENSOR.FFN_GATE_EXP, "up": MODEL_TENSOR.FFN_UP_EXP, "down": MODEL_TENSOR.FFN_DOWN_EXP}
_EXPS = "|".join(TENSOR_NAMES[t].removeprefix("blk.{bid}.") for t in EXPERT_TENSORS.values())
#: ``blk.L.ffn_P_exps.weight`` and its type groups ``blk.L.ffn_P_exps.G.weight``.
_EXPERT_TENSOR = re.compile(rf"blk\.(\d+)\.({_EXPS})(?:\.(\d+))?\.weight")


def expert_tensor_name(layer: int, projection: str) -> str:
    return tensor_name(EXPERT_TENSORS[projection], layer)


def is_expert_tensor(name: str) -> bool:
    """A routed experts' tensor: stacked (``blk.L.ffn_P_exps.weight``) or one of its type groups."""
    return _EXPERT_TENSOR.fullmatch(name) is not None


def expert_tensor_pattern(layer: int) -> str:
    """A regular expression for llama-quantize's ``--tensor-type`` matching one layer's expert tensors."""
    return rf"blk\.{layer}\.({_EXPS})"


def type_groups_key(base: str) -> str:
    """The per-layer group map of ``base`` (``blk.L.ffn_P_exps``): expert -> group index."""
    return f"mc2gguf.{base}.groups"


def type_group_tensor(base: str, group: int) -> str:
    return f"{base}.{group}.weight"


def group_map_base(key: str) -> str | None:
    """``blk.L.ffn_P_exps`` of a group-map key, ``None`` for any other key."""
    if key.startswith("mc2gguf.blk.") and key.endswith(".groups"):
        return key.removeprefix("mc2gguf.").removesuffix(".groups")
    return None
