"""Parameters shared by stages on different ranks (an LM head tied to the token embedding): one value, summed gradients.

On one device a tied parameter is one tensor whose gradient sums both uses. Cut into stages, each rank holding one
of the uses has its own copy. The copies start equal (broadcast from the first holder), get the same gradient (the
sum of the holders' gradients, all-reduced on a process group of just those ranks) and so take the same optimizer
step, provided every holder optimizes the parameter the same way, which :meth:`TiedParameters.check_optimizers`
checks before training starts.

A stage with several ranks (uneven replication) has a copy on each; its replicas already summed their gradients
(each holds the stage's whole contribution), so only its first rank adds it to the tie's sum, the others add zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim import Optimizer

from lightning_pipe.engine.deadline import collective
from lightning_pipe.engine.watchdog import DEFAULT_WAIT_TIMEOUT
from lightning_pipe.strategy.plain import all_gather_text, decode, encode

__all__ = ["Tie", "find_ties", "split_buffers", "TiedParameters", "refuse_renormalized_ties"]


@dataclass
class Tie:
    """One parameter used by layers of stages on several ranks."""

    names: list[str]  # its names in the sequence, one per use ("0.weight", "5.weight")
    ranks: list[int]  # the ranks holding a copy, ascending; ranks[0] is the one that counts it in norms
    adders: list[int]  # the ranks whose gradient goes into the sum: one per stage that uses it
    # A parameter of the step's own code outside the model (a learned temperature, loss weights): every rank holds
    # it, the last stage's rank (its one adder) runs that code and gives its gradient, or none, as one device would.
    step: bool = False


def find_ties(sequence: nn.Sequential, stage_sizes: Sequence[int], stage_ranks: Sequence[Sequence[int]]) -> list[Tie]:
    """The parameters of ``sequence`` that layers of stages on different ranks share, in order of first use.
    ``stage_ranks[s]``: the ranks holding stage ``s`` (one, or its replicas)."""
    layer_stage = [stage for stage, size in enumerate(stage_sizes) for _ in range(size)]
    uses: dict[int, tuple[list[str], set[int]]] = {}
    for (layer_name, layer), stage in zip(sequence._modules.items(), layer_stage):  # a repeated layer: each use
        for name, param in layer.named_parameters(remove_duplicate=False):
            names, stages = uses.setdefault(id(param), ([], set()))
            names.append(f"{layer_name}.{name}")
            stages.add(stage)
    ties = []
    for names, stages in uses.values():
        holders = sorted({rank for stage in stages for rank in stage_ranks[stage]})
        if len({stage_ranks[stage][0] for stage in stages}) > 1:  # stages on one rank share the tensor itself
            ties.append(Tie(names, holders, sorted({stage_ranks[stage][0] for stage in stages})))
    return ties


def refuse_renormalized_ties(tied: TiedParameters, modules: nn.Module) -> None:
    """Raise (on every rank alike: each finds the same ties) where a tied parameter is the weight of an embedding that
    renormalizes it in its forward (``max_norm``, among ``modules``): only the rank holding the embedding renormalizes
    its copy, in place, so the copies (a tied LM head's) drift apart, and the head computes with rows one device's
    never has (found by review: loss 9.9 where one device's is 3.7)."""
    renormalizing = {id(module.weight): name for name, module in modules.named_modules()
                     if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.max_norm is not None}
    for tie in tied.ties:
        param = tied.params.get(tie.names[0])
        name = renormalizing.get(id(param))
        if name is not None:
            uses = [use for use, held in modules.named_parameters(remove_duplicate=False) if held is param]
            raise ValueError(
                f"{type(modules).__name__}'s embedding {name!r} (max_norm={modules.get_submodule(name).max_norm}) "
                f"renormalizes its weight in its forward, in place, and that weight is tied to layers on other ranks "
                f"({', '.join(uses or tie.names)}): only the rank holding the embedding would renormalize its copy, "
                f"and the copies would drift apart. Put the embedding and the layers tied to it on one stage (a "
                f"partition giving them one stage), untie them, or drop max_norm")


def split_buffers(sequence: nn.Sequential, stage_sizes: Sequence[int],
                  stage_ranks: Sequence[Sequence[int]]) -> list[str]:
    """Modules of ``sequence`` with buffers of their own (a batch norm's running statistics) that layers of stages on
    several ranks share (a block repeated): each rank's copy takes the updates of its own places only."""
    layer_stage = [stage for stage, size in enumerate(stage_sizes) for _ in range(size)]
    places: dict[int, tuple[list[str], set[int]]] = {}
    for (layer_name, layer), stage in zip(sequence._modules.items(), layer_stage):
        for name, module in layer.named_modules(remove_duplicate=False):
            if any(True for _ in module.buffers(recurse=False)):
                names, ranks = places.setdefault(id(module), ([], set()))
                names.append(f"{layer_name}.{name}" if name else layer_name)
                ranks.add(stage_ranks[stage][0])
    return [" = ".join(names) for names, ranks in places.values() if len(ranks) > 1]


class TiedParameters:
    """This rank's copies of tied parameters, with the process groups that keep them equal.

    Construct it on every rank (it creates one process group per distinct set of holders, which every rank must
    join in the same order), before the sequence is cut, from the full sequence. With several data-parallel replicas
    of the pipeline, ``pipelines`` lists the global ranks of each replica's pipeline (in pipeline rank order): every
    rank then creates the groups of every replica, and keeps its own replica's.
    """

    def __init__(self, sequence: nn.Sequential, stage_sizes: Sequence[int], stage_ranks: Sequence[Sequence[int]],
                 group: dist.ProcessGroup | None = None, pipelines: Sequence[Sequence[int]] | None = None) -> None:
        self.ties = find_ties(sequence, stage_sizes, stage_ranks)
        self.group = group if group is not None else dist.group.WORLD
        rank = dist.get_rank(self.group)
        params = self.params = dict(sequence.named_parameters(remove_duplicate=False))
        groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self.local: list[tuple[Tie, nn.Parameter, dist.ProcessGroup]] = []
        for tie in self.ties:
            key = tuple(tie.ranks)
            if key not in groups:
                groups[key] = self._new_group(tie.ranks, pipelines)
            if rank in tie.ranks:
                self.local.append((tie, params[tie.names[0]], groups[key]))
        self._not_counted = {id(p) for tie, p, _ in self.local if tie.ranks[0] != rank}
        self._not_added = {id(p) for tie, p, _ in self.local if rank not in tie.adders}
        self.timeout = DEFAULT_WAIT_TIMEOUT  # seconds a gradient sum waits for the other holders

    def _new_group(self, ranks: list[int], pipelines: Sequence[Sequence[int]] | None) -> dist.ProcessGroup:
        """The group of pipeline ranks ``ranks`` of this rank's pipeline (collective over all ranks)."""
        if pipelines is None:
            return dist.new_group([dist.get_global_rank(self.group, r) for r in ranks])
        me, mine = dist.get_rank(), None
        for pipeline in pipelines:
            group = dist.new_group([pipeline[r] for r in ranks])
            if me in pipeline:
                mine = group
        assert mine is not None, f"rank {me} is in none of the pipelines {pipelines}"
        return mine

    def add_step_parameters(self, named: Sequence[tuple[str, nn.Parameter]], last: Sequence[int]) -> None:
        """Hold ``named`` (the step's trainable parameters outside the model, on every rank) equal on every rank of the
        pipeline: their gradient is the sum of those of pipeline ranks ``last`` (the last stage's: the step's code
        after the model runs there, each rank on its micro-batches)."""
        rank, ranks = dist.get_rank(self.group), list(range(dist.get_world_size(self.group)))
        for name, param in named:
            tie = Tie([name], ranks, sorted(last), step=True)
            self.ties.append(tie)
            self.local.append((tie, param, self.group))
            if rank != ranks[0]:
                self._not_counted.add(id(param))

    @property
    def step_names(self) -> set[str]:
        """The names of the step's parameters held here (:meth:`add_step_parameters`)."""
        return {tie.names[0] for tie in self.ties if tie.step}

    def __len__(self) -> int:
        return len(self.ties)

    def parameters(self) -> list[nn.Parameter]:
        """This rank's copies of tied parameters."""
        return [param for _, param, _ in self.local]

    @torch.no_grad()
    def synchronize_values(self) -> None:
        """Make every copy equal to the first holder's (models built on several ranks may start different)."""
        for tie, param, group in self.local:
            dist.broadcast(param.data, src=dist.get_global_rank(self.group, tie.ranks[0]), group=group)

    @torch.no_grad()
    def sum_gradients(self, grads: dict[int, torch.Tensor | None]) -> None:
        """Replace each tied copy's gradient in ``grads`` (keyed by ``id(param)``) by the sum over its holders; a
        sparse one (an ``nn.Embedding(sparse=True)``'s) is summed dense, and the sum is sparse where every holder's
        gradient is, dense where one is dense (as one device's autograd adds them)."""
        rank = dist.get_rank(self.group)
        for tie, param, group in self.local:
            grad = grads.get(id(param))
            sparse = grad is not None and grad.is_sparse
            if sparse:
                grad = grad.to_dense()
            what = f"the tied parameter {tie.names[0]}'s gradient sum"
            if tie.step:  # the adder's gradient, or none where the step gave it none (as one device leaves it)
                flat = torch.zeros(param.numel() + 1, dtype=param.dtype, device=param.device)
                if grad is not None and rank in tie.adders:
                    flat[:-1] = grad.reshape(-1)
                    flat[-1] = 1
                collective(dist.all_reduce, flat, what=what, group=group, timeout=self.timeout)
                grads[id(param)] = flat[:-1].view_as(param) if flat[-1] > 0 else None
                continue
            # the holders whose uses gave a gradient, and a dense one: none at all (frozen, or not used this step)
            # leaves it without one, as one device does, so that the optimizer skips it (no weight decay, no state)
            kinds = torch.tensor([float(grad is not None), float(grad is not None and not sparse)],
                                 device=param.device)
            collective(dist.all_reduce, kinds, what=what, group=group, timeout=self.timeout)
            present, dense = kinds.tolist()
            if not present:
                grads.pop(id(param), None)
                continue
            if grad is None:  # this holder's use got no gradient; it still takes part in the sum
                grad = torch.zeros_like(param)
            elif id(param) in self._not_added:  # a replica of a stage whose first rank adds the stage's gradient
                grad = grad.zero_()
            collective(dist.all_reduce, grad, what=what, group=group, timeout=self.timeout)
            grads[id(param)] = grad if dense else grad.to_sparse(sparse_dim=1)  # (an embedding's: its rows)

    def counts_in_norm(self, param: nn.Parameter) -> bool:
        """Whether this rank counts ``param`` in a global gradient norm (each tied parameter is counted once)."""
        return id(param) not in self._not_counted

    def tie_name(self, param: nn.Parameter) -> str | None:
        """The name that every holder of ``param`` knows it by, where it is a tied parameter's copy held here (its
        first name in the sequence); None for others."""
        return next((tie.names[0] for tie, held, _ in self.local if held is param), None)

    def check_optimizers(self, optimizers: Iterable[Optimizer], names: dict[int, str] | None = None) -> None:
        """Fail, on every rank alike, where the holders of a tied parameter would step it differently; ``names``
        (by parameter id: the module's ``named_parameters()``) names each rank's copy as its optimizer groups saw it."""
        optimizers, names = list(optimizers), names or {}
        mine = {index: [_how_optimized(param, optimizers), names.get(id(param))]
                for index, (_, param) in enumerate(self.ties_here()) if param is not None}
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else None
        everyone: list[dict[int, list]] = [decode(text) for text in all_gather_text(encode(mine), self.group, device)]
        for index, tie in enumerate(self.ties):
            seen = {rank: views[index] for rank, views in enumerate(everyone) if views and index in views}
            if len({how for how, _ in seen.values()}) > 1:
                detail = "; ".join(f"rank {rank}{f' names it {name!r}' if name else ''}: {how}"
                                   for rank, (how, name) in sorted(seen.items()))
                named = {name for _, name in seen.values() if name}
                if tie.step:
                    raise ValueError(f"the step's parameter {tie.names[0]} (outside the model) is held by every rank, "
                                     f"which would step it differently ({detail}); give it the same optimizer and "
                                     f"settings on every rank")
                listed = " and ".join(repr(name) for name in sorted(named))
                by_name = (f"; parameter groups chosen by name see the name each rank gives it ({listed}, where one "
                           f"device lists it once, under its first name): match every name it has"
                           if len(named) > 1 else "")
                raise ValueError(
                    f"the tied parameter {' = '.join(tie.names)} is held by ranks {tie.ranks}, which would step it "
                    f"differently ({detail}); configure_optimizers sees only each rank's stage, so give the tied "
                    f"parameter the same optimizer and settings on every rank, or untie it{by_name}")

    def ties_here(self) -> list[tuple[Tie, nn.Parameter | None]]:
        """Every tie, with this rank's copy or None: indices match ``self.ties``."""
        local = {id(tie): param for tie, param, _ in self.local}
        return [(tie, local.get(id(tie))) for tie in self.ties]


def _how_optimized(param: nn.Parameter, optimizers: list[Optimizer]) -> str:
    for index, optimizer in enumerate(optimizers):
        for group in optimizer.param_groups:
            if any(p is param for p in group["params"]):
                settings = {k: v for k, v in group.items() if k != "params"}
                return f"optimizer {index} {type(optimizer).__name__} {sorted(settings.items())!r}"
    return "not optimized"
