"""The executor: runs this rank's part of a pipeline by following its schedule's action list, and nothing else."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from lightning_pipe.engine.comm import Communicator, PipelineError
from lightning_pipe.engine.microbatch import microbatch_weights, split_batch
from lightning_pipe.engine.partition import Partition, cut, stage_sizes
from lightning_pipe.engine.runtime import configure_threads, local_world_size
from lightning_pipe.engine.schedules import Action, Op, Schedule, forward_only, get_schedule, gpipe
from lightning_pipe.engine.trace import Record
from lightning_pipe.engine.stage import PipelineStage
from lightning_pipe.engine.tree import tree_map_tensors

__all__ = ["Pipeline", "default_input_fn"]

LossFn = Callable[[Any, Any], torch.Tensor]  # (last stage output, micro-batch) -> mean loss of the micro-batch


def default_input_fn(microbatch: Any) -> Any:
    """What the first stage takes from a micro-batch: the first element of a tuple/list, else the whole of it."""
    return microbatch[0] if isinstance(microbatch, (tuple, list)) else microbatch


class Pipeline:
    """This rank's share of a pipeline-parallel model, trained one batch at a time by a schedule.

    Every rank of ``group`` builds the same ``layers`` and calls the same methods with the same batch; each
    keeps only its own stage(s). ``train_step(batch)`` splits the batch into micro-batches, runs forward and
    backward of all of them in the schedule's order and leaves each parameter's gradient equal to the gradient
    of the mean loss over the whole batch, as on one device. The optimizer step is the caller's::

        pipe = Pipeline(model, schedule="1f1b", num_microbatches=8, loss_fn=F.cross_entropy)
        opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
        loss = pipe.train_step((x, y))      # the batch loss on the last stage's rank, None elsewhere
        opt.step(); opt.zero_grad()

    ``loss_fn(output, microbatch)`` runs on the last stage and must return the micro-batch's *mean* loss; the
    executor weights it by the micro-batch's share of rows, so uneven splits stay exact. ``input_fn`` picks the
    first stage's input from a micro-batch (default: element 0 of a tuple, else the micro-batch).
    """

    def __init__(
        self,
        layers: nn.Sequential | Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        schedule: str = "1f1b",
        num_microbatches: int = 4,
        partition: Partition = "uniform",
        input_fn: Callable[[Any], Any] = default_input_fn,
        checkpoint_activations: bool = False,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        record: bool = False,
        **schedule_options: int,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Pipeline needs torch.distributed: call dist.init_process_group() on every rank first")
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches ({num_microbatches}) must be >= 1")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.num_ranks = dist.get_world_size(self.group)
        configure_threads(local_world_size(default=self.num_ranks))
        if device is None:
            nccl = dist.get_backend(self.group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.schedule_name = schedule
        self.schedule_options = schedule_options
        self.num_microbatches = num_microbatches
        self.loss_fn = loss_fn
        self.input_fn = input_fn
        self.record = record
        self.records: list[tuple[Action, float, float]] = []
        self.error_grace_s = 5.0  # how long a failing rank waits for its neighbours to take its error notice

        layers = list(layers) if not isinstance(layers, nn.Sequential) else layers
        plan = self.schedule_for(num_microbatches)  # also validates the schedule's arguments
        self.num_stages = plan.num_stages
        try:
            sizes = stage_sizes(layers, self.num_stages, partition)
        except ValueError as error:
            raise ValueError(f"{error} (the pipeline has {self.num_ranks} ranks and {self.num_stages} stages)") from None
        self.stage_sizes = sizes
        modules = cut(layers, sizes)
        self.stage_to_rank = plan.stage_to_rank
        self.stages: dict[int, PipelineStage] = {
            index: PipelineStage(modules[index].to(self.device), index, self.num_stages, self.device,
                                 checkpoint_activations)
            for index in plan.stages_of(self.rank)
        }
        if any(action.op is Op.BACKWARD_INPUT for action in plan.actions[self.rank]):
            for stage in self.stages.values():
                stage.enable_split_backward()
        self.comm = Communicator(self.group, self.device)

    # -- public API -------------------------------------------------------------------------------
    @property
    def is_last_rank(self) -> bool:
        """Whether this rank holds the last stage (where the loss and the outputs are)."""
        return self.num_stages - 1 in self.stages

    def modules(self) -> list[nn.Module]:
        """This rank's stage modules, in stage order."""
        return [self.stages[index].module for index in sorted(self.stages)]

    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of this rank's stages: give these to the optimizer."""
        for module in self.modules():
            yield from module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of this rank's stages, named as in the full model (``"3.weight"``)."""
        for module in self.modules():
            yield from module.named_parameters()

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of the full model's ``state_dict`` (same keys as the unpipelined layers)."""
        state: dict[str, Any] = {}
        for module in self.modules():
            state.update(module.state_dict())
        return state

    def schedule_for(self, num_microbatches: int) -> Schedule:
        """The schedule run for a batch of ``num_microbatches`` micro-batches.

        A last partial batch may split into a count the schedule refuses (interleaved_1f1b needs a multiple of
        the ranks); it then runs fill-drain over the same stage placement, which takes any count.
        """
        cache = self.__dict__.setdefault("_schedules", {})
        if num_microbatches not in cache:
            try:
                plan = get_schedule(self.schedule_name, self.num_ranks, num_microbatches, **self.schedule_options)
            except ValueError:
                if num_microbatches >= self.num_microbatches or not cache:
                    raise
                plan = gpipe(self.num_stages, num_microbatches, self.stage_to_rank)
            cache[num_microbatches] = (plan, _outgoing_channels(plan, self.rank))
        return cache[num_microbatches][0]

    def take_records(self) -> list[Record]:
        """What this rank ran since the last call (with ``record=True``): one Record per action, timed on
        ``time.perf_counter``, which all processes of one machine share."""
        records = [Record(self.rank, action, start, end) for action, start, end in self.records]
        self.records.clear()
        return records

    def train_step(self, batch: Any, loss_scale: float = 1.0) -> torch.Tensor | None:
        """Forward and backward of ``batch``; gradients accumulate into the parameters.

        The gradients are those of ``loss_scale`` times the batch's mean loss (e.g. ``1 / accumulation steps``).
        Returns the batch's mean loss (detached, unscaled) on the rank that holds the last stage, ``None`` on
        the others.
        """
        if self.loss_fn is None:
            raise ValueError("train_step needs a loss: construct the Pipeline with loss_fn=(output, microbatch) -> loss")
        losses, _ = self._run(batch, training=True, loss_scale=loss_scale)
        return torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def eval_step(self, batch: Any) -> tuple[torch.Tensor | None, list[Any] | None]:
        """Forward only. On the last stage's rank returns (mean loss or None without loss_fn, the micro-batch
        outputs in order); on the other ranks (None, None)."""
        losses, outputs = self._run(batch, training=False)
        if not self.is_last_rank:
            return None, None
        return (torch.stack(losses).sum() if losses else None), outputs

    # -- running a schedule -----------------------------------------------------------------------
    def _run(self, batch: Any, training: bool, loss_scale: float = 1.0) -> tuple[list[torch.Tensor], list[Any]]:
        microbatches = split_batch(batch, self.num_microbatches)
        self.schedule_for(len(microbatches))
        if training:
            plan, outgoing = self.__dict__["_schedules"][len(microbatches)]
        else:
            plan = forward_only(self.num_stages, len(microbatches), self.stage_to_rank)
            outgoing = _outgoing_channels(plan, self.rank)
        state = _StepState(microbatches, microbatch_weights(microbatches) if self.loss_fn else [], loss_scale)
        handlers = self._handlers(state, training)
        action: Action | None = None
        try:
            if self.record:
                clock = time.perf_counter
                for action in plan.actions[self.rank]:
                    start = clock()
                    handlers[action.op](action)
                    self.records.append((action, start, clock()))
            else:
                for action in plan.actions[self.rank]:
                    handlers[action.op](action)
            self.comm.wait_sends()
        except PipelineError as error:  # another rank failed: pass its error on, then end with it
            self._abort(outgoing, str(error), error.origin_rank)
            raise
        except Exception as error:
            where = f"in {action}" if action is not None else "before its first action"
            message = (f"rank {self.rank} failed {where}: {type(error).__name__}: {error}\n"
                       f"--- traceback on rank {self.rank} ---\n{traceback.format_exc()}")
            self._abort(outgoing, message, self.rank)
            raise PipelineError(message, self.rank) from error
        return state.losses, state.outputs

    def _abort(self, outgoing: set[tuple[int, int]], message: str, origin_rank: int) -> None:
        for dst, tag in outgoing:
            self.comm.send_error(message, origin_rank, dst, tag)
        self.comm.drain(timeout=self.error_grace_s)
        for stage in self.stages.values():
            stage.clear()

    def _handlers(self, state: _StepState, training: bool) -> dict[Op, Callable[[Action], None]]:
        stages, comm, to_rank, last = self.stages, self.comm, self.stage_to_rank, self.num_stages - 1

        def forward(action: Action) -> None:
            index, _, mb = action
            if index == 0:
                inputs = tree_map_tensors(lambda t: t.to(self.device, non_blocking=True),
                                          self.input_fn(state.microbatches[mb]))
            else:
                inputs = state.activations.pop((index, mb))
            output = stages[index].forward(mb, inputs)
            if index == last:
                if self.loss_fn is not None:
                    loss = self.loss_fn(output, state.microbatches[mb]) * state.weights[mb]
                    if training:
                        stages[index].hold(mb, loss * state.loss_scale if state.loss_scale != 1.0 else loss)
                    state.losses.append(loss.detach())
                if not training:
                    state.outputs.append(output)
            elif to_rank[index + 1] == self.rank:  # the next stage is ours too: hand over in memory
                state.activations[(index + 1, mb)] = tree_map_tensors(_as_leaf, output)
            else:
                state.to_send[(index, mb)] = output

        def backward(action: Action) -> None:
            index, op, mb = action
            grads = None if index == last else state.gradients.pop((index, mb))
            stage = stages[index]
            input_grads = stage.backward(mb, grads) if op is Op.BACKWARD else stage.backward_input(mb, grads)
            if index == 0:
                return
            if to_rank[index - 1] == self.rank:
                state.gradients[(index - 1, mb)] = input_grads
            else:
                state.to_send[(index, mb)] = input_grads

        def backward_weight(action: Action) -> None:
            stages[action.stage].backward_weight(action.microbatch)

        def send_activation(action: Action) -> None:
            index, _, mb = action
            comm.send(state.to_send.pop((index, mb)), to_rank[index + 1], _tag("F", index))

        def recv_activation(action: Action) -> None:
            index, _, mb = action
            state.activations[(index, mb)] = comm.recv(to_rank[index - 1], _tag("F", index - 1))

        def send_grad(action: Action) -> None:
            index, _, mb = action
            comm.send(state.to_send.pop((index, mb)), to_rank[index - 1], _tag("B", index))

        def recv_grad(action: Action) -> None:
            index, _, mb = action
            state.gradients[(index, mb)] = comm.recv(to_rank[index + 1], _tag("B", index + 1))

        return {
            Op.FORWARD: forward,
            Op.BACKWARD: backward,
            Op.BACKWARD_INPUT: backward,
            Op.BACKWARD_WEIGHT: backward_weight,
            Op.SEND_ACTIVATION: send_activation,
            Op.RECV_ACTIVATION: recv_activation,
            Op.SEND_GRAD: send_grad,
            Op.RECV_GRAD: recv_grad,
        }


class _StepState:
    """What moves between the actions of one step on one rank."""

    __slots__ = ("microbatches", "weights", "loss_scale", "activations", "gradients", "to_send", "losses", "outputs")

    def __init__(self, microbatches: list[Any], weights: list[float], loss_scale: float) -> None:
        self.microbatches = microbatches
        self.weights = weights
        self.loss_scale = loss_scale
        self.activations: dict[tuple[int, int], Any] = {}  # (stage, mb) -> input of that stage
        self.gradients: dict[tuple[int, int], Any] = {}  # (stage, mb) -> gradient of that stage's output
        self.to_send: dict[tuple[Any, ...], Any] = {}  # (stage, mb) -> tree the next send action sends
        self.losses: list[torch.Tensor] = []
        self.outputs: list[Any] = []


def _tag(kind: str, sending_stage: int) -> int:
    """Channel of a message: one per (kind, sending stage), so messages of different stages never mix."""
    return 2 * sending_stage + (0 if kind == "F" else 1)


def _as_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """Cut the autograd graph between two stages held by one rank, as a send would."""
    return tensor.detach().requires_grad_(tensor.requires_grad)


def _outgoing_channels(plan: Schedule, rank: int) -> set[tuple[int, int]]:
    """(peer rank, tag) of every channel ``rank`` writes to: where an error must be announced."""
    channels = set()
    for stage, op, _ in plan.actions[rank]:
        if op is Op.SEND_ACTIVATION:
            channels.add((plan.stage_to_rank[stage + 1], _tag("F", stage)))
        elif op is Op.SEND_GRAD:
            channels.add((plan.stage_to_rank[stage - 1], _tag("B", stage)))
    return channels

