"""Per-expert types in one layer (``docs/gguf-layout.md``): a layer's experts of each projection are stored as
*type groups*, one 3D tensor ``blk.L.ffn_P_exps.G.weight`` per distinct type, and the map expert -> group in
``mc2gguf.blk.L.ffn_P_exps.groups``. Groups are numbered in order of their first expert; within a group the
experts keep their order. A projection whose experts share one type stays the stock tensor."""

from __future__ import annotations

from collections.abc import Sequence

# The names of the group tensors and maps are declared with the other keys (keys.py).


def group_map(type_names: Sequence[str]) -> list[int]:
    """Expert -> group index for the experts' type names, groups numbered in order of their first expert."""
    order: list[str] = []
    for t in type_names:
        if t not in order:
            order.append(t)
    return [order.index(t) for t in type_names]


def group_members(groups: Sequence[int]) -> list[list[int]]:
    """The experts of each group, in order."""
    return [[e for e, g in enumerate(groups) if g == group] for group in range(max(groups) + 1)]
