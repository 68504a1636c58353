"""Multi-layer perceptron for feature rows (tabular data)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from trainyard import DataInfo, ModelSpec, Processor, hookimpl

ACTIVATIONS = ("relu", "gelu", "tanh", "silu")


@dataclass
class MLPParams:
    #: Width of each hidden layer, in order.
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    #: relu, gelu, tanh or silu.
    activation: str = "relu"
    #: Dropout after each hidden layer.
    dropout: float = 0.0
    #: Standardise features with the training split's mean and std.
    standardize: bool = True

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden layer sizes must be at least 1")


class FeatureProcessor(Processor):
    """Rows of floats to a float tensor, standardised with the training split's stats."""

    def fit(self, inputs):
        x = np.asarray(inputs, dtype=np.float64)
        if getattr(self.params, "standardize", True):
            std = x.std(axis=0)
            self.state = {"mean": x.mean(axis=0).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}

    def encode(self, inputs):
        import torch

        x = np.asarray(inputs, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.info.input_shape[0]:
            raise ValueError(
                f"expected rows of {self.info.input_shape[0]} features, got shape {list(x.shape)}"
            )
        if self.state:
            x = (x - np.asarray(self.state["mean"], np.float32)) / np.asarray(self.state["std"], np.float32)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def build(params: MLPParams, info: DataInfo, processor):
    from torch import nn

    act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}[params.activation]
    layers, width = [], info.input_shape[0]
    for hidden in params.hidden:
        layers += [nn.Linear(width, hidden), act()]
        if params.dropout:
            layers.append(nn.Dropout(params.dropout))
        width = hidden
    layers.append(nn.Linear(width, info.num_outputs))
    return nn.Sequential(*layers)


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="mlp",
            build=build,
            inputs=["features"],
            processor=FeatureProcessor,
            params=MLPParams,
            description="Multi-layer perceptron for feature rows",
        )
    )
