"""trainyard: train, tune and serve PyTorch models on Ray, extended through plugins.

Plugin authors need only::

    from trainyard import hookimpl, ModelSpec, DatasetSpec, MetricSpec

Nothing imported here loads Ray or torch.
"""

from trainyard.hookspecs import (
    HOOK_CONTRACT_VERSION,
    DataInfo,
    DatasetSpec,
    LoadedData,
    MetricSpec,
    ModelSpec,
    Processor,
    Split,
    StreamingData,
)
from trainyard.markers import hookimpl

__version__ = "0.1.0"

__all__ = [
    "HOOK_CONTRACT_VERSION",
    "DataInfo",
    "DatasetSpec",
    "LoadedData",
    "MetricSpec",
    "ModelSpec",
    "Processor",
    "Split",
    "StreamingData",
    "__version__",
    "hookimpl",
]
