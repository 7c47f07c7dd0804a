"""Weight versions for the asynchronous schedules: which weights each micro-batch's forward and backward use.

PipeDream's weight stashing: a micro-batch's backward must use the weights its forward used, although the
stage has stepped its optimizer in between. PipeDream swapped versions into the live parameters in place,
which breaks autograd's version counters on current PyTorch (a saved weight modified in place). Here a
forward never runs on the live parameters: it runs the module through ``torch.func.functional_call`` on a
snapshot (a copy made once per version), so autograd saves only tensors nothing ever modifies; its backward
yields gradients with respect to that snapshot, which are added to the live parameters' ``.grad`` for the
optimizer to use. A snapshot is dropped once no micro-batch in flight and no later forward can need it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["WeightVersions"]


class WeightVersions:
    """Snapshots of one stage's parameters, numbered by how many optimizer steps the stage had taken.

    ``keep_replaced`` keeps the weights an optimizer step replaces, for forwards that will ask for an older
    version than the live one (vertical sync, 2BW); plain weight stashing only ever asks for the live one.
    """

    def __init__(self, module: nn.Module, keep_replaced: bool) -> None:
        self.module = module
        self.keep_replaced = keep_replaced
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.live = [p for p in module.parameters() if p.requires_grad]
        self.version = 0  # optimizer steps taken by this stage
        self._snapshots: dict[int, list[torch.Tensor]] = {}
        self._users: dict[int, int] = {}  # version -> micro-batches in flight that use it
        self._oldest_wanted = 0  # no forward will ask for a version older than this
        self.peak_versions = 0

    def acquire(self, version: int) -> dict[str, torch.Tensor]:
        """The parameters for a forward on ``version``; :meth:`release` it after the micro-batch's backward."""
        if version not in self._snapshots:
            if version != self.version:
                raise RuntimeError(f"weight version {version} was asked for but the stage is at version "
                                   f"{self.version} and kept {sorted(self._snapshots)}")
            self._snapshots[version] = [p.detach().clone().requires_grad_() for p in self.live]
        self._users[version] = self._users.get(version, 0) + 1
        self._oldest_wanted = version
        self.peak_versions = max(self.peak_versions, len(self._snapshots))
        return dict(zip(self.names, self._snapshots[version]))

    def snapshot(self, version: int) -> list[torch.Tensor]:
        return self._snapshots[version]

    def release(self, version: int) -> None:
        self._users[version] -= 1
        self._prune()

    def before_step(self) -> None:
        """Call right before the optimizer step: keeps the weights it replaces if a forward may want them."""
        if self.keep_replaced and self.version not in self._snapshots:
            self._snapshots[self.version] = [p.detach().clone().requires_grad_() for p in self.live]
            self.peak_versions = max(self.peak_versions, len(self._snapshots))

    def after_step(self) -> None:
        self.version += 1
        self._prune()

    def _prune(self) -> None:
        for version in list(self._snapshots):
            in_use = self._users.get(version, 0) > 0
            may_be_wanted = version >= self._oldest_wanted and (self.keep_replaced or version == self.version)
            if not in_use and not may_be_wanted:
                del self._snapshots[version]
                self._users.pop(version, None)

    @property
    def num_versions(self) -> int:
        """Weight copies held besides the live parameters."""
        return len(self._snapshots)
