"""Tests of the planner's partition methods: each equals brute force over every plan on many random small instances."""

import itertools
import math
import random
import re

import pytest

from lightning_pipe.engine.cut import stage_sizes
from lightning_pipe.planner import LayerProfile, Level, Topology, plan_pipeline, smallest_memory_cap
from lightning_pipe.planner.costs import LayerSums
from lightning_pipe.planner.search import search


# -- an independent statement of the cost model (what the docstrings of partition.py and costs.py promise) ----------
def random_profiles(rng: random.Random, num_layers: int) -> list[LayerProfile]:
    profiles = []
    for index in range(num_layers):
        forward = rng.choice([rng.uniform(0.1, 1.0), rng.uniform(1.0, 5.0)])
        params = rng.choice([0, rng.randrange(1, 10) * 1000, rng.randrange(1, 100) * 100_000])
        profiles.append(LayerProfile(
            name=f"l{index}", forward=forward, backward=forward * rng.uniform(1.0, 3.0),
            input_bytes=rng.randrange(1, 50) * 1000, output_bytes=rng.randrange(1, 50) * 1000,
            saved_bytes=rng.randrange(0, 50) * 1000, saves_input=rng.random() < 0.5, saves_output=rng.random() < 0.5,
            parameters=params, parameter_bytes=4 * params, gradient_bytes=4 * params, optimizer_bytes=8 * params))
    return profiles


def compositions(total: int, parts: int):
    """Every way of writing ``total`` as ``parts`` positive integers, in order."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def level_of(topology: Topology, a: int, b: int) -> Level:
    size = 1
    for level in topology.levels:
        size *= level.devices
        if a // size == b // size:
            return level
    raise AssertionError("devices outside the topology")


def stash(profiles, i, j):
    inner = sum(p.saved_bytes + (p.output_bytes if p.saves_output or q.saves_input else 0)
                for p, q in zip(profiles[i:j - 1], profiles[i + 1:j]))
    return profiles[i].input_bytes + inner + profiles[j - 1].saved_bytes + profiles[j - 1].output_bytes


def memory(profiles, i, j, in_flight, replicas):
    weights = sum(p.parameter_bytes + p.gradient_bytes + p.optimizer_bytes for p in profiles[i:j])
    return weights + math.ceil(in_flight / replicas) * stash(profiles, i, j)


def one_f_one_b_in_flight(stage: int, num_stages: int, m: int) -> int:
    return min(num_stages - stage, m)


def plans(num_layers, num_devices, num_stages=None, replicas=None):
    """Every plan: (layer sizes, replica counts) with each stage non-empty and every device used."""
    counts = [num_stages] if num_stages else range(1, min(num_layers, num_devices) + 1)
    for p in counts:
        for sizes in compositions(num_layers, p):
            for reps in compositions(num_devices, p):
                if replicas is None or all(r == replicas for r in reps):
                    yield sizes, reps


def stage_cost(profiles, topology, first, end, device, r, m):
    """Busy seconds per step of layers [first, end) on devices [device, device + r)."""
    messages = 0.0  # a receive and a send in forward and in backward, for each neighbour
    if first > 0:
        messages += 2 * level_of(topology, device - 1, device).overhead
    if end < len(profiles):
        if device + r >= topology.num_devices:
            return math.inf
        messages += 2 * level_of(topology, device + r - 1, device + r).overhead
    compute = m * (sum(p.forward + p.backward for p in profiles[first:end]) + messages) / r
    grads = sum(p.gradient_bytes for p in profiles[first:end])
    if r > 1 and grads:  # nothing to allreduce without gradients
        level = level_of(topology, device, device + r - 1)
        compute += 2 * (r - 1) / r * grads / level.bandwidth + 2 * (r - 1) * level.latency
    return compute


def cut_cost(profiles, topology, end, device, m):
    """Seconds per step moving activations after layer end - 1 to device ``device`` and gradients back."""
    level = level_of(topology, device - 1, device)
    return m * 2 * (level.latency + profiles[end - 1].output_bytes / level.bandwidth)


def objective(profiles, topology, sizes, reps, m):
    """PipeDream's value of a plan: its slowest stage or cut, in seconds per step."""
    parts, first, device = [], 0, 0
    for index, (size, r) in enumerate(zip(sizes, reps)):
        parts.append(stage_cost(profiles, topology, first, first + size, device, r, m))
        if index > 0:
            parts.append(cut_cost(profiles, topology, first, device, m))
        first, device = first + size, device + r
    return max(parts)


def _one_move(sizes, reps, other_sizes, other_reps):
    """Whether one layer or one device crossed one boundary between the two plans."""
    def crossed(x, y):  # one unit crossed one boundary (a shift of several boundaries is a move too, not tested here)
        changed = [i for i, (a, b) in enumerate(zip(x, y)) if a != b]
        return len(changed) == 2 and changed[1] == changed[0] + 1 and sum(abs(x[i] - y[i]) for i in changed) == 2

    return (crossed(sizes, other_sizes) and reps == other_reps) or (crossed(reps, other_reps) and sizes == other_sizes)


def fits(profiles, sizes, reps, m, cap):
    first = 0
    for index, (size, r) in enumerate(zip(sizes, reps)):
        if memory(profiles, first, first + size, one_f_one_b_in_flight(index, len(sizes), m), r) > cap:
            return False
        first += size
    return True


def random_topology(rng: random.Random) -> Topology:
    shape = rng.choice([(1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (1, 3), (4, 1), (1, 4)])
    fast = rng.uniform(1e5, 1e7)
    return Topology([Level(shape[0], fast, rng.uniform(0, 0.01), rng.uniform(0, 0.1)),
                     Level(shape[1], fast / rng.uniform(1, 20), rng.uniform(0, 0.05), rng.uniform(0, 0.3))])


# -- the dynamic program ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(150))
def test_pipedream_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    topology = random_topology(rng)
    profiles = random_profiles(rng, rng.randint(1, 7))
    L, D, m = len(profiles), topology.num_devices, rng.choice([1, 2, 4, 8])
    every = list(plans(L, D))
    result = search(L, D, lambda i, j, c, r, k: stage_cost(profiles, topology, i, j, c, r, m),
                    lambda end, device: cut_cost(profiles, topology, end, device, m))
    assert result.value == pytest.approx(min(objective(profiles, topology, s, r, m) for s, r in every), rel=1e-9)
    sizes, reps = [g.end - g.first for g in result.segments], [g.replicas for g in result.segments]
    assert objective(profiles, topology, sizes, reps, m) == pytest.approx(result.value, rel=1e-9)
    # plan_pipeline: PipeDream's best plan for the number of stages it chose, the fastest of them in simulation.
    plan = plan_pipeline(profiles, topology, method="profile", num_microbatches=m, refine=False)
    p = len(plan.stages)
    best = min(objective(profiles, topology, s, r, m) for s, r in every if len(s) == p)
    assert plan.bottleneck == pytest.approx(best, rel=1e-9)
    assert objective(profiles, topology, plan.partition, plan.replicas, m) == pytest.approx(plan.bottleneck, rel=1e-9)
    assert sum(plan.replicas) == D and sum(plan.partition) == L
    for q in range(1, min(L, D) + 1):
        other = plan_pipeline(profiles, topology, method="profile", num_microbatches=m, num_stages=q, refine=False)
        assert plan.step_time <= other.step_time * (1 + 1e-12)
    # Refined by simulation: never slower than PipeDream's plan, and no single move makes it faster.
    refined = plan_pipeline(profiles, topology, method="profile", num_microbatches=m)
    assert refined.step_time <= plan.step_time * (1 + 1e-12)
    for sizes, reps in every:
        if len(sizes) == len(refined.stages) and _one_move(refined.partition, refined.replicas, sizes, reps):
            moved = plan_pipeline(profiles, topology, method=sizes, num_microbatches=m) if reps == [1] * len(reps) \
                else None
            if moved is not None:
                assert moved.step_time >= refined.step_time * (1 - 1e-9)


@pytest.mark.parametrize("seed", range(60))
def test_profile_dp_with_fixed_stages_or_replicas(seed):
    rng = random.Random(1000 + seed)
    topology = random_topology(rng)
    profiles = random_profiles(rng, rng.randint(2, 7))
    D, L, m = topology.num_devices, len(profiles), 4
    num_stages = rng.randint(1, min(L, D))
    plan = plan_pipeline(profiles, topology, method="profile", num_microbatches=m, num_stages=num_stages,
                         refine=False)
    best = min(objective(profiles, topology, s, r, m) for s, r in plans(L, D, num_stages=num_stages))
    assert len(plan.stages) == num_stages
    assert plan.bottleneck == pytest.approx(best, rel=1e-9)
    replicas = rng.choice([r for r in range(1, D + 1) if D % r == 0 and D // r <= L])
    plan = plan_pipeline(profiles, topology, method="profile", num_microbatches=m, replicas=replicas, refine=False)
    best = min(objective(profiles, topology, s, r, m) for s, r in plans(L, D, replicas=replicas))
    assert plan.replicas == [replicas] * len(plan.stages)
    assert plan.bottleneck == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", range(60))
def test_profile_dp_under_memory_cap_equals_brute_force(seed):
    rng = random.Random(2000 + seed)
    topology = random_topology(rng)
    profiles = random_profiles(rng, rng.randint(1, 7))
    D, L, m = topology.num_devices, len(profiles), rng.choice([2, 4, 8])
    every = list(plans(L, D))
    least = min(max(memory(profiles, sum(s[:k]), sum(s[:k + 1]), one_f_one_b_in_flight(k, len(s), m), r[k])
                    for k in range(len(s))) for s, r in every)
    assert smallest_memory_cap(profiles, topology, num_microbatches=m) == least
    cap = least * rng.uniform(1.0, 1.25)
    plan = plan_pipeline(profiles, topology, method="profile", num_microbatches=m, memory_cap=cap, refine=False)
    for p in range(1, min(L, D) + 1):
        fitting = [objective(profiles, topology, s, r, m) for s, r in every if len(s) == p and fits(profiles, s, r, m, cap)]
        if p == len(plan.stages):
            assert plan.bottleneck == pytest.approx(min(fitting), rel=1e-9)
        elif fitting:
            other = plan_pipeline(profiles, topology, method="profile", num_microbatches=m, memory_cap=cap, num_stages=p,
                                  refine=False)
            assert other.bottleneck == pytest.approx(min(fitting), rel=1e-9)
            assert plan.step_time <= other.step_time * (1 + 1e-12)
    assert plan.peak_memory <= cap
    with pytest.raises(ValueError, match="smallest cap any cut fits") as error:
        plan_pipeline(profiles, topology, method="profile", num_microbatches=m, memory_cap=least - 1)
    assert f"({least} bytes)" in str(error.value)


# -- time and memory methods ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_time_and_memory_methods_equal_brute_force(seed):
    rng = random.Random(3000 + seed)
    profiles = random_profiles(rng, rng.randint(2, 8))
    L = len(profiles)
    p, m = rng.randint(1, min(L, 4)), rng.choice([1, 4, 8])
    compute = [x.forward + x.backward for x in profiles]

    def slowest(sizes):
        bounds = [0, *itertools.accumulate(sizes)]
        return max(sum(compute[bounds[k]:bounds[k + 1]]) for k in range(len(sizes)))

    plan = plan_pipeline(profiles, p, method="time", num_microbatches=m)
    assert slowest(plan.partition) == pytest.approx(min(slowest(s) for s in compositions(L, p)))

    def mem(sizes):
        bounds = [0, *itertools.accumulate(sizes)]
        return max(memory(profiles, bounds[k], bounds[k + 1], one_f_one_b_in_flight(k, p, m), 1) for k in range(p))

    least = min(mem(s) for s in compositions(L, p))
    cap = least * rng.uniform(1.0, 1.5)
    plan = plan_pipeline(profiles, p, method="memory", num_microbatches=m, memory_cap=cap)
    assert slowest(plan.partition) == pytest.approx(min(slowest(s) for s in compositions(L, p) if mem(s) <= cap))
    assert plan.peak_memory <= cap
    with pytest.raises(ValueError, match=re.escape(f"smallest cap any cut fits is {least / 2**20:.1f} MiB ({least} bytes)")):
        plan_pipeline(profiles, p, method="memory", num_microbatches=m, memory_cap=least - 1)


def test_uniform_parameters_and_counts_match_the_engine():
    rng = random.Random(7)
    profiles = random_profiles(rng, 9)
    assert plan_pipeline(profiles, 4, method="uniform").partition == stage_sizes([None] * 9, 4, "uniform")
    assert plan_pipeline(profiles, 4, method=[1, 2, 3, 3]).partition == [1, 2, 3, 3]
    plan = plan_pipeline(profiles, 4, method="parameters")
    params = [x.parameters for x in profiles]
    bounds = [0, *itertools.accumulate(plan.partition)]
    heaviest = max(sum(params[bounds[k]:bounds[k + 1]]) for k in range(4))
    assert heaviest == min(max(sum(params[sum(s[:k]):sum(s[:k + 1])]) for k in range(4)) for s in compositions(9, 4))


def test_fixed_plan_over_the_cap_names_the_smallest_cap():
    profiles = random_profiles(random.Random(3), 6)
    with pytest.raises(ValueError, match="the 'uniform' plan needs .* MiB on its fullest device.*Raise memory_cap"):
        plan_pipeline(profiles, 3, method="uniform", memory_cap=1000)


def test_memory_method_needs_a_cap_and_one_stage_per_rank():
    profiles = random_profiles(random.Random(4), 8)
    with pytest.raises(ValueError, match="needs memory_cap"):
        plan_pipeline(profiles, 2, method="memory")
    with pytest.raises(ValueError, match="one stage on each device.*interleaved_1f1b"):
        plan_pipeline(profiles, 2, method="profile", schedule="interleaved_1f1b", num_microbatches=4)
    with pytest.raises(ValueError, match="unknown partition method 'fastest'"):
        plan_pipeline(profiles, 2, method="fastest")


def test_interleaved_plans_cut_into_virtual_stages():
    profiles = random_profiles(random.Random(5), 8)
    plan = plan_pipeline(profiles, 2, method="time", schedule="interleaved_1f1b", num_microbatches=4)
    assert len(plan.partition) == 4 and len(plan.rank_memory) == 2
    assert plan.rank_memory[0] == plan.stages[0].memory_bytes + plan.stages[2].memory_bytes


def test_prediction_of_an_even_plan_is_the_textbook_step():
    # 4 equal layers on 4 devices, free links: 1F1B takes (m + p - 1)(F + B).
    layer = LayerProfile("x", 1.0, 2.0, 8, 8, 0, True, False, 10, 40, 40, 80)
    plan = plan_pipeline([layer] * 4, 4, method="profile", replicas=1, num_microbatches=8)
    assert plan.partition == [1, 1, 1, 1]
    assert plan.step_time == pytest.approx((8 + 3) * 3.0)
    assert plan.bubble == pytest.approx(3 / 11)
    assert plan.bottleneck == pytest.approx(8 * 3.0)
    assert "predicted step time" in plan.summary()


def test_stash_counts_a_shared_tensor_once():
    a = LayerProfile("a", 1, 1, input_bytes=10, output_bytes=100, saved_bytes=5, saves_input=True,
                     saves_output=True, parameters=0, parameter_bytes=0, gradient_bytes=0, optimizer_bytes=0)
    b = LayerProfile("b", 1, 1, input_bytes=100, output_bytes=7, saved_bytes=3, saves_input=True,
                     saves_output=False, parameters=0, parameter_bytes=0, gradient_bytes=0, optimizer_bytes=0)
    # input 10, a's other saved 5, the a->b tensor 100 once, b's other saved 3, the output 7.
    assert LayerSums([a, b]).stash_bytes(0, 2) == 10 + 5 + 100 + 3 + 7


# -- uneven replication ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, m", [("1f1b", 8), ("1f1b", 2), ("gpipe", 8), ("gpipe", 2)])
def test_fixed_uneven_replicas_and_round_robin_agree_on_memory(schedule, m):
    """A [3, 1] plan is played through its round-robin schedule; replicas="round_robin" under a cap equal to that
    plan's peak finds a plan at least as fast that fits, and a cap below every plan names a least cap that works."""
    from lightning_pipe.planner.plans import MemoryCapError

    for seed in range(4):
        profiles = random_profiles(random.Random(5000 + seed), 8)
        fixed = plan_pipeline(profiles, 4, method="profile", schedule=schedule, num_microbatches=m, replicas=[3, 1])
        assert fixed.replicas == [3, 1] and fixed.prediction.schedule.name == f"replicated_{schedule}"
        chosen = plan_pipeline(profiles, 4, method="profile", schedule=schedule, num_microbatches=m,
                               replicas="round_robin", memory_cap=fixed.peak_memory)
        assert chosen.peak_memory <= fixed.peak_memory and chosen.replicas[-1] == 1
        assert chosen.step_time <= fixed.step_time * (1 + 1e-9)
        with pytest.raises(MemoryCapError) as error:
            plan_pipeline(profiles, 4, method="profile", schedule=schedule, num_microbatches=m,
                          replicas="round_robin", memory_cap=1.0)
        least = error.value.least_bytes
        assert "memory_cap=0.0000 MiB (1 bytes)" in str(error.value)  # (a cap in bytes by mistake read "0.0 MiB")
        fits = plan_pipeline(profiles, 4, method="profile", schedule=schedule, num_microbatches=m,
                             replicas="round_robin", memory_cap=least)
        assert fits.peak_memory <= least


def test_more_devices_than_layers_says_which_layout_fits() -> None:
    """12 devices for 4 layers, one pipeline asked for: the error names a layout that uses every device (it said
    "loosen one of them": found by review)."""
    profiles = random_profiles(random.Random(0), 4)
    with pytest.raises(ValueError, match=r"no plan puts 4 layers on 12 devices .*: e.g. num_stages=4, replicas=3; or "
                                         r"use fewer devices"):
        plan_pipeline(profiles, 12, method="profile", replicas=1)
