"""Convolutional network for 1- or 3-channel images of any size (8x8 up to 32x32 and on)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from trainyard import DataInfo, ModelSpec, Processor, hookimpl


@dataclass
class CNNParams:
    #: Output channels of each conv block (conv 3x3, ReLU, then 2x2 max-pool while the
    #: feature map is at least 4 pixels wide).
    channels: list[int] = field(default_factory=lambda: [32, 64])
    #: Width of the dense layer before the output; 0 for none.
    hidden: int = 128
    dropout: float = 0.0

    def __post_init__(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError("channels must be a non-empty list of positive sizes")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.hidden < 0:
            raise ValueError("hidden must not be negative")


class ImageProcessor(Processor):
    """Image arrays (``[N, C, H, W]``, or ``[N, H, W]`` for one channel) to a normalised
    float tensor, with the training split's per-channel mean and std."""

    def _array(self, inputs) -> np.ndarray:
        x = np.asarray(inputs, dtype=np.float32)
        c, h, w = self.info.input_shape
        if x.ndim == 3 and c == 1:
            x = x[:, None]
        if x.ndim != 4 or list(x.shape[1:]) != [c, h, w]:
            raise ValueError(f"expected images of shape [{c}, {h}, {w}], got {list(x.shape[1:])}")
        return x

    def fit(self, inputs):
        x = self._array(inputs)
        std = x.std(axis=(0, 2, 3))
        self.state = {"mean": x.mean(axis=(0, 2, 3)).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}

    def encode(self, inputs):
        import torch

        x = self._array(inputs)
        mean = np.asarray(self.state["mean"], np.float32)[None, :, None, None]
        std = np.asarray(self.state["std"], np.float32)[None, :, None, None]
        return torch.from_numpy(np.ascontiguousarray((x - mean) / std))


def build(params: CNNParams, info: DataInfo, processor):
    from torch import nn

    in_ch, h, w = info.input_shape
    layers = []
    for out_ch in params.channels:
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        in_ch = out_ch
    layers.append(nn.Flatten())
    width = in_ch * h * w
    if params.dropout:
        layers.append(nn.Dropout(params.dropout))
    if params.hidden:
        layers += [nn.Linear(width, params.hidden), nn.ReLU()]
        width = params.hidden
    layers.append(nn.Linear(width, info.num_outputs))
    return nn.Sequential(*layers)


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="cnn",
            build=build,
            inputs=["image"],
            processor=ImageProcessor,
            params=CNNParams,
            description="Conv blocks + dense head for 1- or 3-channel images of any size",
        )
    )
