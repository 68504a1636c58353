"""The whole plugin contract: the hook specs and the specs a plugin registers.

A plugin is a module (or object) with functions marked ``@trainyard.hookimpl``, reached
through the entry-point group ``trainyard``::

    [project.entry-points.trainyard]
    my_plugin = "my_package.plugin"

Each hook receives a ``register`` callable from the host. Call it once per thing the
plugin provides. The host validates every registration in one place: a name used by two
plugins, a wrong type or a missing field is reported once, naming the plugin.

This module imports no torch and no Ray; what a plugin returns may use them freely.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainyard.markers import hookspec

#: Version of this contract. A plugin may declare ``TRAINYARD_HOOK_CONTRACT = 1`` at
#: module level; a plugin written for another major version is refused at load time.
HOOK_CONTRACT_VERSION = 1

TASKS = ("classification", "regression")
INPUT_KINDS = ("features", "image", "text")


@dataclass
class DataInfo:
    """What a dataset tells the model and, through the checkpoint, the server.

    :param task: ``"classification"`` or ``"regression"``.
    :param inputs: the raw input kind: ``"features"`` (rows of floats), ``"image"``
        (``C x H x W`` arrays, or ``H x W`` for one channel) or ``"text"`` (strings).
    :param classes: label names, index ``i`` naming class ``i`` (classification only).
    :param input_shape: ``[n_features]`` for features, ``[C, H, W]`` for images, ``[]``
        for text.
    :param feature_names: column names of feature rows, if known.
    :param target_names: names of the regression targets (regression only).
    """

    task: str
    inputs: str
    classes: list[str] = field(default_factory=list)
    input_shape: list[int] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)

    @property
    def num_outputs(self) -> int:
        """Width of the model's output: one logit per class, or one value per target."""
        if self.task == "classification":
            return len(self.classes)
        return max(1, len(self.target_names))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Split:
    """One split of raw examples.

    :param inputs: a float array ``[N, n_features]`` (features), an array
        ``[N, C, H, W]`` (images) or a list of ``N`` strings (text).
    :param targets: ``N`` class indices (int) or an array ``[N]`` / ``[N, T]`` of floats.
    """

    inputs: Any
    targets: Any

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class StreamingData:
    """What a streaming dataset's ``load`` returns (a :class:`DatasetSpec` with
    ``streaming=True``): Ray Datasets, read lazily and streamed to the training workers,
    instead of arrays held in memory.

    Each row has two columns:

    - ``input``: one raw example as :class:`Split` holds them: a float vector
      ``[n_features]`` (features), an array ``[C, H, W]`` or ``[H, W]`` (image) or a string
      (text);
    - ``target``: the class index (int) or the regression target(s) (float, or a float
      vector).

    :param info: the dataset's :class:`DataInfo` (classes must be known: take them from the
        config, from the folder names, or from a streaming aggregate such as
        ``ds.unique("label")``, never by loading the rows).
    :param train: a ``ray.data.Dataset`` of the training rows.
    :param val: a ``ray.data.Dataset`` of the validation rows, or ``None`` to let trainyard
        hold out ``data.val_fraction`` of ``train`` (by a seeded hash of each row's input, so
        every pass and every worker agrees on the split without loading it).
    :param rows: the number of rows of ``train``, when it is known without reading it
        (Parquet metadata); ``None``: trainyard counts them.
    :param size_bytes: an estimate of ``train``'s size in memory (e.g. from the files'
        sizes), when known without reading it; a search keeps data under a quarter of the
        object store cached (``data.stream.cache: auto``). ``None``: unknown, not cached.
    """

    info: DataInfo
    train: Any
    val: Any = None
    rows: int | None = None
    size_bytes: int | None = None


@dataclass
class LoadedData:
    """What a dataset's ``load`` returns.

    :param info: the dataset's :class:`DataInfo`.
    :param train: the training split.
    :param val: the validation split, or ``None`` to let trainyard hold out
        ``data.val_fraction`` of ``train`` (stratified, seeded).
    """

    info: DataInfo
    train: Split
    val: Split | None = None


class Processor:
    """Turns raw inputs into a model batch and model outputs into answers.

    Training and serving use the same processor, saved with the checkpoint. Subclass it
    and override what you need; state set in :meth:`fit` must be restorable by
    :meth:`load` (the default saves and loads ``self.state``, a JSON-able dict).

    :param params: the model plugin's params (a dataclass instance, or ``None``).
    :param info: the dataset's :class:`DataInfo`.
    """

    #: True when the state came from a checkpoint (:meth:`load`). The model's weights
    #: then come from the checkpoint too, so ``build`` need not fetch pretrained weights.
    restored: bool = False

    def __init__(self, params: Any, info: DataInfo):
        self.params = params
        self.info = info
        self.state: dict = {}

    def fit(self, inputs: Any) -> None:
        """Learn preprocessing state (scaling, vocabulary, ...) from training inputs."""

    def encode(self, inputs: Any) -> Any:
        """Raw inputs (a batch, as in :class:`Split`) to a tensor or a dict of tensors.

        A dict is passed to the model as keyword arguments, a tensor as one argument.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.encode is not written: a model plugin gives its ModelSpec a "
            "processor (a Processor subclass) whose encode turns raw inputs into the model's tensor")

    def decode(self, outputs: Any) -> list[dict]:
        """Model outputs (a float tensor ``[N, num_outputs]``) to one answer per example.

        The default gives ``{"label", "index", "scores"}`` (softmax over ``info.classes``)
        for classification and ``{"value"}`` for regression.
        """
        import torch

        outputs = outputs.detach().float().cpu()
        if self.info.task == "classification":
            probs = torch.softmax(outputs, dim=-1).numpy()
            return [
                {
                    "label": self.info.classes[int(p.argmax())],
                    "index": int(p.argmax()),
                    "scores": {c: float(s) for c, s in zip(self.info.classes, p)},
                }
                for p in probs
            ]
        values = outputs.numpy()
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        return [{"value": v.tolist() if hasattr(v, "tolist") else float(v)} for v in values]

    def save(self, directory: str | Path) -> None:
        """Write the processor's state into ``directory`` (created by the host)."""
        Path(directory, "processor_state.json").write_text(json.dumps(self.state))

    def load(self, directory: str | Path) -> None:
        """Restore state written by :meth:`save`."""
        path = Path(directory, "processor_state.json")
        if path.exists():
            self.state = json.loads(path.read_text())
        self.restored = True


@dataclass
class ModelSpec:
    """A model a plugin provides.

    :param name: unique name, used as ``model.name`` in configs.
    :param build: ``build(params, info, processor) -> torch.nn.Module``, called after
        ``processor.fit`` (so e.g. a vocabulary size is known). The module returns a
        float tensor ``[N, info.num_outputs]`` (logits for classification).
    :param inputs: raw input kinds the model accepts (subset of ``features``, ``image``,
        ``text``). A config pairing it with another kind of dataset is rejected.
    :param processor: ``processor(params, info) -> Processor`` (a Processor subclass
        fits); it turns raw inputs into batches and outputs into answers, in training and
        in serving alike.
    :param params: a dataclass type; ``model.params`` in the config is validated against
        it (unknown keys, wrong types) and passed as an instance. ``None``: no params.
    :param description: one line for ``trainyard plugins``.
    """

    name: str
    build: Callable[[Any, DataInfo, Processor], Any]
    inputs: Sequence[str]
    processor: Callable[[Any, DataInfo], Processor] = Processor
    params: type | None = None
    description: str = ""


@dataclass
class DatasetSpec:
    """A dataset a plugin provides.

    :param name: unique name, used as ``data.name`` in configs.
    :param load: ``load(params, seed) -> LoadedData``. Called on each training worker, so
        it reads local files or the plugin's package data, never something only the driver
        has. With ``streaming=True``: ``load(params, seed) -> StreamingData``, called once,
        on the driver, which hands each worker its own shard as a stream.
    :param inputs: the raw input kind it yields (``features``, ``image`` or ``text``), or
        ``inputs(params) -> str`` when the params decide.
    :param task: ``classification`` or ``regression``, or ``task(params) -> str`` when the
        params decide (e.g. a CSV file of either kind).
    :param params: a dataclass type for ``data.params``, validated like model params.
    :param description: one line for ``trainyard plugins``.
    :param streaming: ``load`` returns :class:`StreamingData` (Ray Datasets) rather than
        :class:`LoadedData`: for data that does not fit in a worker's memory.
    """

    name: str
    load: Callable[[Any, int], LoadedData]
    inputs: str | Callable[[Any], str]
    task: str | Callable[[Any], str] = "classification"
    params: type | None = None
    description: str = ""
    streaming: bool = False


@dataclass
class MetricSpec:
    """A validation metric a plugin provides.

    :param name: unique name, used in ``train.metrics`` and as the reported key
        ``val_<name>``.
    :param fn: ``fn(outputs, targets, info) -> float`` over the whole validation set:
        ``outputs`` is a float array ``[N, num_outputs]``, ``targets`` the split's targets
        as an array. Under DDP trainyard gathers all workers' outputs first, so the value
        equals the one-process value.
    :param task: ``classification``, ``regression`` or ``any``.
    :param mode: ``max`` if higher is better, else ``min``.
    :param description: one line for ``trainyard plugins``.
    :param default: reported when a job's ``train.metrics`` is empty and the metric serves
        the dataset's task; the first default metric is then the monitored one.
    """

    name: str
    fn: Callable[[Any, Any, DataInfo], float]
    task: str = "any"
    mode: str = "max"
    description: str = ""
    default: bool = False


# ---------------------------------------------------------------------------------------
# Hook specs. Their docstrings are the plugin author's reference (docs/plugins.md).
# ---------------------------------------------------------------------------------------


@hookspec
def register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register the models this plugin provides.

    :param register: call ``register(ModelSpec(...))`` once per model. A name another
        plugin already registered is an error naming both plugins.
    :return: nothing. Returning a value (e.g. a list of specs) is an error: call ``register``.
    """


@hookspec
def register_datasets(register: Callable[[DatasetSpec], None]) -> None:
    """Register the datasets this plugin provides.

    :param register: call ``register(DatasetSpec(...))`` once per dataset. A name another
        plugin already registered is an error naming both plugins.
    :return: nothing. Returning a value (e.g. a list of specs) is an error: call ``register``.
    """


@hookspec
def register_metrics(register: Callable[[MetricSpec], None]) -> None:
    """Register the validation metrics this plugin provides.

    :param register: call ``register(MetricSpec(...))`` once per metric. A name another
        plugin already registered is an error naming both plugins.
    :return: nothing. Returning a value (e.g. a list of specs) is an error: call ``register``.
    """
