"""The parts of a captured model on a rank: a :class:`ModelPart` at every module path of the model, holding this rank's
share of that module's state (perhaps none), so that ``self.model.classifier.parameters()`` works on every rank; the
proxy of :mod:`.captured` is built of them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from lightning_pipe.capture.assignments import PLAIN_VALUES, plain_list, stored_attributes, stored_refusal
from lightning_pipe.strategy.held_elsewhere import HeldElsewhere, in_a_method, methods_in_hooks, refuse_escaped
from lightning_pipe.strategy.logger_calls import in_step_code

__all__ = ["ModelPart", "mode_of", "ModelPartList", "complete", "mirror", "in_model_order", "plain_attribute",
           "shape_only", "METHODS", "stand_in_attribute", "has_state", "whole_buffer", "written_through"]


# Methods that name parameters rather than compute with them: timm's, which its create_optimizer_v2 asks for (with
# hasattr, so a refusal would silently give the position embedding weight decay).
NAMING_METHODS = frozenset({"no_weight_decay", "no_weight_decay_keywords", "group_matcher"})


def plain_attribute(module: nn.Module | None, name: str, refusal: Callable[[], str],
                    holder: nn.Module | None = None) -> Any:
    """``module``'s attribute ``name`` where it is plain data (a config, a size), a static or class method (which
    reaches no instance), or a method that only names parameters (:data:`NAMING_METHODS`); another of its methods
    runs on ``holder`` (its stand-in), where it may read the parameters' dtype, device and shape but not their values
    (:func:`shape_only`: an RNN's ``init_hidden``); a module, a tensor or anything else callable (which would reach
    other ranks' weights) raises ``AttributeError(refusal())``."""
    if module is None:
        raise AttributeError(name)
    value = getattr(module, name)  # AttributeError: the module has none either
    if name in NAMING_METHODS and callable(value):
        return value
    if name in WHOLE_MODEL_METHODS and callable(value):
        return functools.partial(_refused_whole, name, type(module).__name__)
    if holder is not None and inspect.ismethod(value) and value.__self__ is module and name != "generate":
        return functools.partial(shape_only, value.__func__, holder, refusal)
    getter = inspect.getattr_static(type(module), name, None)
    if isinstance(getter, staticmethod) or isinstance(getter, classmethod) and value.__self__ is type(module):
        return value  # no instance to reach (Hugging Face's Wav2Vec2ForPreTraining.compute_contrastive_logits)
    if holder is not None and isinstance(getter, property) and isinstance(value, nn.Module):
        # a property giving a module of the model (Hugging Face's base_model, which get_input_embeddings asks for):
        # computed on the stand-in, it gives that module's stand-in
        return shape_only(getter.fget, holder, refusal)  # type: ignore[arg-type]
    if isinstance(getter, property) and inspect.isfunction(value) and not _closes_over_modules(value):
        return value  # a property giving a plain function (Hugging Face's loss_function: ForCausalLMLoss, found by
        # review), which holds no weights
    if isinstance(value, (nn.Module, torch.Tensor)) or callable(value):
        raise AttributeError(refusal())
    return value


def _closes_over_modules(function: Any) -> bool:
    """Whether ``function`` keeps a module or a tensor in its closure or defaults (a lambda over the model)."""
    held = [*(function.__defaults__ or ()), *(function.__kwdefaults__ or {}).values()]
    for cell in function.__closure__ or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # (an empty cell)
            continue
    return any(isinstance(item, (nn.Module, torch.Tensor)) for item in held)


# Methods that would write or count the whole model's weights, where this rank holds a share: Hugging Face's and
# PEFT's save_pretrained wrote this rank's share of the weights (or adapters) silently, num_parameters counted them.
WHOLE_MODEL_METHODS = frozenset({"save_pretrained", "push_to_hub", "num_parameters", "get_memory_footprint"})


def _refused_whole(name: str, kind: str, *args: Any, **kwargs: Any) -> Any:
    if name in ("num_parameters", "get_memory_footprint"):
        raise RuntimeError(f"{kind}.{name}() under PipelineStrategy would count this rank's share of the model only "
                           f"(its stages' parameters): count it before the fit (in __init__ or configure_model, "
                           f"where the model is whole) and keep the number, or read the whole model's count from "
                           f"Lightning's model summary, which the strategy makes before the cut")
    raise RuntimeError(f"{kind}.{name}(...) under PipelineStrategy would write this rank's share of the weights only "
                       f"(its stages'; the other ranks hold the rest): save the whole model with "
                       f"trainer.save_checkpoint(path), which every rank calls, then on one process load it "
                       f"(YourModule.load_from_checkpoint(path)) and call {name} on its model there")


METHODS = "a method of it may read its parameters' dtype, device and shape, not their values"
# what may be done with a parameter in a method run on a stand-in: make a new tensor of its dtype and device
_FACTORIES = frozenset({"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "new", "zeros_like",
                        "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"})


class _NoValues(TorchFunctionMode):
    """Refuses any op that reads the values of the given tensors or of their aliases (``.data``, ``.detach()``):
    their metadata and new tensors made like them stay allowed."""

    def __init__(self, tensors: list[torch.Tensor], refusal: Callable[[], str]) -> None:
        super().__init__()
        self.tensors = list(tensors)  # kept alive, so that their ids stay theirs
        self.ids = {id(tensor) for tensor in tensors}
        self.refusal = refusal

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        touched = any(isinstance(leaf, torch.Tensor) and id(leaf) in self.ids
                      for leaf in pytree.tree_leaves((args, kwargs)))
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        if not touched or name in _FACTORIES or not isinstance(out, torch.Tensor):
            return out
        if name in ("__get__", "detach"):  # .data, .grad, .detach(): an alias of it
            self.tensors.append(out)
            self.ids.add(id(out))
            return out
        raise RuntimeError(self.refusal())


def shape_only(function: Callable[..., Any], holder: nn.Module, refusal: Callable[[], str], *args: Any,
               **kwargs: Any) -> Any:
    """A model's method run on ``holder``, its stand-in on this rank (its plain attributes, this rank's share of its
    parameters, its whole buffers): allowed to read the parameters' dtype, device and shape (``next(
    self.parameters()).new_zeros(layers, rows, size)``), refused with ``refusal()`` where it computes with their
    values, which this rank holds only a share of (where it holds all of them, the method computes with them)."""
    held = list(holder.parameters())
    original = holder.__dict__.get("_original")
    whole = original is not None and len(held) == sum(1 for _ in original.parameters())  # this rank holds them all
    try:
        with _NoValues([] if whole else held, refusal), methods_in_hooks(not in_step_code()):
            return refuse_escaped(function(holder, *args, **kwargs))
    except StopIteration as error:  # next(self.parameters()) on a rank holding none of them
        raise RuntimeError(refusal()) from error


def stand_in_attribute(holder: nn.Module, original: nn.Module | None, name: str, where: str,
                       refusal: Callable[[], str]) -> Any:
    """What ``holder``, the stand-in of ``original`` (at ``where``), gives for an attribute it does not hold itself:
    a refusal for a tensor the captured forward stored there; a whole buffer; plain data or a method run on the
    stand-in (:func:`plain_attribute`); else ``AttributeError(refusal())``."""
    if original is not None and name in stored_attributes(original):
        raise AttributeError(stored_refusal(name, where))
    buffer = whole_buffer(original, name)
    if buffer is not None:
        return buffer
    return plain_attribute(original, name, refusal, holder)


# PEFT's switches, which a step's `with model.disable_adapter():` flips for a reference model's outputs (DPO, a KL to
# the base model): each layer's adapters are on the rank that holds it, and the step's code runs on the last stage
_ADAPTER_SWITCH = ("PEFT's disable_adapter() and set_adapter() switch the adapters in every layer, which are spread "
                   "over the pipeline's ranks, while the step's code runs on the last stage alone. For a reference "
                   "model's outputs (DPO, a KL to the base model), compute them before the fit (as TRL's "
                   "precompute_ref_log_probs does) and pass them with the batch, or keep a frozen copy of the base "
                   "model beside the adapted one in the LightningModule (it stays whole on every rank) and call it "
                   "in the step")


# torch.nn.utils.prune's pruning, done again during the fit (found by review: the refusal named neither)
_PRUNED = ("it is a pruned weight, which torch.nn.utils.prune recomputes from weight_orig and weight_mask in a forward "
           "pre-hook that the captured graphs run as they were captured: pruning a captured model during the fit is "
           "not supported. Prune before the fit (in __init__: the masks are then buffers the capture reads), or "
           "pipeline an nn.Sequential, whose layers Lightning's ModelPruning callback prunes on the rank holding "
           "them")


def _share(holder: nn.Module, original: nn.Module | None) -> str:
    """How much of ``original`` (a module of the model) ``holder``, its stand-in, holds on this rank, in words."""
    held = sum(1 for _ in holder.parameters())
    whole = sum(1 for _ in original.parameters()) if original is not None else held
    return "all the parameters" if held and held == whole else "only its share" if held else "none"


def written_through(original: nn.Module | None, holder: nn.Module, name: str, value: Any) -> bool:
    """Give ``original`` what ``holder`` (its stand-in) was given, where the captures read it from ``original``; whether
    it did (else the stand-in keeps the value itself):

    - a plain value for an attribute ``original`` holds as plain data (a temperature, a dropout's ``p``, None, a list
      of the blocks that run): set there, and the stand-in reads it from there;
    - a tensor for one of ``original``'s buffers: copied into the buffer, which the graphs read (a new tensor of
      another shape or dtype is an error: they read the buffer they were captured with);
    - a tensor for a tensor ``original`` keeps as a plain attribute: set there (the graphs kept the old one as a
      constant, which the next step's check refuses, saying to register a buffer)."""
    if original is None or name in holder.__dict__:
        return False
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        buffer = original._buffers.get(name)
        if buffer is not None:
            if buffer.shape != value.shape or buffer.dtype != value.dtype:
                raise ValueError(f"buffer {name!r} of a pipelined model ({tuple(buffer.shape)}, {buffer.dtype}) was "
                                 f"given a tensor of {tuple(value.shape)}, {value.dtype}: under PipelineStrategy the "
                                 f"captured graphs read the buffer they were captured with, so a new value must keep "
                                 f"its shape and dtype (it is copied in)")
            held = holder._buffers.get(name)  # the stand-in's own, where this rank holds it: the same tensor
            with torch.no_grad():
                for target in (buffer,) if held is None or held is buffer else (buffer, held):
                    if not target.is_meta:
                        target.copy_(value)
            return True
        if isinstance(original.__dict__.get(name), torch.Tensor):
            setattr(original, name, value)
            return True
        return False
    if not (_plain(value) and name in original.__dict__ and _plain(original.__dict__[name])):
        return False
    setattr(original, name, value)
    return True


def _plain(value: Any) -> bool:
    """A value the captures read as plain data: a number, flag or string, None, or a short list of those."""
    return type(value) in PLAIN_VALUES or value is None or plain_list(value)


def whole_buffer(original: nn.Module | None, name: str) -> torch.Tensor | None:
    """``original``'s buffer ``name`` where every rank holds it whole (a captured model's buffers stay whole), so that
    reading it, or changing it in place, is the same on every rank; None for none."""
    buffer = original._buffers.get(name) if original is not None else None
    return buffer if buffer is not None and not buffer.is_meta else None


def has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def mode_of(attribute: str) -> Any:
    """A stand-in's ``training``: the mode of the module it keeps in ``attribute`` (not a submodule), read and set
    there; its own where it keeps none (a copy without it)."""
    def get(self: nn.Module) -> bool:
        original = self.__dict__.get(attribute)
        return original.training if original is not None else self.__dict__.get("_training", True)

    def put(self: nn.Module, mode: bool) -> None:
        original = self.__dict__.get(attribute)
        if original is not None:
            original.training = mode
        else:
            self.__dict__["_training"] = mode

    return property(get, put)


class ModelPart(nn.Module):
    """Stands for a module of a captured model under its path: holds this rank's share of its state (perhaps none),
    so that ``parameters()`` of it work on every rank (and indexing, for a container: :class:`ModelPartList`); its
    plain attributes (``out_features``) are read from that module; running it is refused (only the step's call of the
    whole model runs its parts, stage by stage)."""

    def __init__(self, name: str, model_path: str, original: nn.Module) -> None:
        super().__init__()
        self.part_name, self.model_path = name, model_path
        self.reason: str | None = None  # why it cannot run, where not the usual (set by the install)
        object.__setattr__(self, "_original", original)  # not a submodule: its weights are other ranks'
        # the module's state-dict hooks (torch's checkpoint_wrapper drops its _checkpoint_wrapped_module. prefix):
        # this rank's share is saved and loaded under the names one device's state_dict gives
        for table in ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                      "_load_state_dict_post_hooks"):
            getattr(self, table).update(getattr(original, table, {}))

    # isinstance() sees the module's class, as user code and Lightning's callbacks look for modules by it (a frozen
    # backbone's batch norms put in eval in a hook, BaseFinetuning's freezing), alike on every rank; type() stays this
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        original = self.__dict__.get("_original")
        return type(original) if original is not None else type(self)

    def __reduce_ex__(self, protocol: Any) -> Any:  # (pickle reads __class__; the part is a part)
        return object.__new__, (type(self),), self.__dict__.copy()

    # The mode is the module's own: set through the part (Lightning's eval() and its putting back of each module's
    # mode after validation, a frozen backbone's .eval()), it is the module's, which the captured graphs follow.
    training = mode_of("_original")  # type: ignore[assignment]

    def train(self, mode: bool = True) -> ModelPart:
        """The module's own ``train(mode)`` (an override keeping its batch norms in eval, as mmdetection's
        ``norm_eval`` does, runs): its parts' modes are its modules'."""
        original = self.__dict__.get("_original")
        if original is None:
            return super().train(mode)
        original.train(mode)  # (a batch norm held as itself is the module's own)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.reason is not None:
            raise RuntimeError(self.reason)
        where = f"the model at {self.model_path!r}" if self.model_path else "the module's forward"
        raise RuntimeError(f"{self.part_name!r} is part of {where}, which is cut into pipeline stages (this rank "
                           f"holds {'part' if has_state(self) else 'none'} of its weights); under PipelineStrategy "
                           f"only the step's call of the whole model runs its parts. Call the model; where a step "
                           f"needs this part's output (features for a kNN monitor or a linear probe), have the "
                           f"model's forward return it beside its output (return features, output) and use it "
                           f"from there; or load a checkpoint with YourModule.load_from_checkpoint(path) to run it "
                           f"whole")

    def __setattr__(self, name: str, value: Any) -> None:
        if not written_through(self.__dict__.get("_original"), self, name, value):
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        # (read from __dict__: an attribute looked up while __init__ runs must not look up another)
        part, original = self.__dict__.get("part_name", ""), self.__dict__.get("_original")
        if original is not None and name in original._parameters:
            refusal = lambda: (  # noqa: E731
                f"{name!r} of {part!r} is held by another rank: under PipelineStrategy the model is cut into stages, "
                f"and this rank holds {'part' if has_state(self) else 'none'} of the parameters of {part!r}. Code that "
                f"changes parameters or their gradients (an on_after_backward masking rows of an embedding) reaches "
                f"the ones each rank holds through self.named_parameters(), run by every rank over its own (a "
                f"parameter tied across stages is held, and named, on each rank that uses it: match every name it "
                f"has); a penalty on the weights in the step (L2, L1, orthogonality) goes there too, as its gradient "
                f"(for lambda * ||p||^2: p.grad.add_(p, alpha=2 * lambda)); to compute with the values (logits from "
                f"the embedding's weight), do it in the model: a head whose weight is tied to the embedding stays tied "
                f"across stages")
            if in_a_method() and not any(True for _ in self.parameters()):  # a hook's call of a method that changes
                # its module's parameters in place (lightly's prototypes.normalize()): done where they are held
                return HeldElsewhere.of(original._parameters[name], refusal())
            return stand_in_attribute(self, original, name, part, refusal)
        return stand_in_attribute(self, original, name, part, lambda: (
            f"{name!r} of {part!r} is not available under PipelineStrategy: the model is cut into stages and this "
            f"rank holds {_share(self, original)} of {part!r} (parameters() gives it); " + (
                _ADAPTER_SWITCH if name in ("disable_adapter_layers", "enable_adapter_layers", "set_adapter") else
                _PRUNED if original is not None and f"{name}_orig" in original._parameters else
                f"read plain attributes, or call the whole model in the step ({METHODS})")))

    def extra_repr(self) -> str:
        return f"{self.part_name}: this rank's share"


class ModelPartList(ModelPart):
    """A :class:`ModelPart` for a container (``nn.ModuleList``, ``nn.Sequential``, ``nn.ModuleDict``): indexing,
    slicing, ``len`` and iteration work as on the container, over the parts."""

    def _children_in_order(self) -> list[nn.Module]:
        return [self._modules[name] for name, child in self.__dict__["_original"]._modules.items() if child is not None]

    def __bool__(self) -> bool:  # a module is true, whatever its length
        return True

    def __len__(self) -> int:
        return len(self._children_in_order())

    def __iter__(self) -> Any:
        original = self.__dict__["_original"]
        return iter(original.keys()) if isinstance(original, nn.ModuleDict) else iter(self._children_in_order())

    def __getitem__(self, index: Any) -> Any:
        if isinstance(self.__dict__["_original"], nn.ModuleDict):
            return self._modules[index]
        children = self._children_in_order()
        return nn.ModuleList(children[index]) if isinstance(index, slice) else children[index]


def _part(name: str, model_path: str, original: nn.Module) -> ModelPart:
    """The :class:`ModelPart` standing for ``original`` (a :class:`ModelPartList` for a container)."""
    containers = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
    return (ModelPartList if isinstance(original, containers) else ModelPart)(name, model_path, original)


def complete(target: nn.Module, name: str, model: nn.Module, model_path: str) -> None:
    """Give ``target`` a :class:`ModelPart` at path ``name`` of ``model`` (and above it) where it has none."""
    parts = name.split(".")
    for depth, item in enumerate(parts):
        if item not in target._modules or target._modules[item] is None:
            path = ".".join(parts[:depth + 1])
            target.add_module(item, _part(path, model_path, model.get_submodule(path)))
        target = target._modules[item]


def mirror(target: nn.Module, source: nn.Module, model: nn.Module, model_path: str, prefix: str = "") -> None:
    """Register ``source``'s state (a segment's: plain holder modules, batch norms held as themselves) on ``target``,
    same objects, same names; plain holders become :class:`ModelPart` objects of ``model``'s modules."""
    for name, param in source._parameters.items():
        if param is not None and name not in target._parameters:
            target.register_parameter(name, param)
    for name, buffer in source._buffers.items():
        if buffer is not None and name not in target._buffers:  # (a part reads its model's buffers: no hasattr check)
            target._buffers[name] = buffer
            if name in source._non_persistent_buffers_set:
                target._non_persistent_buffers_set.add(name)
    for name, child in source._modules.items():
        if child is None:
            continue
        if name not in target._modules:
            part = _part(prefix + name, model_path, model.get_submodule(prefix + name))
            target.add_module(name, part if type(child) is nn.Module else child)
        holder = target._modules[name]
        if holder is not child:
            mirror(holder, child, model, model_path, f"{prefix}{name}.")


def in_model_order(target: nn.Module, original: nn.Module) -> None:
    """Re-register ``target``'s parameters, buffers and children (and theirs, down the tree) in the order ``original``
    registers them: :func:`mirror` registers them in the order the captured graph uses them, and ``parameters()``
    must list them as one device does, for optimizers numbering their states and checkpoints naming them."""
    for table in ("_parameters", "_buffers", "_modules"):
        mine, theirs = getattr(target, table), getattr(original, table)
        place = {name: index for index, name in enumerate(theirs)}
        items = sorted(mine.items(), key=lambda item: place.get(item[0], len(place)))  # stable: others keep theirs
        mine.clear()
        mine.update(items)
    for name, child in target._modules.items():
        counterpart = original._modules.get(name)
        if child is not None and counterpart is not None and child is not counterpart:
            in_model_order(child, counterpart)
