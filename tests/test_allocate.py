"""The PMQ integer program: optimal (equal to brute force), budget respected, clear errors."""

from __future__ import annotations

import itertools
import random

import pytest

from mc2gguf.pmq.allocate import AllocationUnit, Objective, reachable_bytes, solve_allocation
from mc2gguf.errors import Mc2ggufError
from mc2gguf.quant.types import quant_type

PALETTE = [quant_type(n) for n in ("IQ2_XXS", "Q2_K", "IQ3_S", "Q4_K")]


def _units(seed: int, n_layers: int = 2, n_experts: int = 3) -> list[AllocationUnit]:
    rng = random.Random(seed)
    units = []
    for layer, expert in itertools.product(range(n_layers), range(n_experts)):
        base = rng.uniform(0.5, 2.0)
        eps = {t.name: base * 2.0 ** (-t.bits_per_weight) * rng.uniform(0.8, 1.2) for t in PALETTE}
        units.append(AllocationUnit(layer, expert, ("gate", "up", "down"), ((512, 256), (512, 256), (256, 512)),
                                    rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.7), eps))
    return units


def _brute_force(units, budget, objective, per_layer=False):
    best = None
    for combo in itertools.product(PALETTE, repeat=len(units)):
        size = sum(u.nbytes(t) for u, t in zip(units, combo))
        if size > budget:
            continue
        if per_layer and not _per_layer_ok(units, combo, budget):
            continue
        cost = sum(objective.cost(u, t.name) for u, t in zip(units, combo))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, size)
    return best


def _per_layer_ok(units, combo, budget):
    by_bits = sorted(PALETTE, key=lambda t: t.bits_per_weight)
    total = sum(u.n_weights for u in units)
    for layer in {u.layer for u in units}:
        members = [(u, t) for u, t in zip(units, combo) if u.layer == layer]
        share = sum(u.n_weights for u, _ in members) / total
        if sum(u.nbytes(t) for u, t in members) > int(budget * share):
            return False
        names = {t.name for _, t in members}
        if by_bits[-1].name not in names or by_bits[len(by_bits) // 2].name not in names:
            return False
    return True


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.85])
def test_ip_matches_brute_force(seed, fraction):
    units = _units(seed)
    lo, hi = reachable_bytes(units, PALETTE)
    budget = int(lo + fraction * (hi - lo))
    objective = Objective(alpha=1.0, beta=1.0, gamma=2.0)
    result = solve_allocation(units, PALETTE, budget, objective)
    best_cost, _ = _brute_force(units, budget, objective)
    assert result.expert_bytes <= budget
    assert result.expert_bytes == sum(u.nbytes(result.types[u.key]) for u in units)
    assert result.objective == pytest.approx(best_cost, rel=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_per_layer_variant_matches_brute_force(seed):
    units = _units(seed)
    lo, hi = reachable_bytes(units, PALETTE)
    budget = int(lo + 0.6 * (hi - lo))
    result = solve_allocation(units, PALETTE, budget, Objective(), per_layer=True)
    best_cost, _ = _brute_force(units, budget, Objective(), per_layer=True)
    assert result.objective == pytest.approx(best_cost, rel=1e-9)


def test_exponents_change_the_optimum():
    units = _units(7)
    lo, hi = reachable_bytes(units, PALETTE)
    budget = int(lo + 0.4 * (hi - lo))
    plain = solve_allocation(units, PALETTE, budget, Objective(alpha=0.0, beta=0.0, gamma=1.0))
    weighted = solve_allocation(units, PALETTE, budget, Objective(alpha=3.0, beta=1.0, gamma=2.0))
    assert plain.types != weighted.types


def test_infeasible_budget_names_the_reachable_range():
    units = _units(0)
    lo, hi = reachable_bytes(units, PALETTE)
    with pytest.raises(Mc2ggufError, match=f"at least {lo:,}.*largest reachable is {hi:,}"):
        solve_allocation(units, PALETTE, lo - 1)


def test_generous_budget_gives_every_unit_the_best_type():
    units = _units(1)
    _, hi = reachable_bytes(units, PALETTE)
    result = solve_allocation(units, PALETTE, hi)
    assert all(t.name == "Q4_K" for t in result.types.values())


#: decode seconds per weight, shaped like this machine's (tests/test_type_costs.py measures real ones): the
#: codebook types slower per weight than Q2_K although smaller
COSTS = {"IQ2_XXS": 6.6e-11, "Q2_K": 2.8e-11, "IQ3_S": 7.0e-11, "Q4_K": 2.4e-11}


def _brute_force_with_speed(units, budget, objective, limit):
    best = None
    for combo in itertools.product(PALETTE, repeat=len(units)):
        types = {u.key: t for u, t in zip(units, combo)}
        if sum(u.nbytes(t) for u, t in zip(units, combo)) > budget or limit.speed(units, types) < limit.min_speed:
            continue
        cost = sum(objective.cost(u, t.name) for u, t in zip(units, combo))
        if best is None or cost < best - 1e-12:
            best = cost
    return best


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_speed", [0.5, 0.7, 0.85])
def test_decode_limit_matches_brute_force(seed, min_speed):
    from mc2gguf.pmq.allocate import DecodeLimit

    units = _units(seed)
    lo, hi = reachable_bytes(units, PALETTE)
    budget = int(lo + 0.5 * (hi - lo))
    limit = DecodeLimit(COSTS, min_speed, "Q4_K")
    free = solve_allocation(units, PALETTE, budget)
    result = solve_allocation(units, PALETTE, budget, decode_limit=limit)
    assert result.speed >= min_speed - 1e-9
    assert result.expert_bytes <= budget
    assert result.objective == pytest.approx(_brute_force_with_speed(units, budget, Objective(), limit), rel=1e-9)
    assert result.objective >= free.objective - 1e-12  # a constraint never helps quality
    if limit.speed(units, free.types) < min_speed:  # it binds: the codebook types give way
        n_codebook = sum(t.name.startswith("IQ") for t in result.types.values())
        assert n_codebook < sum(t.name.startswith("IQ") for t in free.types.values())


def test_decode_limit_errors():
    from mc2gguf.pmq.allocate import DecodeLimit

    units = _units(0)
    lo, hi = reachable_bytes(units, PALETTE)
    with pytest.raises(Mc2ggufError, match=r"--min-speed 2 is out of reach: .* at most 1.000x as fast as all-Q4_K"):
        solve_allocation(units, PALETTE, hi, decode_limit=DecodeLimit(COSTS, 2.0, "Q4_K"))
    with pytest.raises(Mc2ggufError, match="no measured decode cost for IQ3_S"):
        without = {k: v for k, v in COSTS.items() if k != "IQ3_S"}
        solve_allocation(units, PALETTE, hi, decode_limit=DecodeLimit(without, 1.0, "Q4_K"))
    # reachable on its own and within budget on its own, not both: Q4_K is the fastest and the largest
    with pytest.raises(Mc2ggufError, match="infeasible under this budget, --min-speed 1 and the other options"):
        solve_allocation(units, PALETTE, lo, decode_limit=DecodeLimit(COSTS, 1.0, "Q4_K"))
