"""Devices as a hierarchy of levels with their bandwidths: which link two devices share, and allreduce times.

A :class:`Topology` numbers its devices ``0 .. num_devices - 1`` and groups them level by level, as PipeDream
does: ``Topology([Level(8, 300e9), Level(4, 25e9)])`` is 4 nodes of 8 devices; devices 0-7 talk at 300 GB/s,
device 7 and device 8 at 25 GB/s. Two devices communicate at the bandwidth of the lowest level whose group
holds both of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Level", "Topology"]


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: how many units of the level below form one of its groups, and their link."""

    devices: int
    """Units of the level below in one group of this level (for the lowest level: devices, e.g. 8 per node)."""
    bandwidth: float = math.inf
    """Bytes per second between two units of a group, in each direction."""
    latency: float = 0.0
    """Seconds from send to arrival of an empty message."""
    overhead: float = 0.0
    """Seconds a rank is busy per message it sends or receives (posting, copying, waking up): unlike latency, it
    delays the rank's next action. On gloo over loopback it is of the order of 0.1-1 ms."""

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"Level.devices ({self.devices}) must be >= 1")
        if not self.bandwidth > 0:
            raise ValueError(f"Level.bandwidth ({self.bandwidth}) must be > 0 bytes/s; use math.inf for a free link")
        for name in ("latency", "overhead"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Level.{name} ({value}) must be a finite number of seconds >= 0")


@dataclass(frozen=True)
class Topology:
    """Levels of devices, lowest (fastest) first."""

    levels: tuple[Level, ...]

    def __init__(self, levels: Sequence[Level]) -> None:
        levels = tuple(levels)
        if not levels:
            raise ValueError("a Topology needs at least one Level, e.g. Topology([Level(devices=4, bandwidth=10e9)])")
        object.__setattr__(self, "levels", levels)

    @classmethod
    def flat(cls, devices: int, bandwidth: float = math.inf, latency: float = 0.0, overhead: float = 0.0) -> Topology:
        """``devices`` devices that all talk over one kind of link."""
        return cls([Level(devices, bandwidth, latency, overhead)])

    @property
    def num_devices(self) -> int:
        return math.prod(level.devices for level in self.levels)

    def group_size(self, level: int) -> int:
        """Devices in one group of ``level``."""
        return math.prod(lvl.devices for lvl in self.levels[: level + 1])

    def level_index(self, first: int, last: int) -> int:
        """The lowest level whose group holds devices ``first`` and ``last`` (and every device between)."""
        self._check(first)
        self._check(last)
        for index in range(len(self.levels)):
            size = self.group_size(index)
            if first // size == last // size:
                return index
        return len(self.levels) - 1  # unreachable: the top group holds every device

    def link(self, first: int, last: int) -> Level:
        """The level two devices (or a span of devices) communicate over."""
        return self.levels[self.level_index(first, last)]

    def allreduce_time(self, nbytes: float, first_device: int, replicas: int) -> float:
        """Seconds of a ring allreduce of ``nbytes`` over ``replicas`` devices from ``first_device`` on:
        ``2 (r - 1) / r * bytes / bandwidth + 2 (r - 1) * latency`` at the level spanning them."""
        if replicas <= 1 or nbytes <= 0:
            return 0.0
        level = self.link(first_device, first_device + replicas - 1)
        return 2 * (replicas - 1) / replicas * nbytes / level.bandwidth + 2 * (replicas - 1) * level.latency

    def transfer_time(self, nbytes: float, device_a: int, device_b: int) -> float:
        """Seconds for one message of ``nbytes`` from ``device_a`` to ``device_b``."""
        if device_a == device_b:
            return 0.0
        level = self.link(min(device_a, device_b), max(device_a, device_b))
        return level.latency + nbytes / level.bandwidth

    def _check(self, device: int) -> None:
        if not 0 <= device < self.num_devices:
            raise ValueError(f"device {device} is not in this topology of {self.num_devices} devices "
                             f"(numbered 0..{self.num_devices - 1})")
