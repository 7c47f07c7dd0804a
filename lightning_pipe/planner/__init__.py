"""The planner: profiles layers, partitions them into stages (with replicas), and predicts pipelines without running them."""

from lightning_pipe.planner.auto import ScheduleChoice, choose_schedule
from lightning_pipe.planner.partition import METHODS, plan_pipeline, smallest_memory_cap
from lightning_pipe.planner.plans import MemoryCapError, Plan, StagePlan
from lightning_pipe.planner.profile import LayerProfile, profile_layers
from lightning_pipe.planner.simulate import Link, Prediction, StageCost, predict
from lightning_pipe.planner.topology import Level, Topology

__all__ = [
    "Link",
    "Prediction",
    "StageCost",
    "predict",
    "LayerProfile",
    "profile_layers",
    "Level",
    "Topology",
    "METHODS",
    "Plan",
    "StagePlan",
    "plan_pipeline",
    "smallest_memory_cap",
    "MemoryCapError",
    "ScheduleChoice",
    "choose_schedule",
]
