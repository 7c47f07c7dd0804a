"""What each action does: the functions the executor calls, one per compute op and one for a step's messages, and the
state they pass along."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from .anomaly import check_finite, check_gradients
from .comm import Communicator
from .microbatch import owned
from .schedules import Action, Op, Schedule
from .schedules.transfers import Step
from .stage import PipelineStage
from .tree import tree_map_tensors

__all__ = ["RankView", "StepState", "make_handlers", "make_exchange"]


class RankView(Protocol):
    """What the handlers read of the rank's pipeline (:class:`~.executor.Pipeline` is one)."""

    rank: int
    num_stages: int
    device: torch.device
    stages: dict[int, PipelineStage]
    comm: Communicator
    input_fn: Callable[[Any], Any]
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    vertical_sync: bool
    update_every_microbatch: bool
    optimizer_step_fn: Callable[[], Any]
    detect_anomaly: bool
    step_name: str | None
    train_steps: int

    def version_for(self, stage_index: int, microbatch_id: int) -> int: ...

    def forward_seed(self, stage_index: int, microbatch_id: int) -> int: ...


class StepState:
    """What moves between the actions of one step on one rank."""

    __slots__ = ("microbatches", "weights", "loss_scale", "first_id", "activations", "gradients", "to_send",
                 "losses", "outputs")

    def __init__(self, microbatches: list[Any], weights: list[float], loss_scale: float, first_id: int) -> None:
        self.microbatches = microbatches
        self.weights = weights
        self.loss_scale = loss_scale
        self.first_id = first_id
        self.activations: dict[tuple[int, int], Any] = {}  # (stage, mb) -> input of that stage
        self.gradients: dict[tuple[int, int], Any] = {}  # (stage, mb) -> gradient of that stage's output
        self.to_send: dict[tuple[Any, ...], Any] = {}  # (stage, mb) -> tree the next send action sends
        self.losses: list[torch.Tensor] = []
        self.outputs: list[Any] = []


def _as_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """Cut the autograd graph between two stages held by one rank, as a send would."""
    return tensor.detach().requires_grad_(tensor.requires_grad)


def make_handlers(pipe: RankView, plan: Schedule, state: StepState, training: bool) -> dict[Op, Callable[[Action], None]]:
    """One function per compute op, closed over this step's state: the executor's loop calls them in list order."""
    stages, to_rank, last = pipe.stages, plan.rank_of, pipe.num_stages - 1
    first_id, vertical_sync = state.first_id, pipe.vertical_sync
    grad_weights = [1.0] * len(state.weights) if pipe.update_every_microbatch else state.weights
    anomaly = pipe.detect_anomaly and training
    step_name = pipe.step_name or f"training step {pipe.train_steps - 1} of this pipeline"

    def where(index: int, mb: int) -> str:
        return f"stage {index}, micro-batch {mb} of {step_name} (rank {pipe.rank})"

    def forward(action: Action) -> None:
        index, _, mb = action
        version = None
        if index == 0:
            inputs = tree_map_tensors(lambda t: t.to(pipe.device, non_blocking=True),
                                      pipe.input_fn(owned(state.microbatches[mb])))
        else:
            inputs = state.activations.pop((index, mb))
            if vertical_sync and training:
                version, inputs = inputs
        stage = stages[index]
        if stage.versions is not None and training and version is None:
            version = pipe.version_for(index, first_id + mb)
        output = stage.forward(first_id + mb, inputs, version, seed=pipe.forward_seed(index, first_id + mb))
        if anomaly:
            check_finite(output, f"the output of stage {index}'s forward", where(index, mb))
        if index == last:
            if pipe.loss_fn is not None:
                loss = pipe.loss_fn(output, owned(state.microbatches[mb]))
                if anomaly:
                    check_finite(loss, "the loss", where(index, mb))
                if training:
                    scale = grad_weights[mb] * state.loss_scale
                    # a float16 loss times a gradient scaler's scale (65536) would overflow: scaled in float32, as
                    # one device's scaler multiplies by its float32 scale
                    seed = loss.float() if scale != 1.0 and loss.dtype == torch.float16 else loss
                    stage.hold(first_id + mb, seed * scale if scale != 1.0 else seed)
                state.losses.append(loss.detach() * state.weights[mb])
            if not training:
                state.outputs.append(output)
            return
        if vertical_sync and training:
            output = (version, output)
        if to_rank(index + 1, mb) == pipe.rank:  # the next stage is ours too: hand over in memory
            state.activations[(index + 1, mb)] = tree_map_tensors(_as_leaf, output)
        else:
            state.to_send[(index, mb)] = output

    def backward(action: Action) -> None:
        index, op, mb = action
        grads = None if index == last else state.gradients.pop((index, mb))
        stage = stages[index]
        if op is Op.BACKWARD:
            input_grads = stage.backward(first_id + mb, grads)
        else:
            input_grads = stage.backward_input(first_id + mb, grads)
        if anomaly:
            if op is Op.BACKWARD:
                check_gradients(stage.module.named_parameters(), where(index, mb))
            if index > 0:
                check_finite(input_grads, f"the gradient of stage {index}'s input", where(index, mb))
        if index == 0:
            return
        if to_rank(index - 1, mb) == pipe.rank:
            state.gradients[(index - 1, mb)] = input_grads
        else:
            state.to_send[(index, mb)] = input_grads

    def backward_weight(action: Action) -> None:
        stages[action.stage].backward_weight(first_id + action.microbatch)
        if anomaly:
            check_gradients(stages[action.stage].module.named_parameters(), where(action.stage, action.microbatch))

    def optimizer_step(action: Action) -> None:
        versions = stages[action.stage].versions
        versions.before_step()
        pipe.optimizer_step_fn()
        for param in versions.live:
            param.grad = None
        versions.after_step()

    return {
        Op.FORWARD: forward,
        Op.BACKWARD: backward,
        Op.BACKWARD_INPUT: backward,
        Op.BACKWARD_WEIGHT: backward_weight,
        Op.OPTIMIZER: optimizer_step,
    }


def make_exchange(pipe: RankView, state: StepState, training: bool) -> Callable[[Step], None]:
    """The function that moves one step's messages: what the compute action before it left to send, and what the
    one after it (and, early, later ones: see :mod:`.schedules.transfers`) receives."""
    comm, stages, first_id = pipe.comm, pipe.stages, state.first_id

    def exchange(step: Step) -> None:
        sends = [(state.to_send.pop((t.stage, t.microbatch)), t.dst, t.channel) for t in step.sends]
        labels = [(t.kind, t.stage, first_id + t.microbatch) for t in step.sends]  # global ids (see wait_sends)
        comm.awaiting = step.recvs  # what a wait that runs out names
        trees = comm.exchange(sends, [(t.src, t.channel) for t in step.recvs], labels)
        if training:
            for t in step.sends:
                if t.kind == "F":  # the message holds a copy; backward needs no values
                    stages[t.stage].release_output(first_id + t.microbatch)
        for t, tree in zip(step.recvs, trees):
            if t.kind == "F":
                state.activations[(t.stage + 1, t.microbatch)] = tree
            else:
                state.gradients[(t.stage - 1, t.microbatch)] = tree

    return exchange
