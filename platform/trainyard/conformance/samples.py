"""Raw examples a model check fits a processor on and sends forward: the plugin's own
dataset of the input kind, else another installed dataset that needs no params, else a
synthetic set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainyard import hookspecs
from trainyard.conformance.params import typed
from trainyard.conformance.runner import Plugin

#: Examples used to fit a processor, and the batch sent forward.
FIT_EXAMPLES = 32
BATCH = 8


@dataclass
class Sample:
    """Raw examples to fit a processor on and send forward."""

    info: hookspecs.DataInfo
    inputs: Any
    targets: Any
    dataset: hookspecs.DatasetSpec
    source: str


def sample_for(plugin: Plugin, kind: str) -> Sample:
    """A few raw examples of ``kind``: the plugin's own data, else an installed
    dataset that needs no params, else synthetic."""
    for spec in _datasets_of_kind(plugin, kind):
        sample = _dataset_sample(plugin, spec)
        if sample is not None:
            return sample
    info, inputs, targets = synthetic(kind)
    spec = hookspecs.DatasetSpec(f"conformance_synthetic_{kind}", lambda p, s: None, kind)
    return Sample(info, inputs, targets, spec, f"synthetic {kind}")


def _datasets_of_kind(plugin: Plugin, kind: str) -> list[hookspecs.DatasetSpec]:
    """The plugin's own datasets of ``kind``, then other plugins' that need no params."""
    provided = plugin.info.provides["dataset"]
    own = [plugin.registry.datasets[n] for n in provided]
    others = [d for n, d in plugin.registry.datasets.items() if n not in provided and d.params is None]
    return [spec for spec in [*own, *others] if spec.inputs == kind]


def _dataset_sample(plugin: Plugin, spec: hookspecs.DatasetSpec) -> Sample | None:
    """Up to FIT_EXAMPLES training examples of a dataset loaded with its default params;
    None if it does not load or has fewer than a batch (its own check reports why)."""
    try:
        params = typed(spec.params, {}, "dataset", spec.name, plugin.name)
        data = spec.load(params, 0)
        train = data.train
        if len(train) < BATCH:
            return None
    except Exception:  # noqa: BLE001 - its own check reports it; use other data
        return None
    import numpy as np

    index = np.random.default_rng(0).permutation(len(train))[:FIT_EXAMPLES]
    owner = plugin.registry.owners.get(("dataset", spec.name), "?")
    return Sample(data.info, take_inputs(train.inputs, index), take_targets(train.targets, index),
                  spec, f"dataset {spec.name!r} (plugin {owner!r})")


def take_inputs(inputs: Any, index: Any) -> Any:
    """Raw inputs ``index`` (a list of texts stays a list)."""
    index = list(index)
    if isinstance(inputs, list):
        return [inputs[i] for i in index]
    import numpy as np

    return np.asarray(inputs)[index]


def take_targets(targets: Any, index: Any) -> Any:
    """Targets ``index``, as an array."""
    import numpy as np

    return np.asarray(targets)[list(index)]


def synthetic(kind: str) -> tuple[hookspecs.DataInfo, Any, Any]:
    """FIT_EXAMPLES synthetic examples of ``kind`` in three learnable classes."""
    import numpy as np

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    targets = (np.arange(FIT_EXAMPLES) % len(classes)).astype(np.int64)
    if kind == "features":
        info = hookspecs.DataInfo("classification", "features", classes, [6],
                                  feature_names=[f"f{i}" for i in range(6)])
        inputs = rng.normal(size=(FIT_EXAMPLES, 6)).astype(np.float32) + targets[:, None]
    elif kind == "image":
        info = hookspecs.DataInfo("classification", "image", classes, [3, 16, 16])
        inputs = rng.random((FIT_EXAMPLES, 3, 16, 16), dtype=np.float32)
    else:
        words = [["good", "great", "lovely"], ["bad", "awful", "poor"], ["plain", "usual", "fine"]]
        info = hookspecs.DataInfo("classification", "text", classes, [])
        inputs = [f"the film was {words[t][i % 3]} and the food {words[t][(i + 1) % 3]}"
                  for i, t in enumerate(targets)]
    return info, inputs, targets
