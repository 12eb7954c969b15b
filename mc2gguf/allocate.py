"""Stage 3: choose the GGUF type of every tensor.

``uniform_plan`` gives every weight matrix the requested type, with llama.cpp's usual exceptions (norms and
the router stay F32, the output projection gets at least Q6_K, as llama-quantize does); a type whose
blocks do not divide a tensor's rows falls back to the nearest type that fits, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pulp

from .archs import Role, TensorSpec
from .errors import Mc2ggufError
from .qtypes import Packer, QuantType, fallback_type, quant_type


@dataclass(frozen=True)
class TensorPlan:
    spec: TensorSpec
    qtype: QuantType

    @property
    def nbytes(self) -> int:
        return math.prod(self.spec.shape[:-1]) * self.qtype.row_bytes(self.spec.row_length)


@dataclass(frozen=True)
class Plan:
    tensors: list[TensorPlan]
    warnings: list[str]


def _wanted_type(spec: TensorSpec, requested: QuantType) -> QuantType:
    if spec.role in (Role.NORM, Role.ROUTER) or len(spec.shape) == 1:
        return quant_type("F32")
    if spec.role is Role.OUTPUT and requested.packer is not Packer.FLOAT:
        q6 = quant_type("Q6_K")
        return requested if requested.bits_per_weight >= q6.bits_per_weight else q6
    if spec.role is Role.EMBEDDING and requested.packer is Packer.CODEBOOK:
        return quant_type("Q4_K")  # no importance data for the embedding rows; llama-quantize does the same
    return requested


def uniform_plan(specs: list[TensorSpec], requested: QuantType) -> Plan:
    tensors, warnings = [], []
    for spec in specs:
        wanted = _wanted_type(spec, requested)
        chosen = fallback_type(wanted, spec.row_length)
        if chosen is not wanted:
            warnings.append(
                f"{spec.name}: row length {spec.row_length} is not a multiple of {wanted.name}'s block size "
                f"{wanted.block_size}; using {chosen.name}"
            )
        tensors.append(TensorPlan(spec, chosen))
    return Plan(tensors, warnings)


# --- PMQ: one type per allocation unit by integer programming ----------------------------------------------


@dataclass(frozen=True)
class AllocationUnit:
    """What gets one type: an expert's projections (all three, or one or two of them)."""

    layer: int
    expert: int
    projections: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (rows, cols) of each projection
    phi: float  # access frequency: share of the layer's top-k selections
    weight: float  # mean routing weight when selected
    eps: dict[str, float]  # measured output error per candidate type name

    @property
    def key(self) -> tuple[int, int, tuple[str, ...]]:
        return self.layer, self.expert, self.projections

    def nbytes(self, qtype: QuantType) -> int:
        return sum(rows * qtype.row_bytes(cols) for rows, cols in self.shapes)

    @property
    def n_weights(self) -> int:
        return sum(rows * cols for rows, cols in self.shapes)

    def fits(self, qtype: QuantType) -> bool:
        return all(qtype.fits(cols) for _, cols in self.shapes)


@dataclass(frozen=True)
class Objective:
    """Minimise sum over units of phi^alpha * w^beta * eps^gamma (the MC-MoE paper's objective)."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 2.0

    def cost(self, unit: AllocationUnit, type_name: str) -> float:
        return unit.phi**self.alpha * unit.weight**self.beta * unit.eps[type_name] ** self.gamma


@dataclass(frozen=True)
class Allocation:
    types: dict[tuple, QuantType]  # unit key -> type
    expert_bytes: int
    objective: float


def _candidates(unit: AllocationUnit, palette: list[QuantType]) -> list[QuantType]:
    fitting = [t for t in palette if unit.fits(t) and t.name in unit.eps]
    if not fitting:
        raise Mc2ggufError(f"no candidate type fits layer {unit.layer} expert {unit.expert} {unit.projections}")
    return fitting


def reachable_bytes(units: list[AllocationUnit], palette: list[QuantType]) -> tuple[int, int]:
    """The smallest and largest total expert bytes any allocation can have."""
    sizes = [[u.nbytes(t) for t in _candidates(u, palette)] for u in units]
    return sum(min(s) for s in sizes), sum(max(s) for s in sizes)


def solve_allocation(
    units: list[AllocationUnit],
    palette: list[QuantType],
    max_expert_bytes: int,
    objective: Objective = Objective(),
    per_layer: bool = False,
    same_type: list[list[int]] = (),
) -> Allocation:
    """The integer program: one type per unit, minimal objective, total expert bytes <= the budget.

    ``per_layer`` is the paper's variant: every layer gets the budget's share of its weights, and at least
    one unit at the palette's highest and one at its middle type. ``same_type`` lists groups of unit
    indices that must share one type (``--layout stock``: all experts of a layer and projection).
    """
    smallest, largest = reachable_bytes(units, palette)
    if max_expert_bytes < smallest:
        raise Mc2ggufError(
            f"budget infeasible: the experts need at least {smallest:,} bytes (every expert at its smallest "
            f"candidate type) but the budget leaves {max_expert_bytes:,}; the largest reachable is {largest:,}"
        )
    problem = pulp.LpProblem("pmq", pulp.LpMinimize)
    choice = {}
    for n, unit in enumerate(units):
        for t in _candidates(unit, palette):
            choice[n, t.name] = problem.add_variable(f"x_{n}_{t.name}", cat="Binary")
    problem += pulp.lpSum(objective.cost(units[n], name) * var for (n, name), var in choice.items())
    for n, unit in enumerate(units):
        problem += pulp.lpSum(var for (m, _), var in choice.items() if m == n) == 1

    def size(members) -> pulp.LpAffineExpression:
        return pulp.lpSum(units[n].nbytes(quant_type(name)) * var for (n, name), var in choice.items() if n in members)

    problem += size(set(range(len(units)))) <= max_expert_bytes
    for group in same_type:
        first, *rest = group
        for n in rest:
            for name in (t.name for t in _candidates(units[first], palette)):
                problem += choice[n, name] == choice[first, name]
    if per_layer:
        _add_per_layer_constraints(problem, units, palette, choice, size, max_expert_bytes)
    status = problem.solve(pulp.HiGHS(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        raise Mc2ggufError(f"the allocation problem is {pulp.LpStatus[status].lower()} under this budget and options")
    types = {}
    for (n, name), var in choice.items():
        if var.value() > 0.5:
            types[units[n].key] = quant_type(name)
    total = sum(u.nbytes(types[u.key]) for u in units)
    return Allocation(types, total, sum(objective.cost(u, types[u.key].name) for u in units))


def _add_per_layer_constraints(problem, units, palette, choice, size, max_expert_bytes) -> None:
    by_bits = sorted(palette, key=lambda t: t.bits_per_weight)
    highest, middle = by_bits[-1].name, by_bits[len(by_bits) // 2].name
    total_weights = sum(u.n_weights for u in units)
    for layer in sorted({u.layer for u in units}):
        members = {n for n, u in enumerate(units) if u.layer == layer}
        share = sum(units[n].n_weights for n in members) / total_weights
        problem += size(members) <= int(max_expert_bytes * share)
        for name in (highest, middle):
            problem += pulp.lpSum(var for (n, t), var in choice.items() if n in members and t == name) >= 1
