"""The Lightning adapter: :class:`PipelineStrategy` and what it needs to run a LightningModule's steps as a pipeline.

Importing it registers the strategy names (``pipedream``, ``gpipe``, ``pipedream_async``, ``pipedream_2bw``) with
Lightning. Its modules: :mod:`.pipeline` (the strategy), :mod:`.processes` (launching and collectives as DDP has them),
:mod:`.settings` (the strategy's settings, checked), :mod:`.runner` (one step through the engine), :mod:`.results`
(the last stage's results to every rank, without pickle), :mod:`.fingerprint` (every rank read the same batch?),
:mod:`.randomness` and :mod:`.positions` (the step code's random numbers, alike on every rank),
:mod:`.data_order` (dataloaders every rank reads alike, resumable mid-epoch), :mod:`.split` (the module around its
pipelined layers), :mod:`.optimizers`, :mod:`.tied`, :mod:`.gradients`, :mod:`.logs`, :mod:`.checkpoint`,
:mod:`.asynchronous`, :mod:`.mesh`, :mod:`.failures`, :mod:`.planned_cut`.
"""

from lightning_pipe.strategy.pipeline import PipelineStrategy

__all__ = ["PipelineStrategy"]
