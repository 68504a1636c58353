"""The TorchTrainer of a job whose data the workers load themselves (an in-memory dataset
plugin): no Ray Datasets to shard."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback


class InMemoryTorchTrainer(TorchTrainer):
    """Ray Train's TorchTrainer less its datasets callback, which starts an actor per run
    (a process that imports Ray Train and Ray Data: about 3 s of a CPU) even when there is no
    dataset to shard. With no ``datasets``, nothing else uses it: ``get_dataset_shard`` is
    never called. A streamed job (``datasets`` given) takes the plain TorchTrainer.

    ``_create_default_callbacks`` is Ray Train's own (ray==2.60.0, pinned in
    pyproject.toml); tests/test_training.py checks that a run starts no such actor."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
