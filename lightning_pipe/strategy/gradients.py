"""Gradients of a pipeline step in Lightning's optimizer closure: held aside from zero_grad, clipped by the global norm.

Lightning's automatic optimization runs ``training_step``, then ``zero_grad``, then ``backward``. The pipeline runs
forward and backward of every micro-batch inside ``training_step`` (the loss, the logs and the schedule's order of
forwards and backwards belong together), so its gradients exist before Lightning zeroes them. They are set aside
until Lightning calls ``backward`` and added then, which is exactly where a single device would have produced them,
so ``zero_grad``, gradient accumulation and the hooks around backward behave as on one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from lightning_pipe.engine.deadline import collective
from lightning_pipe.engine.watchdog import DEFAULT_WAIT_TIMEOUT

if TYPE_CHECKING:
    from lightning_pipe.engine.notices import PipelineError
    from lightning_pipe.strategy.tied import TiedParameters

    Notices = Callable[[str], Callable[[], PipelineError | None]]  # a notice for a collective, from what it is

__all__ = ["HeldGradients", "clip_grad_norm_global", "GlobalNorms", "GLOBAL_NORM"]

GLOBAL_NORM = "the global gradient norm's all_reduce"  # what the ranks wait in there (its start)


class HeldGradients:
    """The gradients one pipeline step produced, waiting for Lightning's ``backward`` to hand them over."""

    def __init__(self) -> None:
        self._pending: list[tuple[nn.Parameter, torch.Tensor]] = []

    @contextmanager
    def held_aside(self, parameters: Iterable[nn.Parameter], keep_before: bool = True) -> Iterator[None]:
        """Inside, the parameters' gradients start empty; what accumulates there is kept for :meth:`release`,
        and the gradients from before are put back (``keep_before``), or freed now: when ``zero_grad`` would drop them
        before anything reads them again, keeping them would hold two sets of gradients at the step's peak."""
        params = list(parameters)
        before = [p.grad if keep_before else None for p in params]
        for p in params:
            p.grad = None
        try:
            yield
            self._pending = [(p, p.grad) for p in params if p.grad is not None]
        finally:
            for p, grad in zip(params, before):
                p.grad = grad

    def release(self, tied: TiedParameters | None = None) -> None:
        """Add the held gradients to the parameters' gradients (Lightning may have zeroed those in between).

        With ``tied``, each tied copy's held gradient is first replaced by the sum over the ranks holding a copy.
        """
        pending, self._pending = self._pending, []
        params = {id(p): p for p, _ in pending}
        held: dict[int, torch.Tensor | None] = {id(p): g for p, g in pending}
        if tied is not None and len(tied):
            for param in tied.parameters():
                params.setdefault(id(param), param)
            tied.sum_gradients(held)
        for key, param in params.items():
            grad = held.get(key)
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)


@torch.no_grad()
def clip_grad_norm_global(parameters: Iterable[nn.Parameter] | torch.Tensor, max_norm: float,
                          counts: Callable[[nn.Parameter], bool] = lambda p: True,
                          group: dist.ProcessGroup | None = None,
                          timeout: float = DEFAULT_WAIT_TIMEOUT, norm_type: float = 2.0,
                          error_if_nonfinite: bool = False, reduce: bool = True,
                          notices: Notices | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the parameters of all ranks of ``group``: returns the global norm.

    Every rank scales its gradients by the same factor, computed from the ``norm_type``-norm of all stages' gradients
    together (a parameter for which ``counts`` is False, such as a tied parameter's second copy, is left out of the
    norm); ``reduce=False``: of this rank's alone (one parameter, which one rank holds). ``notices``: the failure a
    rank posted while this one waits in the collective (:func:`~lightning_pipe.engine.deadline.job_failure_notice`),
    raised at once.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    params = [p for p in params if p.grad is not None]
    max_norm = float(max_norm)
    total = _global_norm([p.grad for p in params if counts(p)], norm_type, group, timeout, error_if_nonfinite, reduce,
                         max_norm=max_norm, notices=notices)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
    return total


_WIDE = (torch.float64, torch.complex128)


def _global_norm(grads: list[torch.Tensor], norm_type: float, group: dist.ProcessGroup | None, timeout: float,
                 error_if_nonfinite: bool, reduce: bool = True, max_norm: float | None = None,
                 notices: Notices | None = None) -> torch.Tensor:
    """The ``norm_type``-norm of this rank's ``grads`` and every other rank's of ``group`` together (``reduce``;
    else of this rank's alone). ``max_norm``: a clip's threshold, which every rank must give alike (compared in the
    same collective; an error on every rank where not)."""
    reduce = reduce and dist.is_initialized()
    device = grads[0].device if grads else torch.device("cpu")
    if reduce:
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    norm_type = float(norm_type)
    infinite = norm_type == float("inf")
    # (a complex gradient's norm is its magnitudes', as torch's; half-precision ones' in float32, float64 ones' in
    # float64 (64-true), which torch refuses to narrow; every rank adds up in float64, whatever its own gradients)
    norms = [torch.linalg.vector_norm(grad.abs() if grad.is_complex() else grad, norm_type,
                                      dtype=torch.float64 if grad.dtype in _WIDE else torch.float32).to(device)
             for grad in grads]
    total = torch.zeros((), dtype=torch.float64, device=device)
    if norms:  # this rank's part: the largest magnitude, or the sum of the norms' powers
        stacked = torch.stack(norms).to(torch.float64)
        total = stacked.max() if infinite else (stacked ** norm_type).sum()
    if reduce:
        # the thresholds ride along: their largest and smallest (as a largest of negatives), or the sums of
        # _spread_terms, which say whether every rank gave the same
        given = [] if max_norm is None else [max_norm, -max_norm] if infinite else _spread_terms(max_norm)
        values = torch.stack([total, *(torch.tensor(value, dtype=torch.float64, device=device) for value in given)])
        what = f"{GLOBAL_NORM} (clip_grad_norm_, get_total_norm or grad_norm's total, which every rank reads alike)"
        collective(dist.all_reduce, values, what=what, group=group, timeout=timeout,
                   notice=notices(what) if notices is not None else None,
                   op=dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM)
        total = values[0]
        if given:
            _refuse_other_thresholds(max_norm, values[1:].tolist(), infinite, dist.get_world_size(group))
    if not infinite:
        total = total ** (1.0 / norm_type)
    total = total.to(torch.float64 if any(grad.dtype in _WIDE for grad in grads) else torch.float32)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so "
                           f"it cannot be clipped. To disable this error and scale the gradients by the non-finite "
                           f"norm anyway, set `error_if_nonfinite=False`")
    return total


def _spread_terms(max_norm: float) -> list[float]:
    """What a rank adds to the sums that tell whether every rank gave the same threshold: whether it is infinite (no
    clipping: the way to measure the norm alone), and a bounded function of it and its square (no overflow)."""
    if math.isinf(max_norm):
        return [1.0, 0.0, 0.0]
    bounded = max_norm / (1.0 + abs(max_norm))
    return [0.0, bounded, bounded * bounded]


def _refuse_other_thresholds(max_norm: float, reduced: list[float], by_max: bool, ranks: int) -> None:
    """Raise (on every rank alike) where the ranks clipped by other thresholds: ``reduced`` is their largest and
    minus their smallest (``by_max``), or the sums of :func:`_spread_terms` over ``ranks``."""
    if by_max:
        high, low = reduced[0], -reduced[1]
        if high == low or math.isfinite(high - low) and high - low <= 1e-6 * max(abs(high), abs(low), 1e-12):
            return  # (every rank infinite, too)
        what = f"from {low:.4g} to {high:.4g}; "
    else:
        infinite, total, squares = reduced
        if infinite in (0.0, float(ranks)) and (infinite or _close(total, squares, ranks)):
            return
        what = ""
    raise ValueError(
        f"clip_grad_norm_ was given another max_norm on each rank ({what}{max_norm:.4g} on this one): under "
        f"PipelineStrategy every rank clips its own stages' gradients by the norm over every rank, so the threshold "
        f"must be the same everywhere. One computed from this rank's parameters (a history of norms summed by hand "
        f"over pl_module.parameters(), as AutoClip keeps) covers this rank's share alone. Compute it from the norm "
        f"clip_grad_norm_ returns, or from torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters() if "
        f"p.grad is not None]): both are every rank's")


def _close(total: float, squares: float, ranks: int) -> bool:
    """Whether values whose sum is ``total`` and sum of squares ``squares`` over ``ranks`` are all alike (to rounding:
    their spread, computed so, carries an error of about sqrt(ranks) * 1e-8 of their size)."""
    mean = total / ranks
    spread = max(squares / ranks - mean * mean, 0.0) ** 0.5
    return spread <= 1e-5 * max(abs(mean), 1e-12)


class GlobalNorms:
    """Stand-ins for torch's ``clip_grad_norm_`` and ``get_total_norm`` (their signatures) that take the norm over
    every rank of ``group``: for the hooks where one device clips (the gradient hooks, ``configure_gradient_clipping``,
    ``optimizer_step``), which every rank runs over its own stages' parameters. ``counts``: whether a parameter's
    gradient counts in the norm (a tied parameter's second copy does not); ``parameters``: the module's, to tell the
    parameter of a gradient ``get_total_norm`` is given; ``groups``: the optimizers' parameter groups' lists (each
    rank's share of a group); ``listings``: a context inside which the cut sequences note the layers the user's
    listings of their modules give, and which yields them (:func:`~.split.listings_of`; :meth:`listings`);
    ``notices``: as for :func:`clip_grad_norm_global`."""

    def __init__(self, group: dist.ProcessGroup | None, counts: Callable[[nn.Parameter], bool], timeout: float,
                 parameters: Callable[[], Iterable[nn.Parameter]] = lambda: (),
                 groups: Callable[[], Iterable[list[torch.Tensor]]] = lambda: (),
                 listings: Callable[[], AbstractContextManager[list[Any]]] = lambda: nullcontext([]),
                 notices: Notices | None = None) -> None:
        self.group, self.counts, self.timeout, self.parameters = group, counts, timeout, parameters
        self.groups, self._listings, self.notices = groups, listings, notices
        self._listing: list[Any] = []
        self.alone: list[torch.Tensor] = []  # the parameters given one at a time and clipped alone (:meth:`listings`)

    @contextmanager
    def listings(self) -> Iterator[None]:
        """Inside (a hook), the cut sequences note which of this rank's layers a listing of their modules gave."""
        with self._listings() as sequences:
            self._listing, self.alone = sequences, []
            try:
                yield
            finally:
                self._listing = []

    def clip_grad_norm_(self, parameters: Iterable[nn.Parameter] | torch.Tensor, max_norm: float,
                        norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        owner = _caller(parameters)
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if owner is not None and any(sequence.listed_here(owner) for sequence in self._listing):
            # layer.parameters() of a layer of a cut sequence that a listing of its modules gave (a loop clipping
            # each layer: each rank lists its own layers and makes its own calls): clipped here alone
            return clip_grad_norm_global(params, max_norm, lambda p: True, None, self.timeout, norm_type,
                                         error_if_nonfinite, reduce=False)
        one = isinstance(parameters, torch.Tensor) or (isinstance(parameters, (list, tuple)) and len(params) == 1
                                                       and not self._all_held(params[0])
                                                       and not self._a_group(params[0]))
        if one:  # one parameter given as such (p, [p]), which one rank holds: clipped alone (a loop over the
            # parameters, whose calls the ranks make as many times as they hold parameters); an iterator
            # (module.parameters()) is every rank's share of a whole, even where this rank holds one of it, and so is
            # a list of the one parameter this rank trains (list(self.parameters()) on a rank holding one) or an
            # optimizer's group holds here (clipping each group by its norm: for g in opt.param_groups)
            self.alone.append(params[0])
            return clip_grad_norm_global(params, max_norm, lambda p: True, None, self.timeout, norm_type,
                                         error_if_nonfinite, reduce=False)
        return clip_grad_norm_global(params, max_norm, self.counts, self.group, self.timeout, norm_type,
                                     error_if_nonfinite, notices=self.notices)

    def _all_held(self, parameter: torch.Tensor) -> bool:
        """Whether ``parameter`` is the only trainable parameter of the module on this rank."""
        trained = [p for p in self.parameters() if p.requires_grad]
        return len(trained) == 1 and trained[0] is parameter

    def _a_group(self, parameter: torch.Tensor) -> bool:
        """Whether ``parameter`` is the only one an optimizer's parameter group holds on this rank."""
        return any(len(params) == 1 and params[0] is parameter for params in self.groups())

    def get_total_norm(self, tensors: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2.0,
                       error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
        if isinstance(tensors, torch.Tensor):  # one parameter's gradient: its own norm (see clip_grad_norm_)
            return _global_norm([tensors], norm_type, self.group, self.timeout, error_if_nonfinite, reduce=False)
        grads = list(tensors)
        owners = {id(p.grad): p for p in self.parameters() if p.grad is not None}
        kept = [grad for grad in grads if id(grad) not in owners or self.counts(owners[id(grad)])]
        return _global_norm(kept, norm_type, self.group, self.timeout, error_if_nonfinite, notices=self.notices)


def _caller(parameters: object) -> nn.Module | None:
    """The module whose ``parameters()`` made the generator ``parameters`` (not yet started), else None."""
    frame = getattr(parameters, "gi_frame", None)
    if frame is None or getattr(parameters, "gi_code", None) is not nn.Module.parameters.__code__:
        return None
    owner = frame.f_locals.get("self")
    return owner if isinstance(owner, nn.Module) else None
