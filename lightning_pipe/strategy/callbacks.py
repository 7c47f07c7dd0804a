"""Lightning's callbacks on a cut module: those that need the strategy's help, and those it cannot honour.

Weight averaging (``StochasticWeightAveraging``, ``WeightAveraging`` and its EMA): both copy the whole LightningModule
in their ``setup`` hook, which runs before the strategy cuts the module, and later pair the copy's parameters with the
module's by position (``zip(average.parameters(), module.parameters())``). Once the module holds one rank's share, the
pairs no longer match: the first update fails on a shape, or, where the shapes happen to agree, averages one layer
into another silently. So, once cut, each such callback's copy is made again from the cut module. Its ``state_dict``
then has this rank's keys under the full model's names, which the pipeline's checkpoint merges across ranks like any
callback state; it loads this rank's share of a whole model's state (a resume gives it the checkpoint's).

``BatchSizeFinder`` (also what ``Tuner.scale_batch_size`` adds) is refused: its trial fits save and restore a
checkpoint at a path each rank names at random, and an out-of-memory trial on one stage would not end the others'.
``ModelPruning`` listed the layers to prune at setup, before the cut: once cut, it keeps this rank's. Its global
pruning by magnitude (its default) would take each rank's share of the amount by that share's own magnitudes: the
ranks agree on the whole model's threshold instead (a search over the magnitudes, each step a count summed over the
ranks), so the same weights go as on one device. Other global methods (random) prune each share by its own amount, and
a warning says so. A captured model is refused: its graph reads the parameters, not the masks pruning hooks apply.

``ModelSummary`` (and ``RichModelSummary``) count the parameters of the module each rank holds: rank 0, which prints,
would show its share as the model's. Their counts are the whole model's instead, each rank's share summed (a tied
parameter counted once). Their FLOPs and input and output sizes (from ``example_input_array``) come from the whole
model before the cut, run on fake tensors (shapes without data: no compute, no change to any buffer, and a model
built on the meta device runs too); a model whose forward fakes cannot run shows none, as before.

``ThroughputMonitor`` scales a device's rates by ``trainer.world_size`` for the job's: under a pipeline every rank of
a pipeline takes the same batches, so the job's samples per second were counted once per stage (twice on 2 stages).
Its rates are the pipelines' instead (one device's batch rate times the data-parallel replicas), and a device's
FLOPs its share of the job's (the module's ``flops_per_batch`` is the whole model's, run by every device together).

Fine-tuning callbacks add a parameter group when they unfreeze a module; where another rank added one, a rank holding
none of it adds an empty one (:func:`add_groups_everywhere`), so that their learning-rate changes by group index reach
the same group on every rank.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.engine.kept import kept_attributes

__all__ = ["check_callbacks", "fit_to_the_cut", "recopy_weight_averages", "prune_own_layers", "count_whole_model",
           "add_groups_everywhere", "regroup_after_restore", "count_throughput_per_pipeline", "summarize_before_cut"]


Gather = Callable[[torch.Tensor], torch.Tensor]
"""A tensor of every rank of the pipeline, stacked in stage order: a collective, called alike on every rank."""


def fit_to_the_cut(callbacks: Iterable[Any], module: Any, captured: bool, gather: Gather, rank: int,
                   gather_text: Callable[[str], list[str]], counted: Callable[[nn.Parameter], bool],
                   tie_name: Callable[[nn.Parameter], str | None] = lambda param: None) -> None:
    """Once the module is cut (before the strategy moves it to its device and precision, as the callbacks copied it):
    the weight-averaging callbacks' copies made again, ``ModelPruning`` given this rank's layers, the model summaries
    counting the whole model (``captured``: whether the model is a captured one; ``rank``: this rank's place in
    ``gather``'s order; ``gather_text``: every rank's text, in stage order; ``counted``: whether this rank counts a
    parameter it holds, once for all its holders; ``tie_name``: a tied parameter's name, the same on its holders)."""
    callbacks = list(callbacks)
    recopy_weight_averages(callbacks, module, gather)
    prune_own_layers(callbacks, module, captured, gather, rank, gather_text)
    count_whole_model(callbacks, gather_text, counted, tie_name)
    add_groups_everywhere(callbacks, gather_text)


def add_groups_everywhere(callbacks: Iterable[Any], gather_text: Callable[[str], list[str]]) -> None:
    """Lightning's fine-tuning callbacks (``BackboneFinetuning``, any ``BaseFinetuning``) add a parameter group when
    they unfreeze a module (``unfreeze_and_add_param_group``) only where the module has parameters not already in the
    optimizer: a rank holding none of the backbone added none, and the callback's later learning-rate changes to
    ``param_groups[-1]`` changed that rank's last group, the head's, instead. The ranks now tell each other
    (``gather_text``, over the pipeline) whether they added one, and where any did, the others add an empty group (at
    the learning rate the others' get); where none did (the backbone's parameters were in the optimizer from the
    start, as one device then adds none), none does (found by review: the rank without the backbone added one, so
    its head kept its learning rate). Every rank's groups are then one device's, by index. The call must be made on
    every rank, as ``BaseFinetuning``'s hooks make it."""
    from lightning.pytorch.callbacks import BaseFinetuning

    for callback in callbacks:
        if not isinstance(callback, BaseFinetuning) or "unfreeze_and_add_param_group" in vars(callback):
            continue
        original = callback.unfreeze_and_add_param_group

        def everywhere(modules: Any, optimizer: torch.optim.Optimizer, lr: float | None = None,
                       initial_denom_lr: float = 10.0, train_bn: bool = True, original: Any = original) -> None:
            before = len(optimizer.param_groups)
            group_lr = (optimizer.param_groups[0]["lr"] / initial_denom_lr) if lr is None else float(lr)
            original(modules, optimizer, lr=lr, initial_denom_lr=initial_denom_lr, train_bn=train_bn)
            added = len(optimizer.param_groups) > before
            anywhere = any(json.loads(text) for text in gather_text(json.dumps(added)))
            if anywhere and not added:  # another rank holds these modules' parameters
                optimizer.add_param_group({"params": [], "lr": group_lr})

        callback.unfreeze_and_add_param_group = everywhere  # type: ignore[method-assign]


def count_throughput_per_pipeline(callbacks: Iterable[Any], pipelines: int, devices: int) -> None:
    """Make each ``ThroughputMonitor``'s job-wide rates count ``pipelines`` data-parallel pipelines rather than every
    process, and its device FLOPs each of the ``devices`` processes' share of them. Call after the callbacks' ``setup``
    (which makes their meters from ``trainer.world_size``), at every fit, validate, test and predict."""
    from lightning.fabric.utilities.throughput import Throughput
    from lightning.pytorch.callbacks import ThroughputMonitor

    class PipelineThroughput(Throughput):
        per_pipeline = True

        def compute(self) -> dict[str, int | float]:
            metrics = super().compute()
            share = self.world_size / devices  # the job's FLOPs / devices: Lightning divided by world_size
            for name in (f"device{self.separator}flops_per_sec", f"device{self.separator}mfu"):
                if name in metrics:
                    metrics[name] *= share
            return metrics

    for callback in callbacks:
        if not isinstance(callback, ThroughputMonitor):
            continue
        for stage, meter in list(callback._throughputs.items()):
            if getattr(meter, "per_pipeline", False):
                continue
            callback._throughputs[stage] = PipelineThroughput(
                available_flops=meter.available_flops, world_size=pipelines, window_size=meter._time.maxlen,
                separator=meter.separator)


def regroup_after_restore(trainer: Any, module: Any) -> None:
    """A fine-tuning callback rebuilds the optimizer's groups of the run it resumes in its ``on_fit_start``, from the
    state its ``load_state_dict`` was given; Lightning calls that hook before it restores the callbacks' states of a
    strategy that restores after setup, as this one does, so the groups were not rebuilt and the optimizer's state,
    saved with more groups, failed to load. Called before the optimizers' states load, it runs that hook again for
    each callback still waiting to rebuild."""
    from lightning.pytorch.callbacks import BaseFinetuning

    for callback in trainer.callbacks:
        if isinstance(callback, BaseFinetuning) and getattr(callback, "_restarting", False):
            callback.on_fit_start(trainer, module)


def count_whole_model(callbacks: Iterable[Any], gather_text: Callable[[str], list[str]],
                      counted: Callable[[nn.Parameter], bool],
                      tie_name: Callable[[nn.Parameter], str | None] = lambda param: None) -> None:
    """Make each ``ModelSummary`` callback count the whole model's parameters: its rows are every rank's (the layers
    of each rank's stages, in stage order), each row's count and the totals summed over the ranks, a tied parameter
    once in each row that holds it (a tied head's row counts its weight, as one device's does; found by review: 0).
    Its summary is made on every rank, so the gather runs on every rank alike."""
    from lightning.pytorch.callbacks import ModelSummary as SummaryCallback
    from lightning.pytorch.utilities.model_summary import ModelSummary

    class WholeModelSummary(ModelSummary):
        def __init__(self, model: Any, max_depth: int = 1, whole: tuple[dict[str, Any], int] = ({}, 0),
                     aliases: dict[str, str] | None = None) -> None:
            super().__init__(model, max_depth)
            self._whole, self._whole_total = whole
            named = (aliases or {}).get  # a layer's second name (self.tied = self.head): its first, as one device's
            rows = [[named(name, name), layer.layer_type,
                     sum(p.numel() for p in layer._module.parameters() if counted(p) and tie_name(p) is None),
                     layer.training, {tie_name(p): p.numel() for p in layer._module.parameters()
                                      if tie_name(p) is not None}]
                    for name, layer in self._layer_summary.items()]
            held = [p for p in self._model.parameters() if counted(p)]
            modes = [[named(name, name), module.training] for name, module in self._model.named_modules() if name]
            mine = {"rows": rows, "total": sum(p.numel() for p in held), "modes": modes,
                    "trainable": sum(p.numel() for p in held if p.requires_grad)}
            shares = [json.loads(text) for text in gather_text(json.dumps(mine))]
            merged: dict[str, list[Any]] = {}
            ties: dict[str, dict[str, int]] = {}  # each row's tied parameters, by name: once, wherever held
            for share in shares:
                for name, kind, count, training, tied in share["rows"]:
                    merged.setdefault(name, [kind, 0, training])[1] += count
                    ties.setdefault(name, {}).update(tied)
            for name, tied in ties.items():
                merged[name][1] += sum(tied.values())
            self._rows = merged
            # the table's rows are every rank's: Lightning numbers them by the layers it summarized
            summarized = {named(name, name): layer for name, layer in self._layer_summary.items()}
            self._layer_summary = {name: summarized.get(name) for name in merged}
            self._totals = (sum(share["total"] for share in shares), sum(share["trainable"] for share in shares))
            every = {name: training for share in shares for name, training in share["modes"]}
            self._modes = {"train": sum(every.values()), "eval": len(every) - sum(every.values())}

        @property
        def layer_names(self) -> list[str]:
            return list(self._rows)

        @property
        def layer_types(self) -> list[str]:  # the model's own classes, not the pipeline's containers
            return [self._whole.get(name, {}).get("type", kind) for name, (kind, _, _) in self._rows.items()]

        @property
        def param_nums(self) -> list[int]:
            return [count for _, count, _ in self._rows.values()]

        @property
        def training_modes(self) -> list[bool]:
            return [training for _, _, training in self._rows.values()]

        @property
        def total_training_modes(self) -> dict[str, int]:
            return self._modes

        @property
        def total_parameters(self) -> int:
            return self._totals[0]

        @property
        def trainable_parameters(self) -> int:
            return self._totals[1]

        @property
        def flop_counts(self) -> dict[str, dict[Any, int]]:
            return {name: self._whole.get(name, {}).get("flops", {}) for name in self._rows}

        @property
        def total_flops(self) -> int:
            return self._whole_total

        def _forward_example_input(self) -> None:  # the cut module cannot run the whole model: see summarize_before_cut
            pass

        @property
        def in_sizes(self) -> list[Any]:
            return [self._whole.get(name, {}).get("in", "?") for name in self._rows]

        @property
        def out_sizes(self) -> list[Any]:
            return [self._whole.get(name, {}).get("out", "?") for name in self._rows]

        def _get_summary_data(self) -> list[tuple[str, list[str]]]:
            arrays = super()._get_summary_data()
            if self._whole and not any(name == "In sizes" for name, _ in arrays):  # example_input_array set aside
                arrays += [("In sizes", [str(size) for size in self.in_sizes]),
                           ("Out sizes", [str(size) for size in self.out_sizes])]
            return arrays

    for callback in callbacks:
        if isinstance(callback, SummaryCallback) and type(callback)._summary is SummaryCallback._summary:
            callback._summary = lambda trainer, module, callback=callback: WholeModelSummary(
                module, callback._max_depth, getattr(callback, "_pipeline_whole_model", ({}, 0)),
                getattr(callback, "_pipeline_aliases", None))


def summarize_before_cut(callbacks: Iterable[Any], module: Any) -> None:
    """Give each ``ModelSummary`` callback the whole model's FLOPs and input and output sizes per layer, while the
    module is whole: Lightning's summary of its ``example_input_array`` run on fake tensors (their shapes only, on any
    device, meta included), the module's trainer set aside so that the input stays on the module's device. Where the
    fakes cannot run the forward (a size read as a number), the summary shows none, as without an example input."""
    from lightning.pytorch.callbacks import ModelSummary as SummaryCallback
    from lightning.pytorch.utilities.model_summary import ModelSummary
    from torch._subclasses.fake_tensor import FakeTensorMode

    wanted = [callback for callback in callbacks if isinstance(callback, SummaryCallback) and callback._max_depth]
    aliases = _second_names(module) if wanted else {}
    for callback in wanted:
        callback._pipeline_aliases = aliases
    if not wanted or getattr(module, "example_input_array", None) is None or any(
            isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        return  # (a lazy layer would take meta weights: refused at the cut, with the fix)
    trainer, module._trainer = module._trainer, None
    try:
        for callback in wanted:
            try:
                with FakeTensorMode(allow_non_fake_inputs=True), kept_attributes([module]):
                    whole = ModelSummary(module, max_depth=callback._max_depth)
                rows = {name: {"type": kind, "flops": flops, "in": size_in, "out": size_out}
                        for name, kind, flops, size_in, size_out in zip(whole.layer_names, whole.layer_types,
                                                                        whole.flop_counts.values(), whole.in_sizes,
                                                                        whole.out_sizes)}
                callback._pipeline_whole_model = (rows, whole.total_flops)
            except Exception:  # noqa: BLE001 - the summary goes on without them, as one device's would without
                callback._pipeline_whole_model = ({}, 0)
    finally:
        module._trainer = trainer


def _second_names(module: nn.Module) -> dict[str, str]:
    """Each further name of a submodule reachable by several (``self.tied = self.head``, and its children's) -> its
    first, which one device's summary lists it by: a rank holding the layer, whose other names lead elsewhere after
    the cut, listed it by the second."""
    first: dict[int, str] = {}
    second: dict[str, str] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        if name and first.setdefault(id(sub), name) != name:
            second[name] = first[id(sub)]
    return second


def recopy_weight_averages(callbacks: Iterable[Any], module: Any, gather: Gather) -> int:
    """Make each weight-averaging callback's copy of ``module`` again from the cut module; the number of callbacks
    changed. A callback that has not made its copy yet (outside ``fit``) is left alone."""
    # Imported here: the callbacks' module imports much of Lightning, and the strategy needs it only with them.
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning < 2.6
        WeightAveraging = ()  # type: ignore[assignment,misc]  # noqa: N806
    changed = 0
    for callback in callbacks:
        if getattr(callback, "_average_model", None) is None:
            continue
        if isinstance(callback, StochasticWeightAveraging):
            # Whether to add an epoch that recomputes batch-norm statistics is asked of the module at fit start: of
            # the whole model on every rank, or ranks without a BatchNorm would stop an epoch earlier than the rest.
            whole = bool(gather(torch.tensor([callback.pl_module_contains_batch_norm(module)])).any())
            callback.pl_module_contains_batch_norm = lambda pl_module: whole
            callback._average_model = _loads_a_share(copy.deepcopy(module))
        elif isinstance(callback, WeightAveraging):
            from torch.optim.swa_utils import AveragedModel

            callback._average_model = _loads_a_share(AveragedModel(
                model=module, device=callback._device or module.device, use_buffers=callback._use_buffers,
                **callback._kwargs))
        else:
            continue
        changed += 1
    return changed


def _loads_a_share(average: nn.Module) -> nn.Module:
    """``average``, whose ``load_state_dict`` takes the whole model's state (a resumed checkpoint's) and loads this
    rank's share of it; with ``strict``, a key of the share that the state lacks is still an error."""
    load = average.load_state_dict

    def load_share(state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        own = average.state_dict().keys()
        missing = [key for key in own if key not in state_dict]
        if strict and missing:
            raise RuntimeError(f"the averaged model's state lacks {missing[:10]} of this rank's share")
        return load({key: state_dict[key] for key in own if key in state_dict}, strict=strict, assign=assign)

    average.load_state_dict = load_share  # type: ignore[method-assign]
    return average


def check_callbacks(callbacks: Iterable[Any], loggers: Iterable[Any] = ()) -> None:
    """Refuse the callbacks a pipeline cannot run; warn of those, and of loggers' options, that run otherwise than on
    one device."""
    from lightning.pytorch.callbacks import BatchSizeFinder, ModelPruning
    from lightning.pytorch.utilities import rank_zero_warn

    if any(getattr(logger, "_log_graph", False) is True for logger in loggers):  # (fast_dev_run's DummyLogger
        # answers any name with a method)
        rank_zero_warn("TensorBoardLogger(log_graph=True) draws the model's graph by running the whole model on its "
                       "example_input_array, which no rank holds under PipelineStrategy: no graph is logged (Lightning "
                       "then says example_input_array is not set; the pipeline keeps it from Lightning, which would "
                       "run it). Draw the graph from a one-device run of the model")

    for callback in callbacks:
        if isinstance(callback, BatchSizeFinder):
            raise ValueError("BatchSizeFinder (Tuner.scale_batch_size) cannot run under PipelineStrategy: its trial "
                             "fits save and restore a checkpoint at a path each rank names at random, and a trial that "
                             "runs out of memory on one stage would not end the others'. Find the batch size with a "
                             "one-device run of the model, or plan the pipeline's memory with python -m "
                             "lightning_pipe.plan, then pass batch_size to the DataLoader")
        if isinstance(callback, ModelPruning) and getattr(callback, "_use_global_unstructured", False) \
                and not _prunes_by_global_l1(callback):
            rank_zero_warn("ModelPruning(use_global_unstructured=True) with a pruning method other than "
                           "l1_unstructured, or with importance scores of its own, prunes each pipeline rank's share "
                           "of the model by that share's own amount, not the whole model's, so other weights are "
                           "pruned than on one device; use_global_unstructured=False prunes each layer by its own "
                           "amount, as one device does")


def prune_own_layers(callbacks: Iterable[Any], module: nn.Module, captured: bool, gather: Gather, rank: int,
                     gather_text: Callable[[str], list[str]] | None = None) -> None:
    """Leave each ``ModelPruning`` the layers this rank holds of those it listed at setup (the others are on other
    ranks, or on the meta device here), make its global L1 pruning the whole model's, and its ``verbose`` report the
    whole model's counts (found by review: rank 0's share, 44.92% where 50% was pruned). Refused on a captured model:
    pruning swaps a layer's weight for a masked copy that a forward hook makes, and a captured graph reads the
    original parameter, never the hook's."""
    from lightning.pytorch.callbacks import ModelPruning
    from lightning.pytorch.callbacks.pruning import _LayerRef

    own = {id(p) for p in module.parameters()}
    for callback in callbacks:
        listed = getattr(callback, "_parameters_to_prune", None)
        if not isinstance(callback, ModelPruning) or not listed:
            continue
        if captured:
            raise ValueError("ModelPruning cannot prune a captured model: it replaces each pruned weight by a masked "
                             "copy made in a forward hook, and the captured graph reads the original parameter, so "
                             "nothing would be pruned. Keep the layers to prune in one nn.Sequential, which the "
                             "pipeline runs eagerly with their hooks, or prune after training")
        callback._parameters_to_prune = [(layer, name) for layer, name in listed
                                         if id(getattr(layer, name, None)) in own]
        places = {(id(layer), name): index for index, (layer, name) in enumerate(listed)}  # one device's order
        callback._pipeline_places = [places[(id(layer), name)] for layer, name in callback._parameters_to_prune]
        if _prunes_by_global_l1(callback):
            callback._apply_global_pruning = functools.partial(_global_l1, callback, gather, rank)
        if gather_text is not None:
            callback._log_sparsity_stats = functools.partial(_sparsity_stats, callback, gather, gather_text, rank)
        if callback._original_layers is not None:  # the lottery ticket's initial weights, regrouped as setup does
            callback._original_layers = {}
            for index, (layer, name) in enumerate(callback._parameters_to_prune):
                entry = callback._original_layers.setdefault(id(layer), _LayerRef(data=copy.deepcopy(layer), names=[]))
                entry["names"].append((index, name))


def _sparsity_stats(callback: Any, gather: Gather, gather_text: Callable[[str], list[str]], rank: int,
                    prev: list[tuple[int, int]], curr: list[tuple[int, int]], amount: int | float = 0) -> None:
    """``ModelPruning._log_sparsity_stats`` over the whole pipeline: the zeros and sizes of every rank's layers
    summed, logged on the first stage's rank as Lightning logs one device's (with ``verbose=2``, every layer's line,
    in stage order). Called alike on every rank (collectives)."""
    import logging

    counts = torch.tensor([sum(zeros for zeros, _ in prev), sum(zeros for zeros, _ in curr),
                           sum(total for _, total in curr)], dtype=torch.float64)
    before, after, total = (int(value) for value in gather(counts).reshape(-1, 3).sum(0).tolist())
    lines = []
    if callback._verbose == 2:  # (each at its place in one device's list of what to prune)
        for place, (layer, name), (was, size), (now, now_size) in zip(callback._pipeline_places,
                                                                       callback._parameters_to_prune, prev, curr):
            lines.append((place, f"Applied `{callback._pruning_method_name}` to `{layer!r}.{name}` with amount="
                                 f"{amount}. Pruned: {was} ({was / size:.2%}) -> {now} ({now / now_size:.2%})"))
    texts = gather_text(json.dumps(lines)) if callback._verbose == 2 else []
    if rank != 0 or total == 0 or torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # (one line per job: replicas prune alike)
    log = logging.getLogger("lightning.pytorch.callbacks.pruning")
    log.info(f"Applied `{callback._pruning_method_name}`. Pruned: {before}/{total} ({before / total:.2%}) -> "
             f"{after}/{total} ({after / total:.2%})")
    for _, line in sorted(entry for text in texts for entry in json.loads(text)):
        log.info(line)


def _prunes_by_global_l1(callback: Any) -> bool:
    """Whether ``callback`` prunes globally by the weights' magnitudes (its default), which ranks can agree on."""
    from torch.nn.utils import prune

    return (getattr(callback, "_use_global_unstructured", False) and callback.pruning_fn is prune.L1Unstructured
            and not callback._global_kwargs.get("importance_scores"))


def _global_l1(callback: Any, gather: Gather, rank: int, amount: float | int) -> None:
    """``ModelPruning._apply_global_pruning`` over the whole pipeline: the ``amount`` of the model's remaining weights
    with the smallest magnitudes, found by agreeing on the magnitude at which the whole model's count reaches it;
    each rank then prunes as many of its own as fall below it (ties at it go to the earlier stages, as one device's
    order of the parameters has them). Called alike on every rank (collectives)."""
    from torch.nn.utils import prune

    listed = callback._parameters_to_prune
    remaining = []
    for layer, name in listed:
        magnitudes = getattr(layer, name).detach().abs().flatten()
        mask = getattr(layer, name + "_mask", None)
        remaining.append(magnitudes[mask.flatten() == 1] if mask is not None else magnitudes)
    bits = torch.cat(remaining).float().cpu().view(torch.int32) if remaining else torch.empty(0, dtype=torch.int32)
    total = int(gather(torch.tensor([bits.numel()], dtype=torch.float64)).sum())
    count = round(amount * total) if isinstance(amount, float) else int(amount)
    if count <= 0:
        return
    low, high = 0, 0x7F800000  # non-negative floats order as their bits: the smallest whose count reaches ``count``
    while low < high:
        middle = (low + high) // 2
        if int(gather(torch.tensor([(bits <= middle).sum().item()], dtype=torch.float64)).sum()) >= count:
            high = middle
        else:
            low = middle + 1
    below, at = int((bits < low).sum()), int((bits == low).sum())
    shares = gather(torch.tensor([below, at], dtype=torch.float64))  # (ranks, 2): to share out the ties in order
    ties = count - int(shares[:, 0].sum())  # those at the magnitude found, shared out to the ranks in stage order
    mine = below + max(0, min(at, ties - int(shares[:rank, 1].sum())))
    if listed and mine:
        prune.global_unstructured(listed, pruning_method=prune.L1Unstructured, amount=mine)
