"""The stand-in for a captured model on a rank: this rank's share of its state under the model's names, the step's
calls of it recorded or answered (:mod:`.model_calls`), its parts and plain attributes reachable (:mod:`.model_parts`);
running it anywhere else is refused."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.nn as nn

from lightning_pipe.capture import Segment
from lightning_pipe.strategy.model_calls import ModelCalls, refuse_other_weights
from lightning_pipe.strategy.model_parts import (METHODS, complete, in_model_order, mirror, mode_of,
                                                 stand_in_attribute, written_through)
from lightning_pipe.strategy.split import by_user

__all__ = ["PipelinedModel"]


class PipelinedModel(nn.Module):
    """Stands in for a captured model: holds this rank's share of its parameters and buffers under the model's names,
    so that ``parameters()`` and ``state_dict()`` of the LightningModule are this rank's share with the full model's
    names.

    Inside a step it either records each call's arguments and answers with a stand-in output (first stage), or
    returns the model's own output computed by the last stage (a ``ModelOutput``, a tuple, a tensor), call by call
    (:mod:`.model_calls`); anywhere else it refuses to run. Every module of the model is reachable through it by its
    path, as a :class:`~.model_parts.ModelPart` holding this rank's share of that module's state (perhaps none), so that
    ``self.model.classifier.parameters()`` in ``configure_optimizers`` gives this rank's share of the head. Plain
    attributes of the model (a Hugging Face ``config``) stay readable through it.
    """

    def __init__(self, segments: Sequence[Segment], all_segments: Sequence[Segment], model: nn.Module,
                 path: str, calls: ModelCalls | None = None) -> None:
        super().__init__()
        for segment in segments:
            mirror(self, segment, model, path)
        for name, _ in model.named_modules(remove_duplicate=False):  # aliases too: the same paths on every rank
            if name:
                complete(self, name, model, path)
        in_model_order(self, model)
        object.__setattr__(self, "_segments", list(all_segments))  # not submodules: their modes follow this one
        object.__setattr__(self, "_model", model)
        self._path = path
        self._model_name = type(model).__name__
        self.model_calls = calls or ModelCalls(f"the model at {path!r} ({self._model_name})")
        self.owner: Any = None  # the PipelineRunner that cut the module, for a later Trainer to adopt

    def __getstate__(self) -> dict[str, Any]:
        # A copy or pickle of the module takes this rank's share, never the runner, its process groups, the whole
        # model or its captures; a checkpoint stores hyper-parameters with the model whole instead.
        from lightning_pipe.strategy.share_warning import said_pickled

        said_pickled(self)
        state = dict(self.__dict__)
        state.update(owner=None, model_calls=ModelCalls(self.model_calls.where), _segments=[], _model=None,
                     _training=self.training)
        return state

    training = mode_of("_model")  # type: ignore[assignment]  # the model's own, as a part's is its module's

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """A whole model's ``state_dict`` (pretrained weights loaded in ``on_fit_start``): this rank loads its share;
        with ``strict``, every key of the whole model must be there and no other, alike on every rank."""
        from lightning_pipe.strategy.share_warning import strategy_reads

        model = self.__dict__.get("_model")
        if model is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        with strategy_reads():
            whole, local = list(model.state_dict().keys()), set(super().state_dict().keys())
        if strict:
            missing = [key for key in whole if key not in state_dict]
            unexpected = [key for key in state_dict if key not in set(whole)]
            if missing or unexpected:
                raise RuntimeError(f"the state dict does not match {self._model_name}: missing keys {missing[:10]}, "
                                   f"unexpected keys {unexpected[:10]} (strict=False loads the keys that match)")
        return super().load_state_dict({key: value for key, value in state_dict.items() if key in local},
                                       strict=False, assign=assign)

    def train(self, mode: bool = True) -> PipelinedModel:
        """The model's own ``train(mode)`` (its overrides run); the segments pick the graphs of ``mode``."""
        model = self.__dict__.get("_model")
        if model is None:
            return super().train(mode)
        model.train(mode)
        for segment in self._segments:
            segment.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.model_calls.mode is not None:
            refuse_other_weights(self, self.model_calls.where)
        if self.model_calls.mode == "capture":
            return self.model_calls.record((args, kwargs))
        if self.model_calls.mode == "output":
            return self.model_calls.answer((args, kwargs))
        raise RuntimeError(f"the model at {self._path!r} ({self._model_name}) is cut into pipeline stages "
                           f"(this rank holds part of its weights); it runs only where a training, validation, test "
                           f"or predict step calls it as the module's own attribute under PipelineStrategy. A copy of "
                           f"it (copy.deepcopy, or torch.optim.swa_utils.AveragedModel made in a hook after the cut, "
                           f"for an EMA) holds this rank's share and cannot run: keep averaged weights with "
                           f"Lightning's EMAWeightAveraging or StochasticWeightAveraging callback, or as one tensor "
                           f"per parameter swapped into the model for validation. To run the whole model elsewhere, "
                           f"load a checkpoint with YourModule.load_from_checkpoint(path)")

    def named_modules(self, memo: set[nn.Module] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        watched = self.__dict__.get("listing", False) and by_user()  # (parameters() and modules() come here too)
        yield from super().named_modules(memo, prefix, remove_duplicate)
        if watched:  # the user's code listed this rank's share to the end (not next(self.parameters()))
            self.__dict__["listed_whole"] = True

    @contextmanager
    def listings(self) -> Iterator[None]:
        """Inside, whether the user's code lists all of the model's modules or parameters (this rank's share) is
        noted in ``listed_whole``, as :meth:`PipelinedSequence.listings` notes it."""
        self.__dict__.update(listing=True, listed_whole=False)
        try:
            yield
        finally:
            self.__dict__["listing"] = False

    def __prepare_scriptable__(self) -> nn.Module:  # torch.jit.script's look at the module, before compiling it
        raise RuntimeError(f"the model at {self._path!r} ({self._model_name}) is cut into pipeline stages (this rank "
                           f"holds part of its weights), so it cannot be scripted or exported (to_torchscript, "
                           f"torch.jit.script): load a checkpoint with YourModule.load_from_checkpoint(path) and "
                           f"export the whole model on one device")

    def __setattr__(self, name: str, value: Any) -> None:
        if not written_through(self.__dict__.get("_model"), self, name, value):
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        # (read from __dict__: an attribute looked up while __init__ runs must not look up another)
        return stand_in_attribute(self, self.__dict__.get("_model"), name, self.__dict__.get("_path", ""), lambda: (
            f"{name!r} of the model at {self._path!r} is not available under PipelineStrategy: the model is cut "
            f"into stages and this rank holds only part of it; call the model itself in the step "
            f"(self.{self._path}(...)){_GENERATE if name == 'generate' else f'; {METHODS}'}"))


# generation calls the model once per new token, each call on the last one's output: no pipeline step does that
_GENERATE = ("; generation (one call of the model per new token, each on the output of the one before) is not run "
             "under a pipeline: score teacher-forced outputs in validation_step (the loss, token accuracy), and "
             "generate after training on one device (YourModule.load_from_checkpoint(path).model.generate(...))")
