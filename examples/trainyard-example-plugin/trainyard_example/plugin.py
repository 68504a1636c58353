"""An example trainyard plugin, written the way a third party writes one.

It provides:

- the model ``resmlp``: a residual MLP for feature rows (tabular data), with its own
  processor (standardisation learnt from the training split, saved with the checkpoint);
- the dataset ``wine``: scikit-learn's wine recognition set (178 rows, 13 features, 3
  cultivars), shipped with scikit-learn, so it loads offline;
- the streaming dataset ``spirals``: two interleaved spirals of any number of rows, made
  by Ray Data tasks and streamed to the training workers (a ``ray.data.Dataset``, never
  held in memory whole: the way to hand trainyard data larger than a worker's memory);
- the metric ``balanced_accuracy``: the mean of the per-class recalls.

It imports only trainyard's public contract (``from trainyard import ...``); torch is
imported inside the functions that need it, so listing plugins stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from trainyard import (
    DataInfo,
    DatasetSpec,
    LoadedData,
    MetricSpec,
    ModelSpec,
    Processor,
    Split,
    StreamingData,
    hookimpl,
)

#: The hook contract this plugin is written for; trainyard refuses it if that changes.
TRAINYARD_HOOK_CONTRACT = 1


# -- model: resmlp ---------------------------------------------------------------------


@dataclass
class ResMLPParams:
    #: Width of the residual stream.
    width: int = 64
    #: Residual blocks (LayerNorm, Linear, GELU, Dropout, Linear, plus the skip).
    blocks: int = 2
    #: Dropout inside each block.
    dropout: float = 0.0

    def __post_init__(self):
        if self.width < 1 or self.blocks < 0:
            raise ValueError("width must be at least 1 and blocks not negative")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")


class StandardScaler(Processor):
    """Rows of floats to a float tensor, standardised with the training split's stats.

    Everything ``fit`` learns goes into ``self.state`` (a JSON-able dict), which the
    default ``save``/``load`` write into and read from the checkpoint.
    """

    def fit(self, inputs):
        x = np.asarray(inputs, dtype=np.float64)
        std = x.std(axis=0)
        self.state = {"mean": x.mean(axis=0).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}

    def encode(self, inputs):
        import torch

        x = np.asarray(inputs, dtype=np.float32)
        width = self.info.input_shape[0]
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"expected rows of {width} features, got shape {list(x.shape)}")
        x = (x - np.asarray(self.state["mean"], np.float32)) / np.asarray(self.state["std"], np.float32)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def build_resmlp(params: ResMLPParams, info: DataInfo, processor: Processor):
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.LayerNorm(params.width),
                nn.Linear(params.width, params.width),
                nn.GELU(),
                nn.Dropout(params.dropout),
                nn.Linear(params.width, params.width),
            )

        def forward(self, x):
            return x + self.body(x)

    return nn.Sequential(
        nn.Linear(info.input_shape[0], params.width),
        *[Block() for _ in range(params.blocks)],
        nn.LayerNorm(params.width),
        nn.Linear(params.width, info.num_outputs),
    )


# -- dataset: wine ---------------------------------------------------------------------


def load_wine(params, seed: int) -> LoadedData:
    from sklearn.datasets import load_wine as sk_load

    bunch = sk_load()
    info = DataInfo(
        task="classification",
        inputs="features",
        classes=[str(c) for c in bunch.target_names],
        input_shape=[bunch.data.shape[1]],
        feature_names=[str(f) for f in bunch.feature_names],
    )
    # No val split: trainyard holds out data.val_fraction, stratified and seeded.
    return LoadedData(info, Split(bunch.data.astype(np.float32), bunch.target.astype(np.int64)))


# -- dataset: spirals (streaming) -------------------------------------------------------


@dataclass
class SpiralParams:
    #: Rows of the training stream (trainyard holds out data.val_fraction of them).
    rows: int = 20000
    #: Gaussian noise added to each point.
    noise: float = 0.05

    def __post_init__(self):
        if self.rows < 10:
            raise ValueError("rows must be at least 10")


def spiral_rows(batch: dict, noise: float) -> dict:
    """Rows ``batch["id"]`` of the spirals: ``input`` (x, y) and ``target`` (0 or 1). Each row
    depends on its id alone, so every pass over the stream makes the same rows."""
    ids = batch["id"].astype(np.int64)
    label = ids % 2
    t = (ids // 2 % 1000) / 1000 * 3 * np.pi + 0.5
    sign = np.where(label == 1, 1.0, -1.0)
    jitter = np.random.default_rng(ids[:1].tolist() or [0]).normal(0, noise, size=(len(ids), 2))
    points = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / 10 + jitter
    return {"input": points.astype(np.float32), "target": label}


def load_spirals(params: SpiralParams, seed: int) -> StreamingData:
    import ray.data

    info = DataInfo(task="classification", inputs="features", classes=["inner", "outer"],
                    input_shape=[2], feature_names=["x", "y"])
    # Lazy: nothing is made until trainyard streams it; rows known without reading.
    rows = ray.data.range(params.rows).map_batches(spiral_rows, fn_kwargs={"noise": params.noise})
    return StreamingData(info, rows, rows=params.rows)


# -- metric: balanced_accuracy ---------------------------------------------------------


def balanced_accuracy(outputs, targets, info: DataInfo) -> float:
    """Mean recall over the classes present in ``targets`` (scikit-learn's definition)."""
    predicted = np.asarray(outputs).argmax(axis=1)
    targets = np.asarray(targets).astype(np.int64)
    recalls = [float((predicted[targets == c] == c).mean()) for c in np.unique(targets)]
    return float(np.mean(recalls)) if recalls else 0.0


# -- hooks -----------------------------------------------------------------------------


@hookimpl
def register_models(register):
    register(ModelSpec(
        name="resmlp",
        build=build_resmlp,
        inputs=["features"],
        processor=StandardScaler,
        params=ResMLPParams,
        description="Residual MLP for feature rows (example plugin)",
    ))


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="wine",
        load=load_wine,
        inputs="features",
        task="classification",
        description="scikit-learn's wine recognition set (178 rows, 13 features, 3 classes)",
    ))
    register(DatasetSpec(
        name="spirals",
        load=load_spirals,
        inputs="features",
        params=SpiralParams,
        streaming=True,
        description="Two spirals of any size, streamed by Ray Data (example plugin)",
    ))


@hookimpl
def register_metrics(register):
    register(MetricSpec(
        name="balanced_accuracy",
        fn=balanced_accuracy,
        task="classification",
        mode="max",
        description="Mean per-class recall (example plugin)",
    ))
