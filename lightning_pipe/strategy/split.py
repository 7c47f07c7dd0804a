"""Find the nn.Sequential of a LightningModule, cut it to this rank's layers, and run the module's steps around it."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.deferred import DeferredCalls
from lightning_pipe.strategy.model_calls import SKIPPED_BATCHES, ModelCalls, call_key, refuse_other_weights
from lightning_pipe.strategy.optimizers import stand_in
from lightning_pipe.strategy.references import LayerElsewhere, meta_skeleton, redirect
from lightning_pipe.strategy.share_warning import said_pickled, strategy_reads
from lightning_pipe.strategy.state_names import parameter_keys, tied_names
from lightning_pipe.strategy.step_values import input_needs_grad

__all__ = ["find_sequence", "PipelinedSequence", "SplitModule", "load_share", "with_grad", "listings_of", "by_user"]

_HOW_TO_CHOOSE = ("put the layers to pipeline in one nn.Sequential attribute that training_step or forward calls "
                  "(self.layers = nn.Sequential(...)), or name it with PipelineStrategy(layers='attribute.path')")


def find_sequence(module: nn.Module, path: str | None = None) -> tuple[str, nn.Sequential]:
    """The attribute path and the ``nn.Sequential`` to pipeline: the one at ``path``, else the only outermost one."""
    if path is not None:
        try:
            target = module.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(module).__name__} has no submodule {path!r}; pass layers= the attribute path of "
                             f"its nn.Sequential, e.g. layers='model.blocks'") from None
        if not isinstance(target, nn.Sequential):
            raise TypeError(f"layers={path!r} is a {type(target).__name__}, not an nn.Sequential; a pipeline cuts a "
                            f"sequence of layers: wrap them in nn.Sequential or name another attribute")
        return path, target
    candidates: list[tuple[str, nn.Sequential]] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Sequential) and name and not any(name.startswith(f"{c}.") for c, _ in candidates):
            candidates.append((name, child))
    if not candidates:
        raise ValueError(f"PipelineStrategy found no nn.Sequential in {type(module).__name__}: {_HOW_TO_CHOOSE}")
    if len(candidates) > 1:
        names = ", ".join(repr(name) for name, _ in candidates)
        raise ValueError(f"PipelineStrategy found several nn.Sequential in {type(module).__name__} ({names}) and "
                         f"cannot tell which to pipeline; choose one with "
                         f"PipelineStrategy(layers={candidates[0][0]!r})")
    return candidates[0]


class PipelinedSequence(nn.Module):
    """Stands in for the cut ``nn.Sequential``: holds this rank's layers, named as in the sequence, so that
    ``parameters()`` and ``state_dict()`` of the LightningModule are this rank's share with the full model's names.

    Inside a step it either records its input and answers with a stand-in output (first stage) or returns the last
    stage's output without computing anything (last stage), call by call (:mod:`.model_calls`); anywhere else it
    refuses to run, since most layers live on other ranks.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], path: str, names: Sequence[str] = (),
                 calls: ModelCalls | None = None) -> None:
        super().__init__()
        for name, layer in layers:
            self.add_module(name, layer)
        self._path = path
        self._names = list(names) or [name for name, _ in layers]  # every layer's name, in the sequence's order
        self.model_calls = calls or ModelCalls(f"the nn.Sequential at {path!r}")
        self.owner: Any = None  # the PipelineRunner that cut the module, for a later Trainer to adopt
        self.listed: set[int] | None = None  # inside a gradient hook (:meth:`listings`)
        self.indexed: set[int] | None = None
        self.named: set[int] | None = None  # layers reached one by one, by index or name (:meth:`reached_parameters`)
        self.listed_whole = False  # a listing of the user's went through all of this rank's layers (:meth:`listings`)

    def forward(self, *inputs: Any) -> Any:
        if self.model_calls.mode is not None:
            refuse_other_weights(self, self.model_calls.where)
        if self.model_calls.mode == "capture":
            return self.model_calls.record(inputs[0] if len(inputs) == 1 else inputs)
        if self.model_calls.mode == "output":
            return self.model_calls.answer(inputs)
        raise RuntimeError(f"the nn.Sequential at {self._path!r} is cut into pipeline stages (this rank holds layers "
                           f"{list(self._modules)}); it runs only as the model a training/validation/test/predict step "
                           f"calls under PipelineStrategy, not outside those steps, nor as a copy cut like it (the "
                           f"averaged model of Lightning's EMAWeightAveraging called in a step as a target: not "
                           f"supported, each rank holding only its share). To run the whole model elsewhere, load a "
                           f"checkpoint with YourModule.load_from_checkpoint(path)")

    def __prepare_scriptable__(self) -> nn.Module:  # torch.jit.script's look at the module, before compiling it
        raise RuntimeError(f"the nn.Sequential at {self._path!r} is cut into pipeline stages (this rank holds layers "
                           f"{list(self._modules)}), so it cannot be scripted or exported (to_torchscript, "
                           f"torch.jit.script): load a checkpoint with YourModule.load_from_checkpoint(path) and "
                           f"export the whole model on one device")

    def named_modules(self, memo: set[nn.Module] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        listed = self.listed if self.listed is not None and by_user() else None
        for name, module in super().named_modules(memo, prefix, remove_duplicate):
            if listed is not None and module is not self:
                listed.add(id(module))
            yield name, module
        if listed is not None:  # listed to the end (a loop over self.parameters(), not next(self.parameters()))
            self.listed_whole = True

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        listed = self.listed if self.listed is not None and by_user() else None
        for name, module in super().named_children():
            if listed is not None:
                listed.add(id(module))
            yield name, module

    @contextmanager
    def listings(self) -> Iterator[None]:
        """Inside (a gradient hook), the modules of this rank's layers that a listing of the sequence's modules
        (``modules()``, ``children()``: this rank's layers only) gave, and the layers reached by index (as every rank
        reaches them), are noted for :meth:`listed_here`."""
        self.listed, self.indexed, self.named, self.listed_whole = set(), set(), set(), False
        try:
            yield
        finally:
            self.listed = self.indexed = self.named = None

    def listed_here(self, module: nn.Module) -> bool:
        """Whether ``module`` is (inside) a layer this rank holds that only this rank's listing of the sequence's
        modules gave: the other ranks list their own layers instead, so a loop over the modules makes other calls
        on each rank (:meth:`listings`)."""
        return any(part is module for layer in self._listed_layers() for part in nn.Module.modules(layer))

    def listed_parameters(self) -> set[int]:
        """The ids of the parameters of this rank's layers that a listing of the sequence's modules gave and no index
        reached (:meth:`listings`): what the step's code reads while looping over ``self.parameters()`` or
        ``self.modules()``, which on one device covers every rank's layers."""
        return {id(param) for layer in self._listed_layers() for param in nn.Module.parameters(layer)}

    def reached_parameters(self) -> set[int]:
        """The ids of the parameters of this rank's layers the step's code reached one by one, by index or name
        (``self.net[-1]``, ``self.net.head``; not by a loop over the sequence or a slice), where it listed none of the
        sequence's modules (:meth:`listings`): a penalty over those alone is one device's."""
        if not self.named or self.listed:
            return set()
        return {id(param) for layer in self._modules.values() if layer is not None and id(layer) in self.named
                for param in nn.Module.parameters(layer)}

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        named = self.__dict__.get("named")
        if named is not None and isinstance(value, nn.Module) and name in self.__dict__["_modules"]:
            named.add(id(value))  # a layer reached by its name
        return value

    def _listed_layers(self) -> list[nn.Module]:
        """This rank's layers that a listing gave (they or a module inside them) and no index reached."""
        if self.listed is None or self.indexed is None:
            return []
        listed, indexed = self.listed, self.indexed
        return [layer for layer in self._modules.values() if layer is not None and id(layer) not in indexed
                and any(id(part) in listed for part in nn.Module.modules(layer))]

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int | slice) -> nn.Module:
        """The sequence's layer ``index`` where this rank holds it, else a stand-in that says which module it is (its
        ``parameters()`` are none); a slice as an ``nn.Sequential`` of those (this rank's share of its parameters)."""
        if isinstance(index, slice):
            return nn.Sequential(*(self._layer(i) for i in range(len(self))[index]))
        return self._layer(index, one=True)

    def _layer(self, index: int, one: bool = False) -> nn.Module:
        """Layer ``index`` (:meth:`__getitem__`), noted as reached by index; ``one``: reached alone (not in a loop
        over the sequence or a slice)."""
        name = self._names[index]  # IndexError as the nn.Sequential gives
        layer = self._modules.get(name)
        if self.indexed is not None and layer is not None:
            self.indexed.add(id(layer))
            if one and self.named is not None:
                self.named.add(id(layer))
        return layer if layer is not None else LayerElsewhere(f"{self._path}[{index}]", name, self._path)

    def __iter__(self) -> Iterator[nn.Module]:
        return (self._layer(index) for index in range(len(self)))

    def __getstate__(self) -> dict[str, Any]:
        # A copy or pickle of the module (a hyper-parameter holding it, say) takes this rank's layers, never the
        # runner and its process groups; a checkpoint stores hyper-parameters with the sequence whole instead.
        said_pickled(self)
        state = dict(self.__dict__)
        state["owner"], state["model_calls"] = None, ModelCalls(self.model_calls.where)
        return state


@contextmanager
def listings_of(root: nn.Module) -> Iterator[list[PipelinedSequence]]:
    """Inside, every cut sequence of ``root`` notes which of this rank's layers the user's listings of its modules
    give (:meth:`PipelinedSequence.listings`); yields the sequences."""
    sequences = [part for part in root.modules() if isinstance(part, PipelinedSequence)]
    with ExitStack() as stack:
        for sequence in sequences:
            stack.enter_context(sequence.listings())
        yield sequences


_TORCH_MODULES = nn.Module.named_modules.__code__.co_filename  # the listings' own frames (parameters(), modules())


def by_user() -> bool:
    """Whether the listing of modules being made (its frame's caller, past torch's listing functions) is the user's
    code's: not lightning_pipe's, Lightning's or torchmetrics' own (which read no parameters into a loss)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == _TORCH_MODULES:
        frame = frame.f_back
    if frame is None:
        return False
    path = frame.f_code.co_filename
    return not any(path.startswith(place) for place in _internal_places())


@functools.cache
def _internal_places() -> tuple[str, ...]:
    places = []
    for name in ("lightning_pipe", "lightning", "pytorch_lightning", "torchmetrics"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            places += [os.path.join(place, "") for place in spec.submodule_search_locations]
    return tuple(places)


@contextmanager
def whole_sequences(parts: Sequence[tuple[PipelinedSequence, nn.Module, str]], first: Mapping[str, str],
                    device: torch.device) -> Iterator[list[nn.Parameter]]:
    """Inside, each proxy of ``parts`` (``(proxy, its sequence's meta skeleton, the sequence's path prefix)``) holds
    every layer of its sequence in its order: other ranks' as copies of their meta skeleton whose parameters are
    placeholders on ``device`` (:func:`~.optimizers.stand_in`), or, for a parameter tied to one this rank holds (by
    ``first``: a name -> its tie's first name), this rank's copy, so that ``named_parameters()`` and ``modules()``
    list one device's names, in its order (a tie once, at its first name); yields the placeholders."""
    placeholders: list[nn.Parameter] = []
    local = {first.get(prefix + name, prefix + name): p for proxy, _, prefix in parts
             for name, p in proxy.named_parameters()}
    made: dict[int, tuple[torch.Tensor, nn.Parameter]] = {}  # (the meta parameter kept alive: its id stays its)
    saved = [(proxy, dict(proxy._modules)) for proxy, _, _ in parts]
    for (proxy, skeleton, prefix), (_, mine) in zip(parts, saved):
        if len(mine) == len(proxy._names):
            continue
        layers = {}
        for name in proxy._names:
            if name in mine:
                layers[name] = mine[name]
                continue
            layer = copy.deepcopy(skeleton._modules[name])
            for part_name, part in layer.named_modules(prefix=f"{prefix}{name}"):
                for key, meta in part._parameters.items():
                    if meta is None:
                        continue
                    full = f"{part_name}.{key}"
                    if id(meta) not in made:
                        tied = local.get(first.get(full, full))
                        if tied is None:
                            placeholders.append(stand_in(meta, device))
                        made[id(meta)] = meta, tied if tied is not None else placeholders[-1]
                    part._parameters[key] = made[id(meta)][1]
            layers[name] = layer
        proxy._modules.clear()
        proxy._modules.update(layers)
    try:
        yield placeholders
    finally:
        for proxy, mine in saved:
            proxy._modules.clear()
            proxy._modules.update(mine)


class SplitModule:
    """A LightningModule whose ``nn.Sequential`` is pipelined: cuts it, and runs the module's steps around it.

    The first stage runs a step only up to the sequence (:meth:`capture_input`): that is the pipeline's input. The
    last stage runs the step again with the sequence replaced by the pipeline's output (:meth:`run_step`), so the code
    after it (loss, ``self.log``, metrics) runs there unchanged.
    """

    scalar_kinds: list[str | None] | None = None  # the output's single numbers summed over micro-batches, where found

    def __init__(self, module: nn.Module, layers: str | None = None) -> None:
        self.module = module
        self.path, self.sequence = find_sequence(module, layers)
        self.state_keys = list(module.state_dict().keys())  # the full model's keys, in the full model's order
        self.parameter_keys = parameter_keys(module)  # one device's, in its order
        self.tied_names = tied_names(module)  # one device's numbering of optimizer states counts a tie once
        inside = {id(p) for p in self.sequence.parameters()}
        self.outside_trainable = [name for name, p in module.named_parameters()
                                  if p.requires_grad and id(p) not in inside]
        self.proxy: PipelinedSequence | None = None
        self.skeleton = meta_skeleton(self.sequence)  # the sequence's structure, for checkpoints' hyper-parameters
        self.aliases: list[str] = []  # other paths to the sequence or into it, redirected by install()
        self.deferred: DeferredCalls | None = None  # the last stage's calls before the sequence (install())

    @property
    def is_cut(self) -> bool:
        return self.proxy is not None

    def install(self, local_layers: Sequence[tuple[str, nn.Module]]) -> PipelinedSequence:
        """Replace the sequence by a proxy holding only ``local_layers``; the other layers are dropped."""
        parent_path, _, attribute = self.path.rpartition(".")
        parent = self.module.get_submodule(parent_path) if parent_path else self.module
        self.proxy = PipelinedSequence(local_layers, self.path, list(self.sequence._modules),
                                       ModelCalls(f"the nn.Sequential at {self.path!r}", self.module))
        setattr(parent, attribute, self.proxy)
        self.aliases = redirect(self.module, self.sequence, self.proxy, self.path)
        proxy = self.proxy
        device = next(iter(proxy.parameters()), torch.empty(0)).device
        self.deferred = DeferredCalls(self.module, lambda child: any(m is proxy for m in child.modules()), device)
        self.sequence = None  # type: ignore[assignment]
        return self.proxy

    # -- running steps around the sequence --------------------------------------------------------
    @contextmanager
    def whole(self, device: torch.device) -> Iterator[list[nn.Parameter]]:
        """Inside (while ``configure_optimizers`` runs), the proxy holds every layer of the sequence in its order
        (:func:`whole_sequences`); yields the placeholders of other ranks' parameters."""
        if self.proxy is None or self.skeleton is None:
            yield []
            return
        with whole_sequences([(self.proxy, self.skeleton, f"{self.path}." if self.path else "")], self.tied_names,
                             device) as placeholders:
            yield placeholders

    def capture_input(self, step: str, microbatch: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Run ``step`` on ``microbatch`` up to the sequence and return the sequence's input (of each call)."""
        calls = self._proxy().model_calls
        recorded = calls.capture(lambda: getattr(self.module, step)(microbatch, *args, **kwargs),
                                 call_key(step, args, kwargs))
        if recorded is None:
            raise RuntimeError(self._never_called(step))
        inputs = calls.as_input(recorded)
        if calls.needs_grad:
            raise ValueError(input_needs_grad(step, f"the nn.Sequential at {self.path!r}", self.outside_trainable,
                                              "move them into the nn.Sequential (e.g. make the embedding its first "
                                              "layer), or freeze them with requires_grad_(False)", recorded,
                                              self.module))
        return inputs

    def call_sizes(self) -> dict[int, set[tuple]]:
        """The sizes besides the rows of the sequence calls' inputs the last stage answered since the last time."""
        return self.proxy.model_calls.taken_sizes() if self.proxy is not None else {}

    def output_kinds(self, training: bool | None = None) -> list[str | None] | None:
        """How the model's single-number outputs add up over rows: not known for a sequence (its last layer's output
        is put together as a mean, the rare case of a number), unless the first batches' check of the loss found them
        summed (a VAE's KL summed over the batch, passed on by the decoder: :func:`.reduction.verdict`). In either
        mode (``training``) alike."""
        return self.scalar_kinds

    def run_step(self, step: str, output: Any, microbatch: Any, args: Sequence[Any],
                 kwargs: Mapping[str, Any]) -> Any:
        """Run ``step`` on ``microbatch`` with the sequence returning ``output``; returns what the step returns."""
        proxy = self._proxy()
        calls = proxy.model_calls
        calls.serve(output, lambda: proxy.training, step=step)
        deferring = self.deferred.around(lambda: calls.answered) if self.deferred is not None else nullcontext()
        try:
            with deferring:  # code before the sequence ran on the first stage: here it runs only where it is used
                result = getattr(self.module, step)(microbatch, *args, **kwargs)
            calls.finish(self._never_called(step))
        finally:
            calls.reset()
        return result

    def outside_parameters_with_grad(self) -> list[str]:
        """Trainable parameters outside the sequence that a step gave a gradient (the pipeline cannot train them)."""
        return with_grad(self.module, self.outside_trainable)

    def outside_error(self, names: Sequence[str]) -> str:
        return (f"training_step uses parameters outside the nn.Sequential at {self.path!r} that require grad "
                f"({', '.join(names)}); a pipeline trains only the layers inside it: move them into the nn.Sequential "
                f"(e.g. make the head its last layer), or freeze them with requires_grad_(False)")

    # -- state ------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Load a full model's ``state_dict``: all of it before the cut, this rank's share after it."""
        load_share(self.module, self.state_keys, state_dict, strict, self.is_cut)

    def _proxy(self) -> PipelinedSequence:
        if self.proxy is None:
            raise RuntimeError("the module is not cut yet: call install() first")
        return self.proxy

    def _never_called(self, step: str) -> str:
        return (f"{type(self.module).__name__}.{step} never called the nn.Sequential at {self.path!r}; the pipeline "
                f"runs that sequence, so {step} must call it (directly or through forward): {_HOW_TO_CHOOSE}"
                f"{SKIPPED_BATCHES}")


def with_grad(module: nn.Module, names: Sequence[str]) -> list[str]:
    """Those of the parameters ``names`` of ``module`` that have a gradient."""
    named = dict(module.named_parameters())
    return [name for name in names if name in named and named[name].grad is not None]


def load_share(module: nn.Module, state_keys: Sequence[str], state_dict: Mapping[str, Any], strict: bool,
               is_cut: bool) -> None:
    """Load a full model's ``state_dict`` into ``module``: all of it before the cut, this rank's share after it
    (``state_keys``: the full model's keys, for ``strict``)."""
    if not is_cut:
        module.load_state_dict(state_dict, strict=strict)
        return
    with strategy_reads():
        local_keys = module.state_dict().keys()
    if strict:  # the whole model's keys, so that every rank says the same and fails alike
        missing = [key for key in state_keys if key not in state_dict]
        unexpected = [key for key in state_dict if key not in set(state_keys)]
        if missing or unexpected:
            raise RuntimeError(f"the checkpoint does not match {type(module).__name__}: missing keys "
                               f"{_listed(missing)}, unexpected keys {_listed(unexpected)} (the module's "
                               f"strict_loading = False loads the keys that match)")
    module.load_state_dict({k: state_dict[k] for k in local_keys if k in state_dict}, strict=strict)


def _listed(keys: Sequence[str], shown: int = 10) -> str:
    return f"{list(keys[:shown])}" + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
