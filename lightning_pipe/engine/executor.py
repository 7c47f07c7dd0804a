"""The executor: runs this rank's part of a pipeline by following its schedule's action list, and nothing else."""

from __future__ import annotations

import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .asynchronous_steps import AsynchronousSteps
from .comm import Communicator, PipelineError
from .notices import error_text, failed_as
from .config import PipelineConfig
from .cut import cut, stage_sizes
from .handlers import StepState, make_exchange, make_handlers
from .microbatch import microbatch_weights, split_batch
from .replicas import GradientAverager, broadcast_state
from .rng import forward_seed, step_seed
from .runtime import configure_threads, local_world_size
from .schedules import Action, Op, Schedule, forward_only, get_schedule, gpipe
from .schedules.replicated import replica_ranks, replicated, replicated_forward_only
from .schedules.transfers import CommPlan, Step, carried_out, comm_plan, shift
from .stage import PipelineStage
from .trace import Record
from .watchdog import activity, arm_exit_guard

__all__ = ["Pipeline", "default_input_fn"]

LossFn = Callable[[Any, Any], torch.Tensor]  # (last stage output, micro-batch) -> mean loss of the micro-batch


def default_input_fn(microbatch: Any) -> Any:
    """What the first stage takes from a micro-batch: the first element of a tuple/list, else the whole of it."""
    return microbatch[0] if isinstance(microbatch, (tuple, list)) else microbatch


class Pipeline(AsynchronousSteps):
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

    The asynchronous schedules (``async_1f1b``, ``2bw``; see :mod:`.schedules.asynchronous`) step the optimizer
    inside the pipeline and keep micro-batches in flight from one ``train_step`` to the next: pass
    ``train_step(batch, optimizer_step=opt.step)`` (the engine zeroes the gradients after each step) and call
    :meth:`flush` before evaluating or saving. ``vertical_sync=True`` (async_1f1b) makes every stage run a
    micro-batch on the weight version stage 0 used for it.

    ``replicas=[3, 1]`` gives stage ``s`` that many ranks (numbered stage by stage), which take its micro-batches
    in turn (PipeDream's "3-1"; :mod:`.schedules.replicated`) and sum their gradients at the end of the step, so
    every replica holds the whole batch's gradient. Schedules "1f1b" and "gpipe"; the last stage has one rank.
    """

    def __init__(
        self,
        layers: nn.Sequential | Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        config: PipelineConfig | None = None,
        input_fn: Callable[[Any], Any] = default_input_fn,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        record: bool = False,
        seed: int | None = None,
        strict_p2p: bool | None = None,
        materialize: Callable[[list[nn.Module]], None] | None = None,
        **settings: Any,
    ) -> None:
        """``config`` says how to run (:class:`~.config.PipelineConfig`); or give its fields as keywords
        (``schedule="1f1b", num_microbatches=8, partition="uniform", checkpoint_activations=False,
        vertical_sync=False, replicas=None, deferred_batchnorm=True``), any other keyword being an option of the
        schedule (``virtual_stages=2``).

        ``seed``: the base seed of the steps' seeds when :meth:`train_step` / :meth:`eval_step` are given none (each
        forward of a stage's layers draws from a seed derived from the step's seed, the stage and the micro-batch:
        :mod:`.rng`); ``None`` takes rank 0's ``torch.initial_seed()`` (what ``seed_everything`` set), so that it is the
        same on every rank. ``strict_p2p=True`` runs the transport's strict mode on gloo (NCCL's ordering rules,
        emulated; default: the ``LIGHTNING_PIPE_STRICT_P2P`` environment variable, see :mod:`.comm`).

        ``materialize``: called with this rank's stage modules, in stage order, before they move to ``device``: layers
        built on the meta device (a model too big for one device) get storage there, for this rank's layers only."""
        if config is None:
            config = PipelineConfig.of(**settings)
        elif settings:
            raise TypeError(f"Pipeline takes config= or its fields as keywords, not both (got {sorted(settings)})")
        if not dist.is_initialized():
            raise RuntimeError("Pipeline needs torch.distributed: call dist.init_process_group() on every rank first")
        self.config = config
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.num_ranks = dist.get_world_size(self.group)
        configure_threads(local_world_size(default=self.num_ranks))
        if device is None:
            nccl = dist.get_backend(self.group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.kind = config.kind
        self.schedule_name = config.schedule
        self.schedule_options = dict(config.schedule_options)
        self.num_microbatches = config.num_microbatches
        self.loss_fn = loss_fn
        self.input_fn = input_fn
        self.record = record
        self.records: list[tuple[Action, float, float]] = []
        self.replicas = self._check_replicas(config.replicas)
        self.error_grace_s = 5.0  # how long a failing rank waits for its neighbours to take its error notice
        self._comm_plans: dict[tuple, CommPlan] = {}
        partition = config.partition if isinstance(config.partition, str) else list(config.partition)
        checkpoint_activations, vertical_sync = config.checkpoint_activations, config.vertical_sync

        layers = list(layers) if not isinstance(layers, nn.Sequential) else layers
        plan = self.schedule_for(self.num_microbatches)  # also validates the schedule's arguments
        self.num_stages = plan.num_stages
        try:
            sizes = stage_sizes(layers, self.num_stages, partition, self.replicas)
        except ValueError as error:
            raise ValueError(self._cut_refused(error, len(layers), plan.stage_to_rank)) from None
        self.stage_sizes = sizes
        modules = cut(layers, sizes)
        self.stage_to_rank = plan.stage_to_rank
        self.seed = self._shared_seed(seed)
        self._steps_run = 0  # steps given no seed, for their derived seeds
        self._batch_seeds: list[tuple[int, int, int]] = []  # (first micro-batch id, micro-batches, seed) in flight
        local = plan.stages_of(self.rank)
        if materialize is not None:
            materialize([modules[index] for index in local])
        _refuse_meta(modules, local)
        self.stages: dict[int, PipelineStage] = {
            index: PipelineStage(modules[index].to(self.device), index, self.num_stages, self.device,
                                 checkpoint_activations, deferred_batchnorm=config.deferred_batchnorm)
            for index in local
        }
        if any(action.op is Op.BACKWARD_INPUT for action in plan.actions[self.rank]):
            for stage in self.stages.values():
                stage.enable_split_backward()
        self.asynchronous = plan.asynchronous
        self.vertical_sync = vertical_sync
        self.update_every_microbatch = False
        if self.asynchronous:
            self._setup_async(plan, checkpoint_activations)
        self.comm = Communicator(self.group, self.device, strict=strict_p2p)
        self.comm.wait_timeout = config.wait_timeout
        self.detect_anomaly = config.detect_anomaly
        self.train_steps = 0  # synchronous training steps taken (names the step where an anomaly appeared)
        self.step_name: str | None = None  # how errors name the current training step (a strategy may set it)
        # On CUDA, record=True also times the GPU's work: compute on its stream, packing on the communication stream.
        self._cuda_spans: list[tuple[str, str, Any, Any]] | None = [] if record and self.device.type == "cuda" else None
        if self._cuda_spans is not None:
            self.comm.timeline = []
        self._replica_sum = self._replica_group_sum(plan)

    def _shared_seed(self, seed: int | None) -> int:
        """``seed``, or rank 0's initial seed sent to every rank (one small broadcast, while building)."""
        if seed is not None:
            return int(seed)
        device = self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        value = torch.tensor([torch.initial_seed() % 2**63], dtype=torch.int64, device=device)
        dist.broadcast(value, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(value.item())

    # -- public API -------------------------------------------------------------------------------
    @property
    def is_last_rank(self) -> bool:
        """Whether this rank holds the last stage (where the loss and the outputs are)."""
        return self.num_stages - 1 in self.stages

    @property
    def stage_ranks(self) -> list[list[int]]:
        """The ranks holding each stage: one, or its replicas (``replicas=``)."""
        if self.replicas:
            return [list(ranks) for ranks in replica_ranks(self.replicas)]
        return [[rank] for rank in self.stage_to_rank]

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
        if num_microbatches not in cache and self.replicas:
            cache[num_microbatches] = replicated(self.replicas, num_microbatches, self.schedule_name)
        if num_microbatches not in cache:
            try:
                plan = get_schedule(self.schedule_name, self.num_ranks, num_microbatches, **self.schedule_options)
            except ValueError:
                if num_microbatches >= self.num_microbatches or not cache:
                    raise
                plan = gpipe(self.num_stages, num_microbatches, self.stage_to_rank)
            cache[num_microbatches] = plan
        return cache[num_microbatches]

    def take_records(self) -> list[Record]:
        """What this rank ran since the last call (with ``record=True``): one Record per action, timed on
        ``time.perf_counter``, which all processes of one machine share."""
        records = [Record(self.rank, action, start, end) for action, start, end in self.records]
        self.records.clear()
        return records

    def take_cuda_timeline(self) -> list[dict[str, Any]]:
        """What this rank's GPU ran since the last call (``record=True`` on CUDA): one dict per compute action (on the
        compute stream) and per packing or unpacking of messages (on the communication stream), with ``start_ms`` and
        ``end_ms`` from the first of them. Waits for the GPU."""
        if self._cuda_spans is None:
            raise RuntimeError("take_cuda_timeline needs a Pipeline on a CUDA device built with record=True")
        spans = [*self._cuda_spans, *(("comm", what, start, end) for what, start, end in self.comm.timeline)]
        self._cuda_spans.clear()
        self.comm.timeline.clear()
        if not spans:
            return []
        torch.cuda.synchronize(self.device)
        origin = min(spans, key=lambda span: spans[0][2].elapsed_time(span[2]))[2]
        return sorted(({"stream": stream, "what": what, "start_ms": origin.elapsed_time(start),
                        "end_ms": origin.elapsed_time(end)} for stream, what, start, end in spans),
                      key=lambda span: span["start_ms"])

    def train_step(
        self, batch: Any, loss_scale: float = 1.0, optimizer_step: Callable[[], Any] | None = None,
        seed: int | None = None,
    ) -> torch.Tensor | None:
        """Forward and backward of ``batch``; gradients accumulate into the parameters.

        The gradients are those of ``loss_scale`` times the batch's mean loss (e.g. ``1 / accumulation steps``).
        Returns the batch's mean loss (detached, unscaled) on the rank that holds the last stage, ``None`` on
        the others. Asynchronous schedules need ``optimizer_step`` and return the loss of this batch's
        micro-batches (computed on the last stage during this call; earlier stages finish them later).

        ``seed`` (the same on every rank): stage ``s``'s forward of micro-batch ``i`` draws its random numbers from
        ``rng.forward_seed(seed, s, i)``; by default one derived from the base seed and the count of steps run.
        """
        if self.loss_fn is None:
            raise ValueError("train_step needs a loss: construct the Pipeline with loss_fn=(output, microbatch) -> loss")
        microbatches = split_batch(batch, self.num_microbatches)
        seed = self._step_seed(seed)
        if self.asynchronous:
            return self._train_step_async(microbatches, loss_scale, optimizer_step, seed)
        self._batch_seeds = [(0, len(microbatches), seed)]
        plan = self.schedule_for(len(microbatches))
        self.train_steps += 1
        if self._replica_sum is None:
            losses, _ = self._run(plan, microbatches, training=True, loss_scale=loss_scale)
        else:  # each replica of this stage ran some micro-batches: the gradients are their sum
            backwards = sum(action.op is Op.BACKWARD for action in plan.actions[self.rank])
            with self._replica_sum.averaging(backwards):
                losses, _ = self._run(plan, microbatches, training=True, loss_scale=loss_scale)
        self._end_step()
        return torch.stack(losses).sum() if losses else None

    def _end_step(self) -> None:
        """After a step's micro-batches: the stages' batch norms commit the batch's running statistics (replicas of a
        stage first add up what each recorded)."""
        group = self._replica_sum.group if self._replica_sum is not None else None
        for stage in self.stages.values():
            try:
                stage.end_step(group)
            except PipelineError:
                raise
            except RuntimeError as error:  # (a step no loss of which needs a gradient): posted for the others
                failure = failed_as(error, f"rank {self.rank} failed at the end of the step: {error_text(error)}",
                                    self.rank)
                self.comm.board.post(failure)
                raise failure from error

    @torch.no_grad()
    def eval_step(self, batch: Any, seed: int | None = None,
                  layers: int | None = None) -> tuple[torch.Tensor | None, list[Any] | None]:
        """Forward only. On the last stage's rank returns (mean loss or None without loss_fn, the micro-batch
        outputs in order); on the other ranks (None, None). ``seed``: as for :meth:`train_step`. ``layers``: only
        the sequence's first ``layers`` layers run (an autoencoder's encoder, for its embeddings); the stages after
        them pass their input on as it is."""
        if self.asynchronous and self._in_flight:
            raise RuntimeError("call flush() before eval_step: micro-batches of the last train_step are still in "
                               "flight and the weights are not final")
        microbatches = split_batch(batch, self.num_microbatches)
        seed = self._step_seed(seed)
        in_flight, self._batch_seeds = self._batch_seeds, [(0, len(microbatches), seed)]
        if self.replicas:
            plan = replicated_forward_only(self.replicas, len(microbatches))
        else:
            plan = forward_only(self.num_stages, len(microbatches), self.stage_to_rank)
        modules = {index: stage.module for index, stage in self.stages.items()}
        if layers is not None:
            for index, stage in self.stages.items():
                start = sum(self.stage_sizes[:index])
                kept = list(stage.module._modules.items())[:max(0, layers - start)]
                stage.module = nn.Sequential(OrderedDict(kept))
        try:
            losses, outputs = self._run(plan, microbatches, training=False)
        finally:
            self._batch_seeds = in_flight
            for index, stage in self.stages.items():
                stage.module = modules[index]
        if not self.is_last_rank:
            return None, None
        return (torch.stack(losses).sum() if losses else None), outputs

    def _step_seed(self, seed: int | None) -> int:
        if seed is not None:
            return int(seed)
        self._steps_run += 1
        return step_seed(self.seed, self._steps_run)

    def forward_seed(self, stage_index: int, microbatch_id: int) -> int:
        """The seed of ``stage_index``'s forward of micro-batch ``microbatch_id`` (counted from the first batch under
        the asynchronous schedules, whose forwards of a batch may run in the next call)."""
        for first, count, seed in reversed(self._batch_seeds):
            if first <= microbatch_id < first + count:
                return forward_seed(seed, stage_index, microbatch_id - first)
        raise RuntimeError(f"micro-batch {microbatch_id} belongs to no batch in flight; this is a bug, please report it")

    # -- replicated stages ------------------------------------------------------------------------
    def _cut_refused(self, error: ValueError, num_layers: int, stage_to_rank: Sequence[int]) -> str:
        """The cut's error, with how many ranks the pipeline has and, where there are more stages than layers, what
        to change: a schedule holding several stages per rank (interleaved, zero-bubble V) fits fewer ranks."""
        ranks = len(set(stage_to_rank))
        if self.num_stages <= num_layers:
            return f"{error} (the pipeline has {self.num_ranks} ranks and {self.num_stages} stages)"
        per_rank = self.num_stages // max(ranks, 1)
        head = str(error).split(";")[0]
        if per_rank > 1:
            fits = num_layers // per_rank
            fewer = (f"at most {fits} rank{'s' if fits != 1 else ''} per pipeline with it" if fits else
                     f"a model of at least {per_rank} layers with it")
            return (f"{head}: schedule {self.schedule_name!r} puts {per_rank} stages on each of the pipeline's "
                    f"{ranks} ranks. Use {fewer}, a schedule with one stage per rank (1f1b, gpipe), or split the "
                    f"model into more layers")
        return (f"{head}: the pipeline has {ranks} ranks, one stage each. Use at most {num_layers} "
                f"rank{'s' if num_layers != 1 else ''} per pipeline (devices, or num_stages with data-parallel "
                f"replicas), or split the model into more layers")

    def _check_replicas(self, replicas: Sequence[int] | None) -> list[int] | None:
        if replicas is None:
            return None
        counts = list(replicas)  # the config checked the layout; here what it asks of this group
        if sum(counts) != self.num_ranks:
            raise ValueError(f"replicas={counts} places {sum(counts)} ranks, but the pipeline's group has "
                             f"{self.num_ranks}; make sum(replicas) equal the ranks")
        if self.num_microbatches < max(counts):
            widest = max(counts)
            warnings.warn(f"num_microbatches={self.num_microbatches} is fewer than the {widest} ranks of the widest "
                          f"stage (replicas={counts}): some of them will have no micro-batch to run; use at least "
                          f"{widest} (a multiple of {widest} keeps them evenly busy)", stacklevel=3)
        return counts

    def _replica_group_sum(self, plan: Schedule) -> GradientAverager | None:
        """The sum of this stage's gradients over its replicas, if it has several. Every rank makes the group of
        every replicated stage, in stage order (torch's rule for new groups), once per process group."""
        if not self.replicas:
            return None
        if dist.get_world_size(self.group) != dist.get_world_size():
            raise ValueError("replicated stages need the pipeline to span every rank of the job: construct the "
                             "Pipeline with group=None")
        groups = {ranks: _replica_group(tuple(dist.get_global_rank(self.group, r) for r in ranks))
                  for ranks in plan.stage_replicas if len(ranks) > 1}
        (stage,) = plan.stages_of(self.rank)
        group = groups.get(plan.stage_replicas[stage])
        if group is None:
            return None
        broadcast_state(self.modules(), group)
        return GradientAverager(self.parameters(), group, average=False)

    # -- running a schedule -----------------------------------------------------------------------
    def comm_plan(self, plan: Schedule, carried_in: str | None = None) -> CommPlan:
        """The order of ``plan``'s messages (:mod:`.schedules.transfers`), made once per schedule; ``carried_in``:
        ``"steady"`` or ``"drain"`` for the phases of an asynchronous schedule that receive messages the phase before
        sent."""
        key = (plan.name, plan.num_microbatches, carried_in)
        cached = self._comm_plans.get(key)
        if cached is None:
            carried = None
            if carried_in is not None:
                carried = carried_out(self._steady)
                if carried_in == "steady":  # sent by the batch before: ids of that batch, one batch back
                    carried = shift(carried, -self._steady.num_microbatches)
            cached = self._comm_plans[key] = comm_plan(plan, carried)
        return cached

    def _run(self, plan: Schedule, microbatches: list[Any], training: bool, loss_scale: float = 1.0,
             first_id: int = 0, carried_in: str | None = None) -> tuple[list[torch.Tensor], list[Any]]:
        """Follow this rank's steps of ``plan``; micro-batch ``i`` of the list is ``first_id + i`` in the stages."""
        steps = self.comm_plan(plan, carried_in).steps[self.rank]
        incoming: dict[int, list[Any]] = {}
        for step in steps:
            for t in step.recvs:
                incoming.setdefault(t.src, []).append(t.channel)
        self.comm.expect(incoming)
        weights = microbatch_weights(microbatches) if self.loss_fn and microbatches else []
        state = StepState(microbatches, weights, loss_scale, first_id)
        handlers = make_handlers(self, plan, state, training)
        exchange = make_exchange(self, state, training)
        issued, in_action = 0, False  # steps begun; whether the last one begun was in its action
        records = self.records if self.record else None
        clock = time.perf_counter
        try:
            for step in steps:
                issued, in_action = issued + 1, False
                if step.sends or step.recvs:
                    start = clock()
                    exchange(step)
                    if records is not None:
                        self._record_step(step, start, clock())
                action = step.action
                if action is not None:
                    in_action = True
                    activity.doing(action)  # what this rank's heartbeat says it does
                    start = clock()
                    if self._cuda_spans is not None:
                        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                        events[0].record()
                    handlers[action.op](action)
                    if records is not None:
                        records.append((action, start, clock()))
                    if self._cuda_spans is not None:
                        events[1].record()
                        self._cuda_spans.append(("compute", str(action), *events))
            # Asynchronous phases leave their last messages to the next one, where they are received.
            leaving = self.comm_plan(plan, carried_in).leaving
            self.comm.wait_sends(skip={(kind, stage, first_id + mb) for kind, stage, mb in leaving})
            activity.doing(_BETWEEN_STEPS)
        except PipelineError as error:  # another rank failed: pass its error on, then end with it
            self._abort(steps, issued, error)
            raise
        except Exception as error:
            last = steps[issued - 1].action if issued else None
            where = ("before its first action" if not issued else f"in {last} ({last.described})" if in_action
                     else f"in the messages before {last}" if last is not None else "in its last messages")
            message = (f"rank {self.rank} failed {where}: {error_text(error)}{_advice(error, self)}\n"
                       f"--- traceback on rank {self.rank} ---\n{traceback.format_exc()}")
            failure = failed_as(error, message, self.rank)
            self._abort(steps, issued, failure)
            raise failure from error
        return state.losses, state.outputs

    def _record_step(self, step: Step, start: float, end: float) -> None:
        for t in step.sends:
            self.records.append((Action(t.stage, Op.SEND_ACTIVATION if t.kind == "F" else Op.SEND_GRAD,
                                        t.microbatch), start, end))
        for t in step.recvs:
            self.records.append((Action(t.receiving_stage, Op.RECV_ACTIVATION if t.kind == "F" else Op.RECV_GRAD,
                                        t.microbatch), start, end))

    def _abort(self, steps: tuple[Step, ...], issued: int, error: PipelineError) -> None:
        """Tell the peers this rank still owed a message (they may be waiting for it), take the message a peer may be
        blocked sending, let the store's holder wait for the others to read the error, and drop this step's state."""
        activity.doing("ending after a failure")
        arm_exit_guard()  # receives posted to peers that are gone never complete: they must not hold the exit
        owed: dict[int, Any] = {}
        expected: dict[int, Any] = {}
        for step in steps[issued:]:
            for t in step.sends:
                owed.setdefault(t.dst, t.channel)
            for t in step.recvs:
                expected.setdefault(t.src, t.channel)
        self.comm.error_grace_s = self.error_grace_s
        self.comm.abort(error, list(owed.items()), list(expected.items()))
        self.comm.board.linger(self.error_grace_s)
        for stage in self.stages.values():
            stage.clear()


_BETWEEN_STEPS = "its own code between two pipeline steps"


def _advice(error: Exception, pipeline: Pipeline) -> str:
    """What to do about a failure that splitting the batch caused, where torch's message does not say."""
    if isinstance(error, ValueError) and "Expected more than 1 value per channel when training" in str(error):
        m = pipeline.num_microbatches
        return (f". A batch norm in training mode got a micro-batch of 1 row: the batch had fewer than {2 * m} rows "
                f"(often the last, partial batch of an epoch), split into {m} micro-batches, where one device "
                f"normalizes the whole batch. Drop the partial batch (DataLoader(drop_last=True)), or give every "
                f"batch at least 2 rows per micro-batch (fewer micro-batches: num_microbatches)")
    if isinstance(error, RuntimeError) and "modified by an inplace operation" in str(error):
        return (". Under a pipeline the forwards of later micro-batches run before the backwards of earlier ones, so a "
                "tensor a forward changes in place (a layer writing its own weight: a max-norm constraint, a mask "
                "applied with mul_ under torch.no_grad()) is changed under a backward that still needs it. Change it "
                "outside the forward, once per step (under Lightning: on_train_batch_start or "
                "on_before_optimizer_step over the parameters, under torch.no_grad()), or compute the changed weight "
                "without writing it (torch.nn.utils.parametrize)")
    if isinstance(error, RuntimeError) and "offsets[0] has to be 0" in str(error):
        return (". The batch's offsets (nn.EmbeddingBag(ids, offsets): where each row's bag starts in the flattened "
                "ids) were split as rows, because they were as long as the batch (every bag of the first batch held "
                "one id): a later micro-batch's offsets do not start at 0, and its ids are not its rows' own. Give "
                "the bags as a 2-D tensor, one padded row per sample (nn.EmbeddingBag(ids_2d) with padding_idx, "
                "per_sample_weights of the same shape), which the pipeline splits with the rows")
    if isinstance(error, RuntimeError) and "leaf Variable that requires grad is being used in an in-place" in str(error):
        return (". A stage's input is a leaf that needs a gradient, and torch refuses to change it in place: the "
                "stage's first layer writes its input in place (x.relu_(), x += y, x[mask] = 0 at the start of a "
                "block of yours), here on a later micro-batch than the stage's first forward, which ran on a copy and "
                "wrote none. On one device it was the last layer's output. Make that op out of place (x = x.relu()), "
                "or give the layer an attribute inplace = True, as torch's nn.ReLU(inplace=True) has: a stage whose "
                "first layer has it always gets a copy of its input")
    return ""

_REPLICA_GROUPS: dict[tuple[int, ...], tuple[Any, dist.ProcessGroup]] = {}


def _replica_group(ranks: tuple[int, ...]) -> dist.ProcessGroup:
    """The process group of ``ranks``, made once per default process group (every rank calls this alike). The
    default group it belongs to is kept with it: a re-initialized job gets new groups."""
    world = dist.group.WORLD
    cached = _REPLICA_GROUPS.get(ranks)
    if cached is None or cached[0] is not world:
        cached = _REPLICA_GROUPS[ranks] = (world, dist.new_group(list(ranks)))
    return cached[1]


def _refuse_meta(modules: list[nn.Sequential], local: Sequence[int]) -> None:
    for index in local:
        names = [name for name, t in [*modules[index].named_parameters(), *modules[index].named_buffers()] if t.is_meta]
        if names:
            raise ValueError(f"stage {index}'s layers have tensors on the meta device ({', '.join(names[:5])}): give "
                             f"them storage first, e.g. Pipeline(..., materialize=lambda stages: ...) with to_empty() "
                             f"and reset_parameters() of each layer, or build the layers on a real device")
