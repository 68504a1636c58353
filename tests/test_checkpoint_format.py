"""The checkpoint format: a checkpoint records the model's full params and the plugin's
version, so a plugin release that changes a default does not change a served model.

Checkpoints are written directly with ``write_checkpoint`` (no Ray); test plugins are
registered on the real plugin manager and removed in ``finally``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers_plugins import make_distribution, plugin_registered, registry_snapshot, unique
from trainyard import DataInfo, DatasetSpec, LoadedData, ModelSpec, Split, hookimpl, plugins
from trainyard.checkpoint import (
    FORMAT_VERSION,
    LegacyCheckpointWarning,
    load_predictor,
    write_checkpoint,
)
from trainyard.config import load_config, resolve, typed_params
from trainyard.errors import TrainyardError
from trainyard.hookspecs import Processor

MODEL = "scaled_probe"
DATASET = "scaled_toy"
N_FEATURES = 3


def params_schema(scale: float | None = 1.0) -> type:
    """The model's params dataclass in one release: ``scale`` defaults to ``scale``, or the
    release has no ``scale`` at all (None)."""
    fields = [("hidden", int, dataclasses.field(default=4))]
    if scale is not None:
        fields.append(("scale", float, dataclasses.field(default=scale)))
    return dataclasses.make_dataclass("ScaledParams", fields)


class RowsProcessor(Processor):
    def encode(self, inputs):
        return torch.as_tensor(np.asarray(inputs, dtype=np.float32))


class Scaled(nn.Module):
    """A tiny MLP whose output is multiplied by ``params.scale``: a param that is no
    weight, so the weights load whatever its value and only the answers change."""

    def __init__(self, hidden: int, scale: float, outputs: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, outputs))
        self.scale = scale

    def forward(self, x):
        return self.body(x) * self.scale


def _build(params, info, processor):
    return Scaled(params.hidden, getattr(params, "scale", 1.0), info.num_outputs)


def _load_toy(params, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, N_FEATURES)).astype(np.float32)
    info = DataInfo("regression", "features", input_shape=[N_FEATURES], target_names=["y"])
    return LoadedData(info, Split(x, x.sum(axis=1)))


def release(scale: float | None = 1.0, dataset: bool = True):
    """One release of the test plugin: the model (and, for training, a dataset)."""
    schema = params_schema(scale)

    class Release:
        @hookimpl
        def register_models(self, register):
            register(ModelSpec(MODEL, build=_build, inputs=["features"],
                               processor=RowsProcessor, params=schema))

        if dataset:
            @hookimpl
            def register_datasets(self, register):
                register(DatasetSpec(DATASET, _load_toy, "features", "regression"))

    return Release()


#: Release 1.2.3 as an installed distribution's entry point (see ``installed_release``).
DIST_RELEASE = release(1.0)
INPUTS = np.random.default_rng(7).normal(size=(5, N_FEATURES)).astype(np.float32)


def train_and_write(folder: Path, plugin: str, user_params: dict | None = None):
    """Resolve a job as ``trainyard train`` does, build the model and write a checkpoint;
    return the job and the in-memory model's answers for INPUTS."""
    job = resolve(load_config(base={
        "name": "ckpt_format",
        "model": {"name": MODEL, "params": user_params or {}},
        "data": {"name": DATASET},
        "train": {"metrics": ["mse"]},
    }))
    data = job.dataset.load(job.data_params, 0)
    processor = job.model.processor(job.model_params, data.info)
    processor.fit(data.train.inputs)
    torch.manual_seed(0)
    model = job.model.build(job.model_params, data.info, processor).eval()
    with torch.inference_mode():
        expected = processor.decode(model(processor.encode(INPUTS)))
    write_checkpoint(folder, job=job, model=model, processor=processor, info=data.info,
                     epoch=1, metrics={"val_loss": 0.1}, plugin=plugin)
    return job, expected


def values(answers: list[dict]) -> np.ndarray:
    return np.array([a["value"] for a in answers], dtype=np.float64)


def make_format_1(folder: Path) -> None:
    """Turn a checkpoint into one written before the manifest recorded params, its files
    or safetensors: weights in a torch state dict, ``model.pt``."""
    import torch
    from safetensors.torch import load_file

    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("model_params", "model_plugin_version", "files"):
        manifest.pop(key, None)
    manifest["format"] = 1
    path.write_text(json.dumps(manifest, indent=2))
    torch.save(load_file(folder / "model.safetensors"), folder / "model.pt")
    (folder / "model.safetensors").unlink()


@contextmanager
def installed_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugin: str, version: str):
    """DIST_RELEASE installed as distribution ``version`` (entry point ``plugin``), so the
    registry knows its version as for any pip-installed plugin."""
    root = tmp_path / "site"
    make_distribution(root, unique("trainyard_scaled"), entry_points={
        plugin: f"{__name__}:DIST_RELEASE"}, modules={}, version=version)
    before = registry_snapshot()
    with monkeypatch.context() as mp:
        mp.syspath_prepend(str(root))
        plugins.reset()
        try:
            yield
        finally:
            plugins.reset()
    assert registry_snapshot() == before


def test_changed_plugin_default_does_not_change_a_served_model(tmp_path):
    plugin = unique("scaled_plugin")
    folder = tmp_path / "ckpt"
    with plugin_registered(release(scale=1.0), plugin):
        _, expected = train_and_write(folder, plugin, {"hidden": 5})

    # The plugin's next release changes the default of a param the job did not set, and
    # no longer ships the dataset: a replica must not need it.
    with plugin_registered(release(scale=3.0, dataset=False), plugin):
        with warnings.catch_warnings():
            warnings.simplefilter("error", LegacyCheckpointWarning)
            predictor = load_predictor(folder)
        answers = predictor.predict(INPUTS)
        np.testing.assert_allclose(values(answers), values(expected), rtol=1e-6)
        assert predictor.model.scale == 1.0 and predictor.model.body[0].out_features == 5
        assert predictor.manifest["model_params"] == {"hidden": 5, "scale": 1.0}
        assert predictor.config.model.params == {"hidden": 5}  # job.yaml, as written

        # Rebuilding from job.yaml with the installed defaults (as format 1 did) would
        # answer differently: the assertion above is one a regression would fail.
        spec = plugins.get_registry().get("model", MODEL)
        params = typed_params(spec.params, predictor.config.model.params, "model.params")
        assert params.scale == 3.0
        rebuilt = spec.build(params, predictor.info, predictor.processor)
        rebuilt.load_state_dict(predictor.model.state_dict())
        with torch.inference_mode():
            drifted = predictor.processor.decode(rebuilt.eval()(predictor.processor.encode(INPUTS)))
        assert not np.allclose(values(drifted), values(expected))


def test_manifest_records_full_params_with_defaults_and_the_plugin_version(tmp_path, monkeypatch):
    plugin = unique("scaled_dist")
    folder = tmp_path / "ckpt"
    with installed_release(tmp_path, monkeypatch, plugin, version="1.2.3"):
        info = next(i for i in plugins.get_registry().plugins if i.name == plugin)
        assert info.version == "1.2.3"
        job, _ = train_and_write(folder, plugin, {"hidden": 6})

        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["format"] == FORMAT_VERSION == 2
        assert manifest["model"] == MODEL and manifest["model_plugin"] == plugin
        assert manifest["model_plugin_version"] == "1.2.3"
        # every field of the params dataclass, the default the job did not write included
        assert manifest["model_params"] == {"hidden": 6, "scale": 1.0}
        assert manifest["model_params"] == dataclasses.asdict(job.model_params)
        assert dict(job.config.model.params) == {"hidden": 6}
        assert load_predictor(folder).manifest == manifest


def test_plugin_registered_in_process_records_an_empty_version(tmp_path):
    plugin = unique("scaled_plugin")
    with plugin_registered(release(), plugin):
        train_and_write(tmp_path / "ckpt", plugin)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["model_plugin_version"] == ""
    assert manifest["model_params"] == {"hidden": 4, "scale": 1.0}


def test_format_1_checkpoint_still_loads_with_current_defaults_and_one_warning(
    tmp_path, monkeypatch
):
    plugin = unique("scaled_dist")
    folder = tmp_path / "ckpt"
    with installed_release(tmp_path, monkeypatch, plugin, version="1.2.3"):
        _, expected = train_and_write(folder, plugin, {"hidden": 5})
        make_format_1(folder)

        with pytest.warns(LegacyCheckpointWarning) as record:
            predictor = load_predictor(folder)
        assert len(record) == 1
        message = str(record[0].message)
        assert str(folder) in message and "predates recorded model params" in message
        assert repr(plugin) in message and "version 1.2.3" in message
        assert "defaults" in message
        assert record[0].filename == __file__  # attributed to the caller of load_predictor
        np.testing.assert_allclose(values(predictor.predict(INPUTS)), values(expected), rtol=1e-6)
        assert predictor.model.body[0].out_features == 5


def test_format_1_checkpoint_takes_the_installed_default(tmp_path):
    """What format 1 cannot help: the params it lacks come from today's plugin."""
    plugin = unique("scaled_plugin")
    folder = tmp_path / "ckpt"
    with plugin_registered(release(scale=1.0), plugin):
        train_and_write(folder, plugin)
    make_format_1(folder)
    with plugin_registered(release(scale=3.0, dataset=False), plugin):
        with pytest.warns(LegacyCheckpointWarning, match="version unknown"):
            predictor = load_predictor(folder)
    assert predictor.model.scale == 3.0


def test_recorded_param_the_installed_plugin_no_longer_has_is_an_error_naming_it(tmp_path):
    plugin = unique("scaled_plugin")
    folder = tmp_path / "ckpt"
    with plugin_registered(release(scale=1.0), plugin):
        train_and_write(folder, plugin)
    with plugin_registered(release(scale=None, dataset=False), plugin):  # 'scale' removed
        with pytest.raises(TrainyardError) as caught:
            load_predictor(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert str(folder) in message and repr(plugin) in message and "'scale'" in message
    assert "no param" in message and "hidden" in message  # what the installed one has


def test_recorded_param_of_a_type_the_installed_plugin_rejects_is_an_error_naming_it(tmp_path):
    plugin = unique("scaled_plugin")
    folder = tmp_path / "ckpt"
    with plugin_registered(release(scale=1.0), plugin):
        train_and_write(folder, plugin)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model_params"]["hidden"] = "wide"
    path.write_text(json.dumps(manifest))
    with plugin_registered(release(scale=1.0, dataset=False), plugin):
        with pytest.raises(TrainyardError, match=r"model\.params\.hidden") as caught:
            load_predictor(folder)
    assert str(folder) in str(caught.value) and repr(plugin) in str(caught.value)


def test_checkpoint_of_a_newer_format_is_refused(tmp_path):
    plugin = unique("scaled_plugin")
    folder = tmp_path / "ckpt"
    with plugin_registered(release(), plugin):
        train_and_write(folder, plugin)
        path = folder / "manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "format": FORMAT_VERSION + 1}))
        with pytest.raises(TrainyardError, match="newer than this trainyard reads"):
            load_predictor(folder)


def test_each_job_writes_its_own_params_and_config(tmp_path):
    """write_checkpoint works a job's params and config text out once per job: a second job
    in the same process writes its own, and the first job's next epoch its own again."""
    plugin = unique("scaled_plugin")
    with plugin_registered(release(), plugin):
        first, _ = train_and_write(tmp_path / "a", plugin, {"hidden": 3})
        train_and_write(tmp_path / "b", plugin, {"hidden": 7})
        info = _load_toy(None, 0).info
        processor = RowsProcessor(first.model_params, info)
        model = first.model.build(first.model_params, info, processor)
        write_checkpoint(tmp_path / "c", job=first, model=model, processor=processor, info=info,
                         epoch=2, metrics={"val_loss": 0.2}, plugin=plugin)
    read = {k: json.loads((tmp_path / k / "manifest.json").read_text())["model_params"] for k in "abc"}
    assert read == {"a": {"hidden": 3, "scale": 1.0}, "b": {"hidden": 7, "scale": 1.0},
                    "c": {"hidden": 3, "scale": 1.0}}
    assert "hidden: 7" in (tmp_path / "b" / "job.yaml").read_text()
    assert "hidden: 3" in (tmp_path / "c" / "job.yaml").read_text()


def test_a_checkpoint_is_not_rebuilt_with_another_plugins_model_of_the_same_name(tmp_path):
    """A checkpoint records the plugin its model came from; where the name now belongs to
    another plugin, loading it says so instead of building the other plugin's model."""
    from trainyard.errors import TrainyardError

    first, second = unique("scaled_plugin"), unique("scaled_rival")
    folder = tmp_path / "ckpt"
    with plugin_registered(release(scale=1.0), first):
        train_and_write(folder, first, {"hidden": 5})
    with plugin_registered(release(scale=1.0), second):  # the same model name, another plugin
        with pytest.raises(TrainyardError) as err:
            load_predictor(folder)
    assert str(err.value) == (f"checkpoint {folder}: its model {MODEL!r} was trained with plugin {first!r}, but "
                              f"here that name is plugin {second!r}'s; install {first!r} (and disable the other "
                              "with TRAINYARD_DISABLE_PLUGINS) to load it")
