"""trainyard's TorchTrainer: Ray Train's, less an actor a run without Ray Datasets does not use."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback


class LeanTorchTrainer(TorchTrainer):
    """Ray Train's TorchTrainer, less its datasets callback when it has no ``datasets`` (the
    workers load an in-memory dataset): that callback starts an actor per run (a process
    that imports Ray Train and Ray Data: about 3 s of a CPU) even with nothing to shard, and
    without datasets nothing calls ``get_dataset_shard``. With datasets (a streamed job) it is
    Ray's TorchTrainer unchanged.

    ``_create_default_callbacks`` is Ray Train's own (ray==2.60.0, pinned in
    pyproject.toml); tests/test_training.py checks that a run starts no such actor."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
