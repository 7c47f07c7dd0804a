"""Capture any model's forward and cut it at module boundaries into segments a pipeline runs like a layer sequence.

Modules: :mod:`.points` (where to cut), :mod:`.export` (``torch.export``, refusing what it would get wrong),
:mod:`.errors`, :mod:`.graph` (segments and live values), :mod:`.programs` (each segment's graph), :mod:`.patterns`
and :mod:`.cache` (which capture fits a call), :mod:`.segment` (the segment module), :mod:`.splitter` (the API),
:mod:`.devices` and :mod:`.materialize` (meta-device captures, a rank's own state), :mod:`.batchnorm` (batch norms a
stage defers), :mod:`.losses` (losses inside the model that are means over a count). It imports no Lightning.
"""

from lightning_pipe.capture.cache import Capture
from lightning_pipe.capture.errors import CaptureError
from lightning_pipe.capture.points import SplitPoint, SplitPoints, default_cuts, repeated_blocks
from lightning_pipe.capture.segment import Segment
from lightning_pipe.capture.splitter import Splitter, split_model

__all__ = ["Splitter", "split_model", "Segment", "Capture", "CaptureError", "SplitPoint", "SplitPoints",
           "default_cuts", "repeated_blocks"]
