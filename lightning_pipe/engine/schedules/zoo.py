"""Schedules beyond fill-drain and 1F1B: Megatron's interleaved 1F1B and the zero-bubble ZB-H1 and ZB-V.

All are pure functions like those of :mod:`.basic`: they order each rank's compute actions and let
:func:`~.actions.add_communication` insert the sends and receives. The registry (:mod:`lightning_pipe.engine.schedules`)
names them.

``interleaved_1f1b(2, 4, virtual_stages=2)``: 2 ranks, 4 stages, stage ``s`` on rank ``s % 2``. Each rank
walks its model chunks in groups of ``p`` micro-batches (forwards chunk 0 -> 1, backwards chunk 1 -> 0)::

    step | rank 0 rank 1
       0 | 0F0    .
       1 | 0F1    1F0
       2 | 2F0    1F1
       3 | 2F1    3F0
       4 | 0F2    3B0
       5 | 2B0    3F1
       6 | 0F3    3B1
       7 | 2B1    1F2
       8 | 2F2    1B0
       9 | 0B0    1F3
      10 | 2F3    1B1
      11 | 0B1    3F2
      12 | .      3B2
      13 | 2B2    3F3
      14 | .      3B3
      15 | 2B3    1B2
      16 | 0B2    1B3
      17 | 0B3    .

``zb_h1(3, 4)`` (unit cost for F, I and W): the backward is split into ``I`` (input gradient, sent upstream
at once) and ``W`` (weight gradient, deferred by ``p - 1`` micro-batches into the cool-down)::

    step | rank 0 rank 1 rank 2
       0 | 0F0    .      .
       1 | 0F1    1F0    .
       2 | 0F2    1F1    2F0
       3 | .      .      2I0
       4 | .      1I0    2F1
       5 | 0I0    1F2    2I1
       6 | 0W0    1I1    2F2
       7 | 0F3    1W0    2I2
       8 | 0I1    1F3    2W0
       9 | 0W1    1I2    2F3
      10 | 0I2    1W1    2I3
      11 | 0W2    1I3    2W1
      12 | 0I3    1W2    2W2
      13 | 0W3    1W3    2W3
"""

from __future__ import annotations

from .actions import Action, Op, Schedule, add_communication

__all__ = ["interleaved_1f1b", "zb_h1", "zb_v"]


def _round_to_multiple(value: int, base: int) -> int:
    return max(base, -(-value // base) * base)


def interleaved_1f1b(num_stages: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """Megatron-LM's interleaved 1F1B: ``num_stages`` ranks each hold ``virtual_stages`` stages.

    Here ``num_stages`` is the pipeline depth in ranks ``p`` (the argument every schedule takes); the schedule
    has ``p * virtual_stages`` stages and stage ``s`` lives on rank ``s % p``. The bubble shrinks to ``1/v`` of
    1F1B's for the same model: ``(p - 1) * (t_f + t_b)`` with ``t_f``, ``t_b`` the costs of one *stage*.

    Allowed sizes: ``p >= 1``, ``virtual_stages >= 2`` and ``num_microbatches`` a positive multiple of ``p``
    (as in Megatron). Other micro-batch counts were tried with partial last groups: several deadlock and the
    others lose the bubble reduction, so they are refused. Megatron runs every forward first when ``m == p``;
    here the one warm-up rule serves all ``m`` (rules and bubble hold there too, see the tests).
    """
    p, m, v = num_stages, num_microbatches, virtual_stages
    if p < 1:
        raise ValueError(f"interleaved_1f1b: num_stages ({p}) is the number of ranks and must be >= 1")
    if v < 2:
        raise ValueError(f"interleaved_1f1b: virtual_stages ({v}) must be >= 2; "
                         "for one stage per rank use schedule='1f1b'")
    if m < 1 or m % p:
        raise ValueError(f"num_microbatches ({m}) must be a multiple of the number of ranks ({p}) for "
                         f"interleaved_1f1b; use {_round_to_multiple(m, p)} or schedule='1f1b'")
    total = m * v  # forwards (and backwards) per rank, over all its stages

    # The k-th forward of a rank runs micro-batch ``mb`` on model chunk ``chunk``: groups of p micro-batches
    # go through chunk 0, then chunk 1, ... Backwards walk the same order with the chunks reversed.
    forward_order = [(chunk, group + i) for group in range(0, m, p) for chunk in range(v) for i in range(p)]
    backward_order = [(v - 1 - chunk, mb) for chunk, mb in forward_order]

    compute = []
    for rank in range(p):
        def forward(k: int) -> Action:
            chunk, mb = forward_order[k]
            return Action(chunk * p + rank, Op.FORWARD, mb)

        def backward(k: int) -> Action:
            chunk, mb = backward_order[k]
            return Action(chunk * p + rank, Op.BACKWARD, mb)

        # Megatron's warm-up: enough forwards that the first backward of the last chunk can come back.
        num_warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
        num_steady = total - num_warmup
        actions = []
        # Warm-up: forwards only.
        for k in range(num_warmup):
            actions.append(forward(k))
        # Steady state: one forward, then one backward.
        for k in range(num_steady):
            actions.append(forward(num_warmup + k))
            actions.append(backward(k))
        # Cool-down: the backwards still owed.
        for k in range(num_steady, total):
            actions.append(backward(k))
        compute.append(actions)
    stage_to_rank = [stage % p for stage in range(p * v)]
    return add_communication("interleaved_1f1b", compute, stage_to_rank, m)


def zb_h1(num_stages: int, num_microbatches: int) -> Schedule:
    """Zero-bubble ZB-H1 (Qi et al. 2023): 1F1B with the backward split in ``I`` and a deferred ``W``.

    In round ``x`` stage ``s`` of ``p`` runs ``F[x]``, ``I[x - (p - 1 - s)]``, ``W[x - (p - 1)]`` (those that
    exist): the input gradient travels upstream as early as in 1F1B, and each stage's weight gradients lag
    ``p - 1`` micro-batches behind its forwards, so they fill the cool-down where 1F1B idles.

    Memory: every rank holds at most ``min(p, m)`` micro-batches (forward run, ``W`` not yet): the peak of
    1F1B's first rank, which is the pipeline's peak. Later ranks hold more than under 1F1B (``p`` instead of
    ``p - s``); that is the price of the deferral, as in the paper.

    Bubble per rank for ``m >= p`` (verified by simulation): ``(p - 1) * max(t_f, t_i, t_f + t_i - t_w)``;
    the paper's ``(p - 1) * (t_f + t_i - t_w)`` whenever ``t_w <= min(t_f, t_i)``, a third of 1F1B's
    ``(p - 1) * (t_f + t_i + t_w)`` when all three are equal. Any ``p, m >= 1`` is allowed.
    """
    p, m = num_stages, num_microbatches
    if p < 1:
        raise ValueError(f"zb_h1: num_stages ({p}) must be >= 1")
    if m < 1:
        raise ValueError(f"zb_h1: num_microbatches ({m}) must be >= 1")
    compute = []
    for stage in range(p):
        def round_(x: int) -> list[Action]:
            candidates = [(Op.FORWARD, x), (Op.BACKWARD_INPUT, x - (p - 1 - stage)), (Op.BACKWARD_WEIGHT, x - (p - 1))]
            return [Action(stage, op, mb) for op, mb in candidates if 0 <= mb < m]

        actions = []
        # Warm-up: F alone (the first p - 1 - s rounds), then F and I, holding back every W.
        for x in range(min(p - 1, m)):
            actions += round_(x)
        # Steady state: F, I, W.
        for x in range(p - 1, m):
            actions += round_(x)
        # Cool-down: I and W, then the W still owed.
        for x in range(m, m + p - 1):
            actions += round_(x)
        compute.append(actions)
    return add_communication("zb_h1", compute, range(p), m)


def zb_v(num_stages: int, num_microbatches: int) -> Schedule:
    """Zero-bubble ZB-V (Qi et al. 2023, Sec. 6): ``num_stages`` ranks hold ``2 * p`` stages in a V.

    Rank ``r`` holds stage ``r`` (on the way down) and stage ``2p - 1 - r`` (on the way back up), so the
    first rank also computes the loss and rank ``p - 1`` hands its two stages over in memory. Backwards are
    split in ``I`` and ``W``; the warm-up fills the V, the steady state alternates the two stages, and the
    cool-down runs the input gradients first and the deferred ``W`` last.

    With ``F = I = W`` and ``m >= 2p - 1`` the step takes ``(p - 1) * F + 2m * (F + I + W)``: the only idle
    time is the last rank waiting ``(p - 1) * F`` for its first input, which no order can avoid (it holds
    for ``W <= F = I`` too; other ratios leave more, see ``tests/test_simulate.py``). Every rank holds at
    most ``2p`` stage-micro-batches of half-size stages: 1F1B's first-rank memory. Any ``p, m >= 1``.
    """
    p, m = num_stages, num_microbatches
    if p < 1:
        raise ValueError(f"zb_v: num_stages ({p}) is the number of ranks and must be >= 1")
    if m < 1:
        raise ValueError(f"zb_v: num_microbatches ({m}) must be >= 1")
    # The V needs 2p - 1 micro-batches to fill. A smaller batch runs the order built for 2p - 1 with the
    # missing micro-batches left out: dropping whole micro-batches cannot make the others wait for anything.
    padded = max(m, 2 * p - 1)
    F, I, W = Op.FORWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT
    compute = []
    for rank in range(p):
        down, up = rank, 2 * p - 1 - rank
        count = {(stage, op): 0 for stage in (down, up) for op in (F, I, W)}  # next micro-batch of each
        actions: list[Action] = []

        def run(stage: int, *ops: Op) -> None:
            for op in ops:
                actions.append(Action(stage, op, count[(stage, op)]))
                count[(stage, op)] += 1

        # Warm-up: forwards down the V until the first input reaches this rank's upper stage, forwards on both
        # stages, then the upper stage's first backwards (the loss end of the V turns them around soonest).
        for _ in range(2 * (p - rank) - 1):
            run(down, F)
        for _ in range(rank):
            run(up, F)
            run(down, F)
        for _ in range(p - rank):
            run(up, F, I, W)
        # Steady state: one micro-batch through each stage, F, I, W, until all forwards are done.
        while count[(down, F)] < padded or count[(up, F)] < count[(down, F)]:
            if count[(down, F)] < padded:
                run(down, F)
            run(down, I, W)
            run(up, F, I, W)
        # Cool-down: input gradients first (the ranks before wait on them), the deferred W last.
        for _ in range(rank):
            run(down, I)
            run(up, I)
        for _ in range(p - rank):
            run(down, I, W)
        while count[(up, W)] < padded:
            run(up, W)
        while count[(down, W)] < padded:
            run(down, W)
        compute.append([action for action in actions if action.microbatch < m])
    stage_to_rank = [stage if stage < p else 2 * p - 1 - stage for stage in range(2 * p)]
    return add_communication("zb_v", compute, stage_to_rank, m)
