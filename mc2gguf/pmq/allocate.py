"""PMQ's allocation: one type per allocation unit (an expert, or some of its projections) by integer
programming (pulp + HiGHS), minimising ``sum phi^alpha w^beta eps^gamma`` under a byte budget."""

from __future__ import annotations

from dataclasses import dataclass

import pulp

from ..errors import Mc2ggufError
from ..quant.types import QuantType, quant_type


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
class DecodeLimit:
    """``--min-speed``: the routed experts decode at least ``min_speed`` times as fast as with every expert of type
    ``reference``, by measured per-weight decode costs (``costs``, type name -> seconds per weight: mc2gguf
    type-costs). A unit's share of a token's time is ``phi * weights * cost``: it is read on ``phi`` of the
    layer's routed slots."""

    costs: dict[str, float]
    min_speed: float
    reference: str

    def unit_time(self, unit: AllocationUnit, type_name: str) -> float:
        return unit.phi * unit.n_weights * self.costs[type_name]

    def reference_time(self, units: list[AllocationUnit]) -> float:
        return sum(self.unit_time(u, self.reference) for u in units)

    def speed(self, units: list[AllocationUnit], types: dict[tuple, QuantType]) -> float:
        """The experts' predicted decode speed relative to the reference."""
        return self.reference_time(units) / sum(self.unit_time(u, types[u.key].name) for u in units)


@dataclass(frozen=True)
class Allocation:
    types: dict[tuple, QuantType]  # unit key -> type
    expert_bytes: int
    objective: float
    speed: float | None = None  # the experts' predicted decode speed relative to --speed-reference


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
    decode_limit: DecodeLimit | None = None,
) -> Allocation:
    """The integer program: one type per unit, minimal objective, total expert bytes <= the budget.

    ``per_layer`` is the paper's variant: every layer gets the budget's share of its weights, and at least
    one unit at the palette's highest and one at its middle type. ``same_type`` lists groups of unit
    indices that must share one type (``--layout stock``: all experts of a layer and projection).
    ``decode_limit`` bounds the experts' predicted decode time (``--min-speed``).
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
    if decode_limit is not None:
        _add_decode_limit(problem, units, palette, choice, decode_limit)
    status = problem.solve(pulp.HiGHS(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        limit = f", --min-speed {decode_limit.min_speed:g}" if decode_limit else ""
        raise Mc2ggufError(f"the allocation problem is {pulp.LpStatus[status].lower()} under this budget{limit} "
                           "and the other options")
    types = {}
    for (n, name), var in choice.items():
        if var.value() > 0.5:
            types[units[n].key] = quant_type(name)
    total = sum(u.nbytes(types[u.key]) for u in units)
    return Allocation(types, total, sum(objective.cost(u, types[u.key].name) for u in units),
                      decode_limit.speed(units, types) if decode_limit else None)


def _add_decode_limit(problem, units, palette, choice, limit: DecodeLimit) -> None:
    missing = sorted({t.name for t in palette} - limit.costs.keys() | {limit.reference} - limit.costs.keys())
    if missing:
        raise Mc2ggufError(f"no measured decode cost for {', '.join(missing)} (mc2gguf type-costs measures them)")
    reference = limit.reference_time(units)
    fastest = sum(min(limit.unit_time(u, t.name) for t in _candidates(u, palette)) for u in units)
    if fastest * limit.min_speed > reference:
        raise Mc2ggufError(
            f"--min-speed {limit.min_speed:g} is out of reach: with this palette the experts decode at most "
            f"{reference / fastest:.3f}x as fast as all-{limit.reference} experts")
    # in units of the reference time: seconds per weight are ~1e-11, below the solver's feasibility tolerance
    problem += pulp.lpSum(limit.unit_time(units[n], name) / reference * var for (n, name), var in choice.items()) \
        <= 1.0 / limit.min_speed


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


def allocation_units(records: list[dict], shapes: dict[str, tuple[int, int]]) -> list[AllocationUnit]:
    units = []
    for rec in records:
        for (e, projs), eps in sorted(rec["eps"].items()):
            units.append(AllocationUnit(rec["layer"], e, projs, tuple(shapes[p] for p in projs),
                                        rec["phi"][e], rec["mean_weight"][e], eps))
    return units


def expert_types(allocation: Allocation, units: list[AllocationUnit]) -> dict[tuple[int, int, str], QuantType]:
    """``{(layer, expert, projection): type}`` from the allocation of units."""
    return {(u.layer, u.expert, p): allocation.types[u.key] for u in units for p in u.projections}


def allocate(units: list[AllocationUnit], opts, fixed_bytes: int, file_size) -> Allocation:
    """The allocation under ``opts``' budget: ``--bpw`` over the experts' weights, or ``--size`` for the whole
    file, whose non-expert tensors take ``fixed_bytes`` and whose exact size is ``file_size(allocation)``."""
    palette = [quant_type(t) for t in opts.palette]
    same_type = []
    if opts.layout == "stock":
        keys = sorted({(u.layer, u.projections) for u in units})
        same_type = [[n for n, u in enumerate(units) if (u.layer, u.projections) == k] for k in keys]

    limit = DecodeLimit(dict(opts.type_costs), opts.min_speed, opts.speed_reference) if opts.min_speed else None

    def solve(budget: int) -> Allocation:
        return solve_allocation(units, palette, budget, opts.objective, opts.per_layer_budget, same_type, limit)

    if opts.bpw is not None:
        n_weights = sum(u.n_weights for u in units)
        return solve(int(opts.bpw * n_weights // 8))
    # --size: the budget of the experts is what the rest of the file leaves; the header changes a little
    # with the allocation (type groups), so tighten by any excess until the exact file size fits.
    smallest, largest = reachable_bytes(units, palette)
    budget = opts.size - fixed_bytes
    for _ in range(8):
        try:
            allocation = solve(budget)
        except Mc2ggufError:
            if limit is not None:
                raise
            overhead = opts.size - budget
            raise Mc2ggufError(
                f"--size {opts.size:,} is infeasible: reachable file sizes are about {smallest + overhead:,} "
                f"to {largest + overhead:,} bytes with this palette"
            ) from None
        excess = file_size(allocation) - opts.size
        if excess <= 0:
            return allocation
        budget -= excess
    raise Mc2ggufError("could not fit the header overhead into --size")
