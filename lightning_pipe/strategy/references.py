"""Other references to the cut layers: aliases of the sequence, of its layers, and hyper-parameters holding them.

A LightningModule may reach the layers it pipelines by more than one path: ``self.model = self.layers``, a head kept as
``self.head = self.layers[-1]``, or a hyper-parameter (``save_hyperparameters()`` keeps the ``net`` passed to
``__init__``; the hydra template does so). Cutting only the first path would leave the others holding the full,
never-trained sequence on every rank: a checkpoint would then store rank 0's stale copy of every other stage's
weights under the alias's names, and pickling the hyper-parameters would reach the pipeline's process groups.

So after the cut (:func:`redirect`): every path to the sequence leads to the proxy; every path to a module inside
it leads to that module where this rank holds it, and to a :class:`LayerElsewhere` (no state, refuses to run) where
another rank does; a hyper-parameter that is the sequence is the proxy; and the deep copy Lightning keeps of the first
hyper-parameters (``hparams_initial``, for loggers) keeps its modules on the meta device, so that no rank holds a
second whole model. A checkpoint written on one rank stores the hyper-parameters with the cut modules whole again
(:func:`hparams_for_checkpoint`), built from a meta skeleton of the sequence and the checkpoint's own weights.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["LayerElsewhere", "shared_advice", "meta_skeleton", "redirect", "hparams_for_checkpoint",
           "hparams_with_skeleton", "fill_skeleton"]


class LayerElsewhere(nn.Module):
    """Stands where a module of the pipelined sequence held by another rank was reached by a second path."""

    def __init__(self, alias: str, name: str, sequence_path: str, kind: str = "nn.Sequential") -> None:
        super().__init__()
        self.alias, self.name, self.sequence_path, self.kind = alias, name, sequence_path, kind

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.alias!r} is the module {self.name!r} of the {self.kind} at "
                           f"{self.sequence_path!r}, which another pipeline stage holds; under PipelineStrategy only "
                           f"the step's call of the {self.kind} runs its layers. " + shared_advice(self.alias))

    def __getattr__(self, attribute: str) -> Any:
        try:
            return super().__getattr__(attribute)
        except AttributeError:
            pass
        raise AttributeError(f"{self.__dict__.get('alias')!r} is the module {self.__dict__.get('name')!r} of the "
                             f"{self.__dict__.get('kind', 'nn.Sequential')} at {self.__dict__.get('sequence_path')!r}, "
                             f"which another pipeline stage "
                             f"holds, so its {attribute!r} is not on this rank. To log a value of it at an epoch's "
                             f"end (a weight's norm), compute it on the rank that holds it, from its parameters "
                             f"there: {{name: p for name, p in self.named_parameters() if name.startswith('"
                             f"{self.__dict__.get('sequence_path')}.{self.__dict__.get('name')}.')}} (named_buffers() "
                             f"for buffers), empty on the other ranks, and self.log(...) only where it is not: in "
                             f"on_train_epoch_end (and the validation's and test's, and the gradient hooks) a "
                             f"synchronous pipeline gathers every rank's logs. After fit each rank keeps only its "
                             f"stages: to read the whole model, save it with trainer.save_checkpoint(path) (every "
                             f"rank) and open it with YourModule.load_from_checkpoint(path) on one process. In a hook, "
                             f"the hooks that change parameters or "
                             f"gradients reach the layers this rank holds through named_parameters() or "
                             f"named_modules() (each name as in the whole sequence); to compute with another "
                             f"stage's weights in the step (logits from the embedding's weight), do it in a layer of "
                             f"the model instead: a head whose weight is tied to the embedding (head.weight = "
                             f"embedding.weight) stays tied across stages. Only its dtype or device read (to cast "
                             f"the batch: x.to(layer.weight.dtype))? Read them from a layer this rank holds: "
                             f"next(self.parameters()).dtype (each rank's own layers; the same wherever the model "
                             f"has one dtype)")

    def __setattr__(self, attribute: str, value: Any) -> None:
        from lightning_pipe.strategy.model_calls import capturing

        # the step's code before the model, on the first stage (a mode is checked where the call is answered)
        if capturing() and "kind" in self.__dict__ and attribute != "training":
            raise RuntimeError(f"the step sets {attribute!r} of {self.alias!r}, the module {self.name!r} of the "
                               f"{self.kind} at {self.sequence_path!r}, which another pipeline stage holds: it runs "
                               f"its part of each micro-batch before the step's code reaches it there, so the value "
                               f"would come a step late, or never. Set it in a hook every rank runs before the step "
                               f"(on_train_batch_start, on_predict_model_eval for a mode), or pass it to the model as "
                               f"a tensor")
        super().__setattr__(attribute, value)

    def extra_repr(self) -> str:
        return f"{self.sequence_path}.{self.name} (on another rank)"


def shared_advice(alias: str) -> str:
    """What to do where a second path (``alias``) reaches a pipelined module: a model sharing a module with the
    pipelined one (ELECTRA's generator sharing the discriminator's embeddings) cannot run it outside the pipeline."""
    return (f"Where the module's forward runs the sequence's layers one by one (for layer in self.layers, "
            f"self.layers[:4](x), to collect features), pass PipelineStrategy(layers='') to pipeline that forward "
            f"instead. Where another model shares it (self.{alias}: ELECTRA's generator sharing the discriminator's "
            f"embeddings), call both models from the LightningModule's forward and self(...) in the step, which "
            f"pipelines them together; else call the pipelined model, or load a checkpoint with "
            f"YourModule.load_from_checkpoint(path) to run the whole model")


def meta_skeleton(sequence: nn.Module) -> nn.Module:
    """A copy of ``sequence`` whose parameters and buffers are on the meta device: its structure, no storage."""
    memo: dict[int, Any] = {}
    # tensors modules keep as plain attributes too: one computed from parameters (the deprecated hook-based
    # torch.nn.utils.weight_norm's weight), which deepcopy refuses
    held = (value for part in sequence.modules() for value in vars(part).values() if isinstance(value, torch.Tensor))
    for tensor in itertools.chain(sequence.parameters(), sequence.buffers(), held):
        if id(tensor) not in memo:
            meta = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(sequence, memo)


def redirect(module: nn.Module, sequence: nn.Module, proxy: nn.Module, sequence_path: str,
             inside_to: Callable[[str, str, nn.Module], nn.Module | None] | None = None) -> list[str]:
    """After ``sequence`` (at ``sequence_path``) was replaced by ``proxy``: lead every other path to it or into it to
    the proxy or this rank's module, or to a :class:`LayerElsewhere`; returns the paths redirected.

    ``inside_to(path, name, child)`` says what another path to the sequence's module ``name`` leads to (``None``: keep
    it); by default the module itself where this rank holds it, else a :class:`LayerElsewhere`."""
    inside = {id(m): name for name, m in sequence.named_modules() if name}  # modules of the sequence, by name
    if inside_to is None:
        local = {id(m) for m in proxy.modules()}

        def inside_to(path: str, name: str, child: nn.Module) -> nn.Module | None:
            return None if id(child) in local else LayerElsewhere(path, name, sequence_path)

    changes: list[tuple[str, nn.Module]] = []
    skip: list[str] = [sequence_path]
    for path, child in module.named_modules(remove_duplicate=False):
        if not path or any(path == s or path.startswith(f"{s}.") for s in skip):
            continue
        if child is sequence:
            changes.append((path, proxy))
            skip.append(path)
        elif id(child) in inside:
            skip.append(path)
            replacement = inside_to(path, inside[id(child)], child)
            if replacement is not None:
                changes.append((path, replacement))
    for path, replacement in changes:
        parent_path, _, attribute = path.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, attribute, replacement)
    hparams = getattr(module, "_hparams", None)
    if isinstance(hparams, dict):
        for key, value in list(hparams.items()):
            if value is sequence:
                hparams[key] = proxy
    initial = getattr(module, "_hparams_initial", None)
    if isinstance(initial, Mapping):
        for value in initial.values():
            if isinstance(value, nn.Module):  # Lightning's deep copy for loggers: its repr, not its weights
                value.to("meta")
    return [path for path, _ in changes]


def hparams_for_checkpoint(hparams: Any, proxy: nn.Module, skeleton: nn.Module, sequence_path: str,
                           state_dict: Mapping[str, torch.Tensor]) -> Any:
    """``hparams`` as one device would save them: modules holding the cut sequence hold it whole, with the weights
    of ``state_dict`` (the full model's; tensors shared, not copied), so that ``load_from_checkpoint`` rebuilds them.
    Hyper-parameters that reach no cut module are returned as they are."""
    if not _reaches(hparams, proxy):
        return hparams
    hparams, whole = hparams_with_skeleton(hparams, proxy, skeleton, sequence_path)
    fill_skeleton(whole, sequence_path, state_dict)
    return hparams


def hparams_with_skeleton(hparams: Any, proxy: nn.Module, skeleton: nn.Module,
                          sequence_path: str) -> tuple[Any, nn.Module | None]:
    """``hparams`` with the cut modules replaced by a meta copy of the whole sequence (returned beside them, to be
    filled by :func:`fill_skeleton` where the weights are: a sharded checkpoint's consolidation); ``None`` if the
    hyper-parameters reach no cut module."""
    if not _reaches(hparams, proxy):
        return hparams, None
    whole = copy.deepcopy(skeleton)
    memo: dict[int, Any] = {id(proxy): whole}
    names = dict(whole.named_modules())
    for name, child in proxy.named_modules():
        if name and name in names:
            memo[id(child)] = names[name]
    for child in _modules_in(hparams):
        for sub in child.modules():
            if isinstance(sub, LayerElsewhere) and sub.sequence_path == sequence_path and sub.name in names:
                memo[id(sub)] = names[sub.name]
    return copy.deepcopy(hparams, memo), whole


def fill_skeleton(whole: nn.Module, sequence_path: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give the meta copy of the sequence the full model's weights from ``state_dict`` (shared, not copied)."""
    ties: dict[int, list[str]] = {}
    for name, param in whole.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    prefix = f"{sequence_path}."
    whole.load_state_dict({key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)},
                          assign=True)
    for names_of_one in ties.values():  # assigning broke ties into one Parameter per name: tie them again
        shared = whole.get_parameter(names_of_one[0])
        for name in names_of_one[1:]:
            owner, _, attribute = name.rpartition(".")
            setattr(whole.get_submodule(owner) if owner else whole, attribute, shared)


def _modules_in(value: Any) -> list[nn.Module]:
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, Mapping):
        return [m for v in value.values() for m in _modules_in(v)]
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _modules_in(v)]
    return []


def _reaches(hparams: Any, proxy: nn.Module) -> bool:
    return any(sub is proxy or isinstance(sub, LayerElsewhere) for m in _modules_in(hparams) for sub in m.modules())
