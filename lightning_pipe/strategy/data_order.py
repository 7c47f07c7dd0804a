"""Every rank of a pipeline reads the same batches: one order per epoch, from (seed, epoch), resumable mid-epoch.

Each rank of a pipeline loads the batch itself (stage 0 takes the inputs from it, the last stage the targets), so
every rank's dataloader must yield the same batches. A sampler, a dataset or a worker that draws from the global
generator does not: that generator is consumed differently on each stage (dropout in one stage's layers, nothing in
another's). :func:`share_order` gives Lightning a copy of the user's DataLoader (the user's own objects are left as
they were) that, at the start of every iteration (an epoch, or an evaluation):

- runs its samplers (``RandomSampler``, ``WeightedRandomSampler``, ``SubsetRandomSampler``, batch samplers, custom
  ones without their own ``generator``) on a private generator seeded from ``(seed, epoch)`` and swapped in around
  each draw, so they draw the same on every rank and epoch ``k``'s order is the same whether or not the run was
  interrupted (as ``DistributedSampler`` does with ``seed + epoch``); the global generator only makes the draws one
  device's iteration makes from it (:func:`_draw_as_one_device`), whose numbers are dropped;
- runs the loading in the main process (``num_workers=0``: the dataset's ``__getitem__`` and the collate function,
  random augmentations included) on a second private generator, also from ``(seed, epoch)``;
- reseeds the loader's generator, from which each iteration draws the workers' base seed, from ``(seed, epoch)``
  (and makes Lightning's ``seed_everything(workers=True)`` seed workers by data-parallel replica, not global rank);
- calls ``set_epoch`` on samplers that have one (``DistributedSampler`` across replicas): Lightning does so only after
  a DataLoader with workers has drawn its first indices;
- keeps the state the generators the user gave the loader or its samplers had when the epoch started;
- skips the batches of the epoch that were trained on before a mid-epoch checkpoint.

Lightning 2.6 resumes a plain DataLoader from a mid-epoch checkpoint by drawing a new order and taking its *first*
``len - k`` batches under the indices ``k..len-1`` (it warns that the loader is not resumable). Here a checkpoint
keeps the position, the main-process loading generator and the user's generators' epoch-start states, and the resumed
epoch continues at batch ``k`` of the order the uninterrupted run drew, with its augmentations. In workers the
augmentations restart with the workers after a mid-epoch resume: the same on every rank, but not what the
uninterrupted run drew for those batches.

Only torch's generators are swapped (Python's ``random`` and NumPy's cost ~0.1-0.4 ms each to save and restore).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from lightning_pipe.strategy.randomness import Stream, derive_seed

__all__ = ["DataStart", "SharedOrder", "share_order", "samplers_of", "check_distributed_samplers", "order_notice",
           "own_sampler_notice", "loading_notice"]


@dataclass(frozen=True)
class DataStart:
    """Where an iteration of a dataloader starts: asked for as each iteration begins."""

    seed: int
    """Seeds the iteration's private generators and the workers' base seed (the same on every rank)."""
    epoch: int
    """Given to ``set_epoch`` of samplers that have it (training only)."""
    skip: int = 0
    """Batches of this epoch trained on before a mid-epoch checkpoint."""
    training: bool = False
    loading_state: torch.Tensor | None = None
    """The main-process loading generator's state at the checkpoint (a mid-epoch resume), else a fresh one."""


def samplers_of(index_sampler: Any) -> list[Any]:
    """The sampler objects an index sampler is made of, outermost first (batch samplers, samplers, wrappers)."""
    found: list[Any] = []
    pending = [index_sampler]
    while pending:
        sampler = pending.pop(0)
        if sampler is None or any(sampler is seen for seen in found):
            continue
        found.append(sampler)
        for attribute in ("_batch_sampler", "batch_sampler", "sampler", "_sampler", "inner"):
            inner = getattr(sampler, attribute, None)
            if inner is not None and not isinstance(inner, (int, str, torch.Tensor)) and hasattr(inner, "__iter__"):
                pending.append(inner)
        dataset = getattr(sampler, "dataset", None)  # Lightning's DistributedSamplerWrapper keeps the sampler there
        if type(dataset).__name__ == "_DatasetSamplerWrapper":
            pending.append(getattr(dataset, "_sampler", None))
    return found


def check_distributed_samplers(loader: Any, replicas: int, replica: int, what: str) -> None:
    """Refuse a ``DistributedSampler`` in ``loader`` (``what`` names it) that splits the data otherwise than over the
    ``replicas`` data-parallel replicas (this rank's: ``replica``), as one the user made for DDP does (over every
    rank): the ranks of a pipeline would read different batches."""
    if not isinstance(loader, DataLoader):
        return
    for sampler in samplers_of(loader.batch_sampler if loader.batch_sampler is not None else loader.sampler):
        if not isinstance(sampler, DistributedSampler):
            continue
        if (sampler.num_replicas, sampler.rank) != (replicas, replica):
            raise ValueError(
                f"{what}'s sampler is a DistributedSampler over {sampler.num_replicas} ranks (this one as rank "
                f"{sampler.rank}), as one made for DDP: the ranks of a pipeline read the same batches (the first stage "
                f"takes the inputs, the last the targets), and PipelineStrategy shares the data among its {replicas} "
                f"data-parallel replica(s) itself. Give the DataLoader the sampler you would use on one device "
                f"(shuffle=True): with Trainer(use_distributed_sampler=True), the default, each replica reads its "
                f"share")


class _Swapped:
    """A private torch CPU generator state, swapped in for the global one while ``run`` calls a function."""

    def __init__(self, state: torch.Tensor) -> None:
        self.state = state

    def run(self, fn: Callable[[], Any]) -> Any:
        generator = torch.default_generator
        saved = generator.get_state()
        generator.set_state(self.state)
        try:
            return fn()
        finally:
            self.state = generator.get_state()
            generator.set_state(saved)


class _Iterator:
    """Each ``next`` of ``iterator`` under ``stream``, the first ``skip`` items passed over at the first ``next``:
    lazily, as an uninterrupted epoch draws, since the DataLoader draws its workers' base seed between ``iter`` and the
    first ``next`` (from the loader's own generator, if the user gave one: a shuffling sampler drawing from that
    generator at once would draw its order from another state than the uninterrupted epoch). ``drew``: called once,
    after the first ``next``, if the stream's generator was drawn from by then."""

    def __init__(self, stream: _Swapped, skip: int = 0, drew: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.iterator: Iterator[Any] = iter(())
        self.skip = skip
        self._drew = drew
        self._initial = stream.state.clone() if drew is not None else None

    def __iter__(self) -> _Iterator:
        return self

    def __next__(self) -> Any:
        try:
            return self.stream.run(self._next)
        finally:
            if self._initial is not None:  # (the first next only, where someone asked)
                drawn, self._initial = not torch.equal(self.stream.state, self._initial), None
                if drawn and self._drew is not None:
                    self._drew()

    def _next(self) -> Any:
        while self.skip:
            self.skip -= 1
            next(self.iterator)  # StopIteration: an epoch shorter than where it resumes ends at once
        return next(self.iterator)


class SharedOrder:
    """The index sampler (batch sampler or sampler) of a shared DataLoader, and the state of its iterations.

    ``start(order)`` says where an iteration of ``order`` starts; ``workers`` is the loader's generator for the workers' base seed if the
    strategy gave it one (reseeded per iteration); ``user_generators`` are generators the user gave the loader or its
    samplers (kept as they are; their state at the start of the epoch is what a resume restores).
    """

    def __init__(self, inner: Any, start: Callable[[SharedOrder], DataStart], workers: torch.Generator | None,
                 user_generators: list[torch.Generator]) -> None:
        self.inner = inner
        self._start = start
        self.samplers = samplers_of(inner)
        self.workers = workers
        self.user_generators = user_generators + [s.generator for s in self.samplers
                                                  if isinstance(getattr(s, "generator", None), torch.Generator)]
        self.epoch_start_states: list[torch.Tensor] = []
        self.loading: _Swapped | None = None  # the main-process loading stream of the current iteration
        self.training = False  # whether the current iteration is a training epoch
        self._current: DataStart | None = None  # where the current iteration started
        self._restore: list[torch.Tensor] | None = None
        self.stream = False  # its dataset is an IterableDataset that keeps no position (set by share_order)
        # called (by the strategy) where a training iteration's first draws took numbers from the order's generator
        self.said: Callable[[], None] | None = None
        # called (by the strategy) where a training iteration's first batch loaded in the main process drew numbers
        self.loading_said: Callable[[], None] | None = None

    @property
    def sampler(self) -> Any:
        """The wrapped batch sampler's sampler (Lightning calls ``set_epoch`` on it)."""
        return getattr(self.inner, "sampler", None)

    def __len__(self) -> int:
        return len(self.inner)

    def begin(self) -> DataStart:
        """Start an iteration: reseed, restore and snapshot the generators as the module's docstring says."""
        start = self._start(self)
        self._current, self.training = start, start.training
        if self.workers is not None:  # the DataLoader draws the workers' base seed from it right after iter(sampler)
            self.workers.manual_seed(derive_seed(start.seed, Stream.DATA_WORKERS))
        if start.training:
            for sampler in self.samplers:
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(start.epoch)
        if self._restore is not None:
            for generator, state in zip(self.user_generators, self._restore):
                generator.set_state(state)
            self._restore = None
        if start.training:
            self.epoch_start_states = [generator.get_state() for generator in self.user_generators]
        state = start.loading_state
        if state is None:
            state = torch.Generator().manual_seed(derive_seed(start.seed, Stream.DATA_LOADING)).get_state()
        self.loading = _Swapped(state)
        return start

    def __iter__(self) -> Iterator[Any]:
        # The loader begins each iteration; a DataLoader with workers then calls iter() twice (in its iterator's
        # __init__ and _reset): both get the same start, and so the same order.
        start = self._current or self.begin()
        stream = _Swapped(torch.Generator().manual_seed(derive_seed(start.seed, Stream.DATA_ORDER)).get_state())
        order = _Iterator(stream, start.skip, self.said if start.training else None)
        order.iterator = order.stream.run(lambda: iter(self.inner))  # some samplers draw as their iteration starts
        return order

    def state_dict(self, finished: bool = False) -> dict[str, Any]:
        """What a resume restores: the user's generators' states at the start of this epoch and the main-process
        loading generator's state now; once the epoch has ``finished``, the user's generators' states now (the next
        epoch starts from those; the loading generator is seeded afresh)."""
        if finished:
            return {"generators": [g.get_state() for g in self.user_generators], "loading": None}
        return {"generators": [state.clone() for state in self.epoch_start_states],
                "loading": self.loading.state.clone() if self.loading is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the user's generators to the states in ``state`` when the next iteration begins."""
        states = list(state.get("generators", []))
        if len(states) == len(self.user_generators):
            self._restore = states


_SHARED_CLASSES: dict[type, type] = {}


def _shared_class(cls: type) -> type:
    """A subclass of the user's DataLoader class whose iteration begins its order and loads under its stream."""
    if cls not in _SHARED_CLASSES:
        def __iter__(self: Any) -> Any:
            order: SharedOrder = self._pipeline_order
            order.begin()
            _draw_as_one_device(self, order)
            if self.num_workers > 0:  # the dataset runs in the workers, seeded from the loader's generator
                return cls.__iter__(self)
            assert order.loading is not None
            inner = order.loading.run(lambda: cls.__iter__(self))
            iterator = _Iterator(order.loading, drew=order.loading_said if order.training else None)
            iterator.iterator = inner
            return iterator

        _SHARED_CLASSES[cls] = type(cls.__name__, (cls,), {"__iter__": __iter__, "__module__": cls.__module__,
                                                           "__qualname__": cls.__qualname__,
                                                           "__doc__": cls.__doc__})
    return _SHARED_CLASSES[cls]


def _draw_as_one_device(loader: DataLoader, order: SharedOrder) -> None:
    """Draw from torch's global generator what one device's DataLoader draws from it as an iteration starts, and
    drop the numbers: its workers' base seed (a loader without a generator of its own; a persistent workers'
    iterator draws it once), and the order of torch's shuffling samplers without one. The shared loader draws those
    from its private generators, so without this a script's draws after a ``validate``, ``test`` or ``predict``
    (a ``random_split`` in ``setup("fit")``), or after a fit of a model that draws nothing itself, were not one
    device's (found by review). The draws of a sampler of one's own are not known: not made."""
    if order.workers is not None and not (loader.persistent_workers and loader._iterator is not None):
        torch.empty((), dtype=torch.int64).random_()
    for sampler in order.samplers:
        if getattr(sampler, "generator", False) is not None:
            continue
        if type(sampler) is RandomSampler:
            torch.empty((), dtype=torch.int64).random_()
        elif type(sampler) is SubsetRandomSampler:
            torch.randperm(len(sampler.indices))
        elif type(sampler) is WeightedRandomSampler:
            torch.multinomial(sampler.weights, sampler.num_samples, sampler.replacement)


def share_order(loader: Any, start: Callable[[SharedOrder], DataStart], replica: int) -> Any:
    """A copy of ``loader`` (a DataLoader; anything else is returned as it is) that reads the same batches on every
    rank, with its index sampler wrapped in a :class:`SharedOrder` (``loader._pipeline_order``). ``replica`` is the
    rank's data-parallel replica: Lightning's worker seeding (``seed_everything(workers=True)``) uses it instead of the
    global rank, which differs along a pipeline."""
    if not isinstance(loader, DataLoader) or hasattr(loader, "_pipeline_order"):
        return loader
    shared = copy.copy(loader)
    shared.__class__ = _shared_class(type(loader))
    shared._iterator = None  # a persistent-workers iterator belongs to the original
    user_generators = []
    if shared.generator is None:
        shared.generator = workers = torch.Generator()
    else:
        workers, user_generators = None, [shared.generator]
    init = shared.worker_init_fn
    if (init is None and int(os.environ.get("PL_SEED_WORKERS", "0"))) or (
            isinstance(init, functools.partial) and init.func is pl_worker_init_function):
        shared.worker_init_fn = functools.partial(pl_worker_init_function, rank=replica)
    batch_sampler = shared.batch_sampler
    if type(batch_sampler).__name__ == "_IndexBatchSamplerWrapper":  # Lightning's own, made for this run
        order = batch_sampler._batch_sampler = SharedOrder(batch_sampler._batch_sampler, start, workers,
                                                           user_generators)
    elif batch_sampler is not None:
        order = SharedOrder(batch_sampler, start, workers, user_generators)
        object.__setattr__(shared, "batch_sampler", order)  # DataLoader refuses a plain setattr after __init__
    else:
        order = SharedOrder(shared.sampler, start, workers, user_generators)
        object.__setattr__(shared, "sampler", order)
    shared._pipeline_order = order
    # a stream (an IterableDataset) has no indices to pass over at a mid-epoch resume: it starts again, as on one
    # device, unless its loader keeps the position (Lightning restores a loader's state_dict: torchdata's
    # StatefulDataLoader)
    order.stream = isinstance(shared.dataset, torch.utils.data.IterableDataset) \
        and not (callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)))
    return shared


_SHUFFLING = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def order_notice(loader: Any) -> str | None:
    """What to say of a training DataLoader that shuffles with the global generator (``shuffle=True``, or torch's
    shuffling sampler inside a batch sampler, with no generator of its own): its order is drawn from the seed the
    ranks agreed on, not one device's (found by review: a run compared with one device's differed from its first
    batch, with no word at run time; a BatchSampler over a RandomSampler too); None for others."""
    if getattr(loader, "generator", None) is not None:
        return None
    index = getattr(loader, "batch_sampler", None)  # (not `or`: an IterableDataset's sampler has no len())
    index = getattr(loader, "sampler", None) if index is None else index
    found = [sampler for sampler in samplers_of(index)
             if isinstance(sampler, _SHUFFLING) and getattr(sampler, "generator", None) is None]
    if not found:
        return None
    if found[0] is getattr(loader, "sampler", None) and type(found[0]) is RandomSampler \
            and type(getattr(loader, "batch_sampler", None)) is torch.utils.data.BatchSampler:
        return ("the training DataLoader shuffles (shuffle=True) with torch's global generator: " + _NOT_ONE_ORDER +
                "give the DataLoader a generator of its own (DataLoader(..., shuffle=True, "
                "generator=torch.Generator().manual_seed(0))): both then read the same order")
    return (f"the training DataLoader's {type(found[0]).__name__} shuffles with torch's global generator: " +
            _NOT_ONE_ORDER + f"give the {type(found[0]).__name__} a generator of its own (generator=torch.Generator()"
            f".manual_seed(0)): both then read the same order")


_NOT_ONE_ORDER = ("under PipelineStrategy every rank draws each epoch's order from a seed they agree on, so the "
                  "batches come in another order than one device's. To compare a run with one device's, ")


def loading_notice() -> str:
    """What to say of a training DataLoader whose first batch, loaded in the main process, drew from torch's global
    generator (random augmentations in the dataset's ``__getitem__`` or the collate_fn): its draws are the agreed
    seed's, not one device's (found by review: a run compared with one device's after the order notice's fix still
    differed, with no word)."""
    return ("the training DataLoader's loading in the main process (num_workers=0: the dataset's __getitem__ or the "
            "collate_fn, random augmentations or masks) draws from torch's global generator: under PipelineStrategy "
            "it draws from a generator seeded from the seed the ranks agree on, the same on every rank, but not the "
            "numbers one device's run draws. To compare a run with one device's, load in workers (num_workers=1 or "
            "more) and give the DataLoader a generator of its own (generator=torch.Generator().manual_seed(0)): "
            "the workers' seeds then come from it as one device's do")


def own_sampler_notice(order: SharedOrder) -> str | None:
    """What to say of a training order whose first draws took numbers from torch's global generator (swapped for the
    order's own) through a sampler of the user's class (a length-bucketing batch sampler shuffling its buckets with
    ``torch.randperm``): not one device's order (found by review: silent before); None for torch's own samplers,
    which :func:`order_notice` names at set-up."""
    own = [sampler for sampler in order.samplers if type(sampler).__module__.split(".")[0] not in ("torch",
                                                                                                   "lightning")]
    if not own or any(isinstance(sampler, _SHUFFLING) and getattr(sampler, "generator", None) is None
                      for sampler in order.samplers):
        return None
    name = type(own[0]).__name__
    return (f"the training DataLoader's sampler {name} draws its order from torch's global generator: " +
            _NOT_ONE_ORDER + f"give {name} (or a sampler it draws from) a torch.Generator of its own, seeded, and "
            f"draw from it (torch.randperm(n, generator=self.generator)): both then read the same order")
