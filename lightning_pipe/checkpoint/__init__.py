"""Convert pipeline checkpoints: a sharded folder into one standard file (``consolidate``), and back (``shard``).

``python -m lightning_pipe.checkpoint consolidate DIR OUT.ckpt`` and ``python -m lightning_pipe.checkpoint shard FILE
DIR``; both stream (:mod:`.convert`).
"""

from lightning_pipe.checkpoint.convert import consolidate, shard

__all__ = ["consolidate", "shard"]
