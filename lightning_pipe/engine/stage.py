"""One pipeline stage: its slice of layers, the forward and backward of micro-batches, and what backward keeps."""

from __future__ import annotations

import functools
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from .batchnorm import PLAIN_BATCH_NORMS, DeferredStatistics, convert_batchnorm, local_sync_batch_norms
from .calls import each_call
from .rng import forked, forward_seed
from .tree import tree_flatten, tree_map_tensors
from .weights import WeightVersions

__all__ = ["PipelineStage", "first_layer_in_place"]


def first_layer_in_place(module: nn.Module) -> bool:
    """Whether ``module``'s first layer writes its input in place (``nn.ReLU(inplace=True)``, a ``Dropout`` or
    ``Hardtanh`` with ``inplace=True``): torchvision's VGG and AlexNet put one after every convolution of their
    ``features``, so a cut often puts one first on a stage. There the input is a leaf that needs a gradient, which
    torch refuses to change in place; on one device it was the convolution's output. The first layer is found
    through nested ``nn.Sequential`` s."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return getattr(module, "inplace", False) is True


class PipelineStage:
    """Runs ``module`` (stage ``stage_index`` of ``num_stages``) on micro-batches and back-propagates them.

    Forward keeps the micro-batch's input and output until its backward (the output itself only until it has been
    sent: :meth:`release_output`); with ``checkpoint_activations`` it keeps only the input and recomputes the forward
    during backward (GPipe's re-materialization; RNG state is
    restored so dropout draws the same mask). Gradients accumulate in the module's parameters.

    Random numbers (dropout): each forward given a ``seed`` runs with the process's generators forked to it (:mod:`.rng`;
    the executor derives it from the step's seed, the stage and the micro-batch). A stage driven by hand with a base
    ``seed`` forks its ``k``-th forward to ``forward_seed(seed, stage_index, k)``; with neither, the layers draw from
    the process's generators. ``deferred_batchnorm``: the batch
    norms of ``module`` are converted in place to update their running statistics once per step (:mod:`.batchnorm`;
    the executor calls :meth:`end_step`).
    """

    def __init__(
        self,
        module: nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device | str = "cpu",
        checkpoint_activations: bool = False,
        seed: int | None = None,
        deferred_batchnorm: bool = True,
    ) -> None:
        self.module = module
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.checkpoint_activations = checkpoint_activations
        self.seed = seed  # the base of the seeds of forwards given none (a stage driven by hand)
        self._forwards = 0
        self._losses = self._gradless = 0  # the step's losses backward ran on, and those that needed no gradient
        self.deferred_batchnorm = deferred_batchnorm
        self.norms: DeferredStatistics | None = convert_batchnorm(module) if deferred_batchnorm else None
        # Whether the layers get copies of the stage's input tensors: where they write their input in place (a
        # received leaf needing a gradient, which torch refuses to change: a ReLU(inplace=True) first, a block of the
        # user's starting with x.relu_()), and where a checkpoint's recomputation would run on an input the first run
        # already changed. None: not known yet, found on the first training forward, which runs on copies. (The first
        # stage's input is the batch: its layers write it as on one device, unless a checkpoint would run twice.)
        self.writes_input: bool | None = (stage_index > 0 and first_layer_in_place(module)) or (
            None if checkpoint_activations or stage_index > 0 else False)
        # the first stage: whether a forward wrote one of the tensors it was given in place (the batch as the loader
        # gave it, which code reading the batch after the model, on another rank, sees unchanged); looked at until seen
        self.wrote_input = False
        # micro-batch -> its input leaves that need a gradient, None for the others (as they were at its forward: a
        # layer writing one in place with a value that needs one, a PyG-style index_add_, makes it need one after)
        self._inputs: dict[int, list[torch.Tensor | None]] = {}
        self._outputs: dict[int, Any] = {}  # micro-batch -> output tree (or the scaled loss, on the last stage)
        self._weight_grads_owed: dict[int, tuple | None] = {}
        # Split backward (zero-bubble schedules): the outputs of every module that owns parameters, per
        # micro-batch, so the weight half can start from them instead of from the stage's output.
        self._captures: dict[int, list[tuple[nn.Module, list[torch.Tensor]]]] = {}
        self._capturing: list[tuple[nn.Module, list[torch.Tensor]]] | None = None
        self._split_mode: str | None = None  # None until verified, then "captured" or "full"
        self._split_for: frozenset[int] = frozenset()  # the trainable parameters (ids) the mode was verified for
        self._split_checks = 0  # micro-batches whose check could not tell (a parameter's gradient was all zeros)
        self._unsplit = False  # the backward cannot be split here (a reentrant checkpoint): it runs whole
        self._looked_for_reentrant = False
        self._hooks: list[Any] = []
        # Asynchronous schedules: forwards run on weight snapshots; each micro-batch remembers its version.
        self.versions: WeightVersions | None = None
        self._version_of: dict[int, int] = {}
        self.version_history: list[tuple[int, int]] | None = None  # set to [] to record (micro-batch, version)
        self.kept_inputs: list[Any] | None = None  # set to [] to keep copies of the next two training forwards' inputs
        # Parameters the loss function reads besides the stage's (a learned temperature of the step's code): a held
        # loss's backward gives them gradients, the split one in its input half.
        self.loss_parameters: list[nn.Parameter] = []

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def stash_weights(self, keep_replaced: bool) -> WeightVersions:
        """Run forwards on weight versions (asynchronous schedules); see :mod:`.weights`."""
        if self._hooks:
            raise ValueError("asynchronous schedules cannot split the backward; use async_1f1b or 2bw alone")
        self.versions = WeightVersions(self.module, keep_replaced)
        return self.versions

    def forward(self, microbatch: int, inputs: Any, version: int | None = None, seed: int | None = None) -> Any:
        """Run the layers on ``inputs`` and keep what the backward of ``microbatch`` needs.

        With weight stashing, ``version`` says which weights to run on (held until the backward). ``seed``: the
        layers' random numbers are drawn from it (see the class docstring).
        """
        if seed is None and self.seed is not None:
            seed = forward_seed(self.seed, self.stage_index, self._forwards)
            self._forwards += 1
        if seed is None:
            return self._forward(microbatch, inputs, version)
        with forked(seed, self.device):
            return self._forward(microbatch, inputs, version)

    def _forward(self, microbatch: int, inputs: Any, version: int | None) -> Any:
        training = torch.is_grad_enabled()
        looking = self.stage_index == 0 and not self.wrote_input
        leaves = tree_flatten(inputs)[0] if training or looking else []
        given = [t._version for t in leaves] if looking else []
        output = self._run(microbatch, inputs, leaves, version)
        if looking:
            self.wrote_input = self.wrote_input or any(t._version != seen for t, seen in zip(leaves, given))
        return output

    def _run(self, microbatch: int, inputs: Any, leaves: list[torch.Tensor], version: int | None) -> Any:
        module: Any = self.module
        if self.versions is not None and torch.is_grad_enabled():
            assert version is not None, "a stage with weight versions needs the version of each forward"
            weights = self.versions.acquire(version)
            self._version_of[microbatch] = version
            if self.version_history is not None:
                self.version_history.append((microbatch, version))

            def module(x: Any) -> Any:
                return functional_call(self.module, weights, (x,), strict=False)
        training = torch.is_grad_enabled()
        if training:
            self._inputs[microbatch] = [t if t.requires_grad else None for t in leaves]
            if self.kept_inputs is not None and len(self.kept_inputs) < 2:
                self.kept_inputs.append(tree_map_tensors(lambda t: t.detach().clone(), inputs))
            if self.writes_input is not False:  # the layers run on copies (made inside a checkpoint too: its
                layers, copies = module, []  # recomputation copies the input as the first run found it)

                def module(x: Any) -> Any:
                    copied = tree_map_tensors(torch.Tensor.clone, x)
                    copies.extend(tree_flatten(copied)[0])
                    return layers(copied)
        on_call = self.norms.call if self.norms is not None else None  # each of the step's calls in turn (.calls)
        with self._running(forward=True, training=training, microbatch=microbatch):
            if self.checkpoint_activations and training:
                output = checkpoint(functools.partial(each_call, module, on_call=on_call), inputs, use_reentrant=False,
                                    preserve_rng_state=True)
            elif self._hooks and training:
                self._capturing = []
                try:
                    output = each_call(module, inputs, on_call)
                finally:
                    self._captures[microbatch], self._capturing = self._capturing, None
            else:
                output = each_call(module, inputs, on_call)
        if training:
            self._outputs[microbatch] = output
            if self.writes_input is None:  # the first forward tells: copies from now on only if it wrote one
                self.writes_input = any(copy._version > 0 for copy in copies)
                self.wrote_input = self.wrote_input or (self.stage_index == 0 and self.writes_input)
        return output

    def _running(self, forward: bool, training: bool = True, microbatch: int = 0) -> AbstractContextManager[Any]:
        """Around the stage's forwards and backwards: its batch norms' state (record a training forward of
        ``microbatch``; a backward's recomputation must not touch the running statistics)."""
        if self.norms is None:
            return nullcontext()
        return self.norms.running(record=forward and training, microbatch=microbatch)

    def end_step(self, group: dist.ProcessGroup | None = None) -> None:
        """The step's micro-batches are done: commit the batch norms' running statistics of the whole batch.

        ``group``: the replicas of this stage that ran the step's other micro-batches (all of them call this)."""
        if self.norms is not None:
            self.norms.commit(group)
        losses, gradless, self._losses, self._gradless = self._losses, self._gradless, 0, 0
        if losses and gradless == losses:
            raise RuntimeError(
                f"the loss of each of the step's {losses} micro-batch(es) needs no gradient: nothing it was computed "
                f"from needs one (one device's loss.backward() of the batch raises here too), so no layer would "
                f"train. A forward that runs its layers under torch.no_grad() does this, as a custom "
                f"torch.autograd.Function computing their gradients in its own backward does (reversible layers, "
                f"Reformer's): a captured graph differentiates the forward's ops and never calls that backward; keep "
                f"such layers in an nn.Sequential (not captured), or write them without the Function")

    def defer_batchnorm_again(self) -> None:
        """Defer the stage's batch norms again where ``restore_batchnorm`` made them plain after a run (for one device
        or DDP, then the model pipelined again: a plain one failed at its first step, found by review)."""
        local_sync_batch_norms(self.module)
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.running_mean is not None]
        if self.deferred_batchnorm and any(type(m) in PLAIN_BATCH_NORMS or (
                "_deferred" not in vars(m) and vars(m).get("_defers_in_graph", False)) for m in norms):
            self.norms = convert_batchnorm(self.module)

    def enable_split_backward(self) -> None:
        """Prepare for :meth:`backward_input` / :meth:`backward_weight` (zero-bubble schedules).

        The weight half must not redo the input half's work, so forward records the output of every module
        that owns parameters; the input half also computes the gradients of those outputs, and the weight
        half back-propagates from each of them to its own module's parameters only. That is exact when each
        parameter reaches the loss only through the modules that own it, and each module runs once per
        micro-batch (a second call's output depends on the first's, so back-propagating from both would count
        the first call's share twice). The weight half checks it against a plain backward (again whenever the
        parameters that train change: a fine-tuning callback unfreezing a backbone, and while a parameter's
        gradient is all zeros there, which cannot tell: a LoRA adapter's A before its zero-initialized B moves);
        a stage where it fails falls back to the plain, slower weight half.
        """
        if self.checkpoint_activations:
            raise ValueError("checkpoint_activations cannot be combined with a schedule that splits the backward "
                             "(zb_h1, zb_v); turn one of them off")
        if self._hooks:
            return
        for module in self.module.modules():  # (frozen ones too: they may be unfrozen later)
            if any(True for _ in module.parameters(recurse=False)):
                self._hooks.append(module.register_forward_hook(self._capture_output))

    def _capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capturing is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
            leaves = [t for t in tree_flatten(output)[0] if t.requires_grad]
            if leaves:
                self._capturing.append((module, leaves))

    def release_output(self, microbatch: int) -> None:
        """Let go of ``microbatch``'s output once it has been sent (the message holds a copy): keep only where its
        backward starts, each output tensor's gradient edge (autograd node and output number).

        Backward needs no output's values, only its node, so the output's memory can go before its backward comes.
        But the memory must go only when nothing else needs it. Megatron-LM (and this stage, until issue 11) replaced
        each output's ``.data`` by a broadcast zero; when a layer of the stage had saved that same tensor for backward
        (a stage returning ``(new_h, h)`` where ``h`` also fed a Linear, U-Net skips, fused (hidden, residual) blocks),
        backward then read zeros, and since changing ``.data`` does not bump the version counter, silently. Dropping
        our reference instead frees the storage exactly when nothing else holds it: not when a layer saved the tensor,
        a view of it, or (as ``tanh`` does) its result, and then freeing would have saved no memory anyway.

        Needs ``torch.autograd.backward`` to take gradient edges (torch >= 2.7); before that the output is kept.
        Leaves (the stage's own input passed through) and tensors that need no gradient stay as they are.
        """
        output = self._outputs.get(microbatch)
        if output is None or not _backward_takes_edges():
            return
        self._outputs[microbatch] = _Released(
            get_gradient_edge(t) if t.grad_fn is not None else t if t.requires_grad else None
            for t in tree_flatten(output)[0])

    def hold(self, microbatch: int, loss: torch.Tensor) -> None:
        """On the last stage: back-propagate ``microbatch`` from ``loss`` instead of from the layers' output."""
        self._outputs[microbatch] = loss

    def backward(self, microbatch: int, grad_outputs: list[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
        """Back-propagate ``microbatch`` given its output gradients (``None`` from a held loss).

        Returns the gradient of each input leaf (``None`` where the input needs none) and frees the micro-batch.
        """
        tensors, grads = self._roots(microbatch, grad_outputs)
        self._captures.pop(microbatch, None)
        inputs = self._inputs.pop(microbatch)
        if self.versions is not None:
            return self._backward_on_version(microbatch, tensors, grads, inputs)
        if tensors:
            with self._running(forward=False):
                torch.autograd.backward(tensors, grads)
        return [x.grad if x is not None else None for x in inputs]

    def _backward_on_version(self, microbatch: int, tensors: list, grads: list, inputs: list) -> list:
        """Backward through a weight snapshot: input gradients out, weight gradients into the live ``.grad``."""
        version = self._version_of.pop(microbatch)
        snapshot = self.versions.snapshot(version)
        wanted = [x for x in inputs if x is not None]
        with self._running(forward=False):
            results = (torch.autograd.grad(tensors, wanted + snapshot, grads, allow_unused=True) if tensors
                       else (None,) * (len(wanted) + len(snapshot)))
        for live, grad in zip(self.versions.live, results[len(wanted):]):
            if grad is not None:
                _accumulate(live, grad)
        self.versions.release(version)
        found = iter(results[: len(wanted)])
        return [next(found) if x is not None else None for x in inputs]

    def backward_input(
        self, microbatch: int, grad_outputs: list[torch.Tensor | None] | None
    ) -> list[torch.Tensor | None]:
        """The input-gradient half of :meth:`backward`; :meth:`backward_weight` must follow for ``microbatch``."""
        tensors, grads = self._roots(microbatch, grad_outputs)
        inputs = self._inputs.pop(microbatch)
        captures = self._captures.pop(microbatch, [])
        wanted = [x for x in inputs if x is not None]
        captured = [t for _, leaves in captures for t in leaves]
        extra = [p for p in self.loss_parameters if p.requires_grad] if grad_outputs is None else []
        results: list[torch.Tensor | None] = []
        if not self._unsplit and not self._looked_for_reentrant and tensors:
            self._looked_for_reentrant = True  # (before a split backward, which would run the nodes after it twice)
            self._unsplit = _reentrant_checkpoint_in(tensors)
            if self._unsplit:
                warnings.warn(_REENTRANT, stacklevel=2)
        if self._unsplit:
            return self._whole_backward(microbatch, tensors, grads, inputs)
        if tensors and (wanted or captured or extra):
            try:
                with self._running(forward=False):
                    results = list(torch.autograd.grad(tensors, wanted + captured + extra, grads, retain_graph=True,
                                                       allow_unused=True))
            except RuntimeError as error:
                if "use_reentrant=True" not in str(error):
                    raise
                self._unsplit = True  # (the graph was kept: its backward runs whole now)
                warnings.warn(_REENTRANT, stacklevel=2)
                return self._whole_backward(microbatch, tensors, grads, inputs)
            for param, grad in zip(extra, results[len(wanted) + len(captured):]):
                if grad is not None:
                    _accumulate(param, grad)
        self._weight_grads_owed[microbatch] = (tensors, grads, captures,
                                               results[len(wanted):len(wanted) + len(captured)])
        found = iter(results[: len(wanted)])
        return [next(found) if x is not None else None for x in inputs]

    def _whole_backward(self, microbatch: int, tensors: list, grads: list, inputs: list) -> list[torch.Tensor | None]:
        """:meth:`backward_input` where the backward cannot be split: the whole of it (weights too); the weight half
        has nothing left to do."""
        self._weight_grads_owed[microbatch] = None
        if tensors:
            with self._running(forward=False):
                torch.autograd.backward(tensors, grads)
        return [x.grad if x is not None else None for x in inputs]

    def backward_weight(self, microbatch: int) -> None:
        """The weight-gradient half of :meth:`backward` for a micro-batch that went through :meth:`backward_input`."""
        owed = self._weight_grads_owed.pop(microbatch)
        if owed is None:  # (its backward ran whole: :meth:`_whole_backward`)
            return
        tensors, grads, captures, captured_grads = owed
        # (the loss's own parameters took theirs in the input half: a module's own parameter the step reads, which
        # the last stage's module may hold too, would count twice)
        taken = {id(p) for p in self.loss_parameters}
        params = [p for p in self.module.parameters() if p.requires_grad and id(p) not in taken]
        if not tensors or not params:
            return
        trainable = frozenset(map(id, params))
        if trainable != self._split_for:  # (first, or other parameters train now: verified again)
            self._split_mode, self._split_for, self._split_checks = None, trainable, 0
        if self._split_mode is None and len({id(module) for module, _ in captures}) < len(captures):
            self._split_mode = "full"  # a module run twice in a micro-batch (a layer repeated, a holder of two ops)
        if self._split_mode is None:
            full = torch.autograd.grad(tensors, params, grads, retain_graph=True, allow_unused=True)
            split = self._weight_grads_from(captures, captured_grads, accumulate=False)
            same = all((g is None and id(p) not in split) or (g is not None and id(p) in split and
                       torch.allclose(_dense(split[id(p)]), _dense(g), rtol=1e-5, atol=1e-6))
                       for p, g in zip(params, full))
            blind = any(g is not None and not _dense(g).any() for g in full)  # all zeros: agrees whatever the split
            self._split_checks += 1
            if not same:
                self._split_mode = "full"
            elif not blind or self._split_checks >= _BLIND_CHECKS:
                self._split_mode = "captured"
            for param, grad in zip(params, full):
                if grad is not None:
                    _accumulate(param, grad)
        elif self._split_mode == "captured":
            self._weight_grads_from(captures, captured_grads, accumulate=True)
        else:
            torch.autograd.backward(tensors, grads, inputs=params)

    def _weight_grads_from(self, captures: list, captured_grads: list, accumulate: bool) -> dict[int, torch.Tensor]:
        """Back-propagate from each recorded module output to that module's own parameters."""
        sums: dict[int, torch.Tensor] = {}
        offset = 0
        for module, leaves in captures:
            outs = captured_grads[offset : offset + len(leaves)]
            offset += len(leaves)
            pairs = [(t, g) for t, g in zip(leaves, outs) if g is not None]
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not pairs or not own:
                continue
            roots, root_grads = [t for t, _ in pairs], [g for _, g in pairs]
            if accumulate:
                torch.autograd.backward(roots, root_grads, inputs=own, retain_graph=True)
                continue
            for param, grad in zip(own, torch.autograd.grad(roots, own, root_grads, retain_graph=True,
                                                            allow_unused=True)):
                if grad is not None:
                    sums[id(param)] = sums[id(param)] + grad if id(param) in sums else grad
        return sums

    def _roots(
        self, microbatch: int, grad_outputs: list[torch.Tensor | None] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        output = self._outputs.pop(microbatch)
        if grad_outputs is None:  # a scalar loss
            # one that needs no gradient (a micro-batch with nothing to learn from, torch.zeros(())) gives none;
            # end_step refuses a step where every micro-batch's needs none
            self._losses += 1
            if not output.requires_grad:
                self._gradless += 1
                return [], []
            return [output], [None]
        leaves = output if isinstance(output, _Released) else tree_flatten(output)[0]
        if len(leaves) != len(grad_outputs):
            raise RuntimeError(
                f"stage {self.stage_index} got {len(grad_outputs)} output gradients for {len(leaves)} outputs "
                f"of micro-batch {microbatch}"
            )
        pairs = [(t, g) for t, g in zip(leaves, grad_outputs)
                 if g is not None and t is not None and (isinstance(t, GradientEdge) or t.requires_grad)]
        return [t for t, _ in pairs], [g for _, g in pairs]

    def clear(self) -> None:
        """Drop everything kept for backward (after a failed or forward-only step), and what the batch norms recorded."""
        if self.norms is not None:
            self.norms.discard()
        self._inputs.clear()
        self._outputs.clear()
        self._weight_grads_owed.clear()
        self._captures.clear()
        if self.versions is not None:
            for microbatch in list(self._version_of):
                self.versions.release(self._version_of.pop(microbatch))

    @property
    def num_held(self) -> int:
        """Micro-batches whose activations are held for a backward still to come."""
        return len(self._outputs) + len(self._weight_grads_owed)


class _Released(list):
    """A sent output after :meth:`PipelineStage.release_output`: per leaf, its gradient edge, the leaf itself (an input
    passed through) or ``None`` (no gradient)."""


@functools.cache
def _backward_takes_edges() -> bool:
    """Whether ``torch.autograd.backward`` starts from gradient edges (torch >= 2.7; ``autograd.grad`` did earlier)."""
    x = torch.zeros(1, requires_grad=True)
    try:
        torch.autograd.backward([get_gradient_edge(x * 1.0)], [torch.ones(1)])
        torch.autograd.grad([get_gradient_edge(x * 1.0)], [x], [torch.ones(1)])
    except (TypeError, RuntimeError, AttributeError):
        return False
    return True


_REENTRANT = ("a layer of this stage runs torch.utils.checkpoint(..., use_reentrant=True), whose backward refuses "
              "torch.autograd.grad, which a schedule that splits the backward takes the input half with: this "
              "stage's backward runs whole (as in 1F1B), and the zero-bubble schedule's gain is lost here. Checkpoint "
              "with use_reentrant=False (torch's advice too) to keep the split")


def _reentrant_checkpoint_in(tensors: list[Any]) -> bool:
    """Whether the autograd graph behind ``tensors`` holds a reentrant checkpoint's node (looked for once per
    stage)."""
    pending = [t.grad_fn if isinstance(t, torch.Tensor) else t.node if isinstance(t, GradientEdge) else None
               for t in tensors]
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        pending.extend(next_node for next_node, _ in node.next_functions)
    return False


_BLIND_CHECKS = 64  # micro-batches whose check could not tell after which the split is taken as verified


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add ``grad`` to ``param.grad`` as autograd does: a first gradient laid out as the parameter (one from a view,
    a complex parameter's real part's, has other strides, and autograd's next accumulation into it warns of the
    gradient layout contract), later ones added."""
    if param.grad is not None:
        param.grad = param.grad + grad
    elif grad.layout == torch.strided and param.layout == torch.strided and grad.stride() != param.stride():
        param.grad = torch.empty_like(param, dtype=grad.dtype).copy_(grad)
    else:
        param.grad = grad


def _dense(grad: torch.Tensor) -> torch.Tensor:
    """A gradient to compare by value: a sparse one (``nn.Embedding(sparse=True)``'s) as its dense tensor."""
    return grad.to_dense() if grad.is_sparse else grad
