"""State a step may change that :mod:`.step_effects` does not follow, marked before the step and compared after it
on the last stage, so that such a change is warned of rather than silent: a ``deque``, a ``set`` or a NumPy array
changed in place, a container inside a container (``self.store["train"]["loss"].append(...)``), a dict too large to
look into, the fields of a plain object of the user's that holds such state (a replay buffer's deque, an agent's
environment), and the plain attributes of the user's modules the step calls outside the pipelined model (a loss
module's call counter). The last stage's step takes every micro-batch run's change of such state, and the other ranks
(rank 0, which logs) none."""

from __future__ import annotations

import itertools
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.positions import looked_at_again
from lightning_pipe.strategy.step_effects import LIBRARIES, followed_object, own_attributes

__all__ = ["FOREIGN", "UnfollowedState", "mark", "user_modules", "users_hook", "users_hooks", "FORWARD_HOOKS",
           "BACKWARD_HOOKS", "MODULE_HOOKS"]

# the code of these packages keeps its own attributes (a rotary embedding's cache filled on the first call): not
# the user's state
FOREIGN = LIBRARIES | {"lightning_pipe", "transformers", "timm", "torchvision", "torchaudio", "peft", "diffusers",
                       "accelerate", "einops", "flash_attn", "xformers", "sentence_transformers",
                       # (found by review: each kornia augmentation keeps its last draw's parameters, _params)
                       "kornia",
                       # loggers, whose watch() hooks the model's modules to log gradients
                       "wandb", "comet_ml", "neptune", "mlflow", "tensorboardX", "clearml", "aim"}
_STEPS = 16  # first steps of each kind whose state is marked and compared (then fewer: :meth:`UnfollowedState.mark`)
_DATA = "\0data"  # the datasets' marks, among a step's marks
_LOADERS = {"training_step": "train_dataloader", "validation_step": "val_dataloaders",
            "test_step": "test_dataloaders", "predict_step": "predict_dataloaders"}
_ITEMS = 64  # items of a container looked at (its length counts the rest)
_LARGE = 4096  # a dict larger than this is not looked into by the step's effects (step_effects._ENTRIES)
_HASHED = 1 << 16  # a NumPy array up to this size is marked by its bytes, a larger one by identity


def mark(value: Any, depth: int = 0) -> Any:
    """A cheap mark of ``value`` that changes when it changes (for containers: their first items and lengths)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), -1 if value.is_inference() else value._version)
    if type(value).__module__.split(".")[0] == "numpy":
        size = getattr(value, "size", 0)
        if hasattr(value, "tobytes") and size <= _HASHED:
            return ("numpy", getattr(value, "shape", ()), hash(value.tobytes()))
        return ("numpy", id(value))
    if depth >= 4:
        return ("deep", id(value))
    if isinstance(value, dict):
        return ("dict", len(value), tuple((key, mark(item, depth + 1))
                                          for key, item in itertools.islice(value.items(), _ITEMS)))
    if isinstance(value, (list, tuple, deque)):
        return (type(value).__name__, len(value), tuple(mark(item, depth + 1)
                                                         for item in itertools.islice(value, _ITEMS)))
    if isinstance(value, (set, frozenset)):
        try:
            return ("set", len(value), hash(frozenset(value)) if len(value) <= _LARGE else 0)
        except TypeError:  # unhashable items cannot be in a set; a subclass may hold them
            return ("set", len(value))
    return ("object", id(value))


def _container(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple, deque, set)) or type(value).__module__.split(".")[0] == "numpy"


def _users_object(value: Any) -> bool:
    """Whether ``value`` is a plain object of the user's code (not a module, a tensor, a class, nor a library's)."""
    return not isinstance(value, (nn.Module, torch.Tensor, type)) and type(getattr(value, "__dict__", None)) is dict \
        and type(value).__module__.split(".")[0] not in FOREIGN | {"numpy", "builtins"}


def _own_marks(name: str, value: Any) -> dict[str, Any]:
    """Marks of what of the module's own attribute ``name`` the step's effects do not follow, each with the id of the
    value it marks (one bound anew is followed)."""
    if isinstance(value, (deque, set)) or type(value).__module__.split(".")[0] == "numpy":
        return {name: (id(value), mark(value))}
    if _users_object(value) and not followed_object(value):  # its fields, as the step leaves them (a replay buffer's
        # deque, an agent's environment: found by review); a field bound anew is not followed either
        return {f"{name}.{field}": (None, mark(vars(item) if _users_object(item) else item))
                for field, item in itertools.islice(vars(value).items(), _ITEMS)}
    if isinstance(value, dict):
        if len(value) > _LARGE:  # followed by its size alone
            return {name: (id(value), len(value), hash(tuple(map(id, itertools.islice(value.values(), 1 << 17)))))}
        items: Iterable[tuple[Any, Any]] = value.items()
    elif type(value) is list:
        items = enumerate(itertools.islice(value, _ITEMS))
    else:
        return {}
    # one level is followed: a dict's entries and a list's items; a list's own items if it is an item (a list per
    # dataloader). Containers below that are marked.
    marks = {}
    for key, item in items:
        if isinstance(item, dict) or (isinstance(item, (list, tuple, deque, set)) and (
                not type(item) is list or any(_container(inner) for inner in itertools.islice(item, _ITEMS)))):
            marks[f"{name}[{key!r}]"] = (id(item), mark(item))
    return marks


class UnfollowedState:
    """Marks of ``module``'s state the step's effects do not follow; ``outside()``: the user's modules the step may
    call outside the pipelined model (their plain attributes)."""

    def __init__(self, module: nn.Module, outside: Callable[[], Iterable[tuple[str, nn.Module]]]) -> None:
        self.module = module
        self.outside = outside
        self.warned: set[str] = set()
        self._count: dict[str, int] = {}  # steps of each kind so far
        self._epochs: dict[str, int] = {}  # the epoch of each kind's last step

    def mark(self, step: str) -> dict[str, Any] | None:
        """The marks before a ``step``: on the first :data:`_STEPS` steps of its kind, the 32nd, 64th, ..., and the
        first of each epoch (a deque the step starts to fill after a warm-up); else None."""
        count = self._count[step] = self._count.get(step, 0) + 1
        trainer = getattr(self.module, "_trainer", None)
        epoch = int(getattr(trainer, "current_epoch", 0) or 0)
        new_epoch, self._epochs[step] = epoch != self._epochs.get(step, epoch), epoch
        if count > _STEPS and not looked_at_again(count, _STEPS) and not new_epoch:
            return None
        return {**self._marks(), _DATA: self._data_marks(step)}

    def _marks(self) -> dict[str, Any]:
        marks: dict[str, Any] = {}
        for name, value in own_attributes(self.module).items():
            marks.update(_own_marks(name, value))
        for path, child in self.outside():
            for name, value in own_attributes(child).items():
                marks[f"{path}.{name}"] = (None, mark(value))
        return marks

    def _data_marks(self, step: str) -> dict[str, Any]:
        """Marks of the plain attributes of the datasets the step's DataLoaders read (a curriculum's difficulty,
        per-sample weights for a sampler), which the step's code may change but which no rank but this one sees."""
        trainer = getattr(self.module, "_trainer", None)
        attribute = _LOADERS.get(step)
        try:
            loaders = getattr(trainer, attribute) if trainer is not None and attribute else None
        except Exception:  # noqa: BLE001 - no loaders in this state of the Trainer
            return {}
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        marks: dict[str, Any] = {}
        for index, loader in enumerate(loaders if isinstance(loaders, (list, tuple)) else [loaders]):
            dataset = getattr(loader, "dataset", None)
            if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
                continue
            where = f"trainer.{attribute}{f'[{index}]' if isinstance(loaders, (list, tuple)) else ''}.dataset"
            for name, value in list(getattr(dataset, "__dict__", {}).items())[:_ITEMS]:
                marks[f"{where}.{name}"] = (None, mark(value))
        return marks

    def warn_of_changes(self, step: str, before: dict[str, Any] | None) -> None:
        """Warn, once per name, of what changed since ``before`` (:meth:`mark`'s)."""
        if before is None:
            return
        self._warn_of_data(step, before.pop(_DATA, {}))
        now = self._marks()
        # (the module's own attributes bound anew, or a dict's entry, are followed: marked with the value's id)
        changed = sorted(name for name, mark in now.items() if name not in self.warned and name in before
                         and before[name][0] == mark[0] and before[name] != mark)
        if not changed:
            return
        self.warned.update(changed)
        warnings.warn(
            f"{step} changes {', '.join(f'self.{name}' for name in changed[:6])} in a way the pipeline does not "
            f"follow (a deque, a set or a NumPy array changed in place, a container inside a container, a dict of "
            f"over {_LARGE} entries, a field of an object holding such state, a plain attribute of a module the step "
            f"calls): on the last stage's rank it takes the change of every micro-batch's run of the step, and of the "
            f"runs on the whole batch that check "
            f"it, and the other ranks, rank 0 and its loggers among them, see none of it. Keep such state on the "
            f"LightningModule itself in a list, or a dict of numbers, lists or tensors (their changes are made one "
            f"device's on every rank), in a tensor, or in a torchmetrics metric", stacklevel=2)


    def _warn_of_data(self, step: str, before: dict[str, Any]) -> None:
        """Warn, once per name, of a dataset attribute the step changed since ``before``."""
        now = self._data_marks(step)
        changed = sorted(name for name, value in now.items() if name not in self.warned and name in before
                         and before[name] != value)
        if not changed:
            return
        self.warned.update(changed)
        warnings.warn(
            f"{step} changes {', '.join(changed[:4])}: the step's code runs on the pipeline's stages in parts (after "
            f"the model on the last stage's rank only, once per micro-batch), so the dataset changes on that rank "
            f"alone; rank 0, which logs and checkpoints, and the first stage, which reads the inputs, do not see it "
            f"(a change that alters later batches makes the ranks read different ones). Make such changes in a hook "
            f"every rank runs once per batch or epoch (on_train_batch_end, from the step's outputs; "
            f"on_train_epoch_start)", stacklevel=2)


FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_hooks")  # a module's hook tables
BACKWARD_HOOKS = ("_backward_pre_hooks", "_backward_hooks")
MODULE_HOOKS = (*FORWARD_HOOKS, *BACKWARD_HOOKS)


def users_hooks(module: nn.Module, kinds: tuple[str, ...] = MODULE_HOOKS) -> frozenset[tuple[str, int]]:
    """The hooks of the user's that ``module`` itself carries in the tables ``kinds``, as (table, handle id)."""
    return frozenset((kind, key) for kind in kinds for key, hook in getattr(module, kind).items() if users_hook(hook))


def users_hook(hook: Any) -> bool:
    """Whether ``hook`` (a module's forward or backward hook) is the user's own (not torch's, a library's, or this
    package's)."""
    return (getattr(hook, "__module__", None) or "").split(".")[0] not in FOREIGN


def user_modules(module: nn.Module, pipelined: Iterable[nn.Module],
                 paths: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``module``'s submodules of the user's own classes outside the ``pipelined`` ones and the pipelined model's
    ``paths`` (a loss module, a teacher)."""
    from torchmetrics import Metric

    inside = {id(part) for part in pipelined}
    paths = [path for path in paths if path]
    prefixes = tuple(path + "." for path in paths)
    return [(path, child) for path, child in module.named_modules(remove_duplicate=True)
            if path and id(child) not in inside and not path.startswith(prefixes) and path not in paths
            and not issubclass(type(child), Metric)
            and type(child).__module__.split(".")[0] not in FOREIGN]
