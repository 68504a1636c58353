"""The checkpoint format, and rebuilding a model with its processing from one.

A checkpoint folder is self-contained::

    manifest.json      model and dataset names, task, the plugin that provides the model
                       and its version, and the model's full params as trained
    job.yaml           the resolved job config
    data_info.json     task, classes (label names), input kind and shape
    processor/         the model plugin's processor state (scaling, tokenizer, ...)
    model.pt           model weights (state_dict)
    optimizer.pt       optimizer state, for resuming
    trainer_state.json epoch and validation metrics

Nothing else is needed to rebuild the model and its pre- and post-processing; the model
plugin must be installed, and the manifest names it.

The manifest (format 2) records every field of the model's params as resolved at training
time, the defaults the job did not set included (``model_params``), with the plugin's
distribution version (``model_plugin_version``). :func:`load_predictor` rebuilds the model
from those alone, so a plugin release that changes a default does not silently change a
served model, and a replica never re-validates the training job (its dataset, metrics).
Format-1 checkpoints, which lack them, still load, with the installed plugin's current
defaults and a warning.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainyard.errors import TrainyardError
from trainyard.hookspecs import DataInfo, Processor

FORMAT_VERSION = 2


class LegacyCheckpointWarning(UserWarning):
    """A checkpoint written before the manifest recorded the model's params."""


def unwrap(model: Any) -> Any:
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)


def write_checkpoint(
    directory: str | Path,
    *,
    job: Any,
    model: Any,
    processor: Processor,
    info: DataInfo,
    epoch: int,
    metrics: dict,
    optimizer: Any = None,
    plugin: str = "",
    registry: Any = None,
) -> Path:
    """Write a checkpoint folder (see the module docstring for its layout).

    ``plugin`` names the plugin that provides the model; ``registry`` (default: the
    process's) is where its version is looked up.
    """
    import torch

    from trainyard import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT_VERSION,
        "trainyard_version": __version__,
        "model": job.model.name,
        "model_plugin": plugin,
        "model_plugin_version": _plugin_version(registry, plugin, job.model.name),
        "dataset": job.dataset.name,
        "task": job.task,
        "run": job.config.name,
    }
    manifest["model_params"] = _params_to_json(job.model_params)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (directory / "job.yaml").write_text(OmegaConf.to_yaml(job.config))
    (directory / "data_info.json").write_text(json.dumps(info.to_dict(), indent=2))
    (directory / "processor").mkdir(exist_ok=True)
    processor.save(directory / "processor")
    torch.save(unwrap(model).state_dict(), directory / "model.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(
        json.dumps({"epoch": epoch, "metrics": metrics}, indent=2)
    )
    return directory


def read_trainer_state(directory: str | Path) -> dict:
    return json.loads(Path(directory, "trainer_state.json").read_text())


@dataclass
class Predictor:
    """A model rebuilt from a checkpoint, with the plugin's own pre- and post-processing."""

    model: Any
    processor: Processor
    info: DataInfo
    manifest: dict
    config: Any
    device: str = "cpu"

    def predict(self, inputs: Any) -> list[dict]:
        """Raw inputs (feature rows, image arrays or strings) to one answer each."""
        return self.processor.decode(self.forward(inputs))

    def forward(self, inputs: Any) -> Any:
        """Raw inputs to the model's raw output tensor."""
        import torch

        from trainyard.batches import call_model, to_device

        batch = self.processor.encode(inputs)
        with torch.inference_mode():
            return call_model(self.model, to_device(batch, self.device))


def load_predictor(directory: str | Path, device: str = "cpu", registry: Any = None) -> Predictor:
    """Rebuild a model and its processing from a checkpoint folder alone.

    The model plugin is looked up by the name in the manifest, and the model is built
    with the params the manifest records (the full params as trained). The training job
    is not resolved again: its dataset and metric plugins need not be installed.
    ``predictor.config`` is ``job.yaml`` as written.
    """
    import torch

    directory = Path(directory)
    if not (directory / "manifest.json").is_file():
        raise TrainyardError(f"{directory} is not a trainyard checkpoint (no manifest.json)")
    if registry is None:
        from trainyard.plugins import get_registry

        registry = get_registry()
    manifest = json.loads((directory / "manifest.json").read_text())
    fmt = manifest.get("format", 1)
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise TrainyardError(
            f"checkpoint {directory} has format {fmt}, newer than this trainyard reads "
            f"(up to {FORMAT_VERSION}); upgrade trainyard to load it"
        )
    config = OmegaConf.load(directory / "job.yaml")
    spec = registry.get("model", manifest["model"])
    info = DataInfo.from_dict(json.loads((directory / "data_info.json").read_text()))
    params = _model_params(directory, manifest, config, spec, registry)
    processor = spec.processor(params, info)
    processor.load(directory / "processor")
    model = spec.build(params, info, processor)
    state = torch.load(directory / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return Predictor(model, processor, info, manifest, config, device)


# ---------------------------------------------------------------------------------------
# Params and the plugin's version in the manifest
# ---------------------------------------------------------------------------------------

def _plugin_version(registry: Any, plugin: str, model: str) -> str:
    """The distribution version of the plugin providing ``model``; "" if unknown."""
    try:
        if registry is None:
            from trainyard.plugins import get_registry

            registry = get_registry()
        name = plugin or getattr(registry, "owners", {}).get(("model", model), "")
        for info in getattr(registry, "plugins", []):
            if info.name == name:
                version = info.version or ""
                return "" if version == "?" else version
    except Exception:  # a version is a record, never a reason to fail saving or loading
        pass
    return ""


def _params_to_json(params: Any) -> Any:
    """Typed model params (the plugin's dataclass instance, or None) as plain JSON: every
    field, defaults included; anything JSON lacks (a Path, say) as its text, which the
    schema types back on load."""
    if params is None:
        return None
    data = OmegaConf.to_container(OmegaConf.structured(params), resolve=True, enum_to_str=True)
    return json.loads(json.dumps(data, default=str))


def _model_params(
    directory: Path, manifest: dict, config: Any, spec: Any, registry: Any
) -> Any:
    """The model's params: the recorded ones typed by the installed plugin's schema, or
    for a checkpoint that predates them, job.yaml's filled with the current defaults."""
    from trainyard.config import typed_params

    model = manifest["model"]
    plugin = manifest.get("model_plugin") or _owner(registry, model)
    installed = _plugin_version(registry, plugin, model)
    if "model_params" not in manifest:
        values = OmegaConf.select(config, "model.params", default=None) or {}
        warnings.warn(
            f"checkpoint {directory} predates recorded model params (format "
            f"{manifest.get('format', 1)}): model {model!r} was rebuilt with the current "
            f"defaults of plugin {plugin!r} version {installed or 'unknown'} for the params "
            "its job.yaml does not set; if a default changed since training, its answers "
            "may differ",
            LegacyCheckpointWarning,
            stacklevel=3,
        )
        return typed_params(spec.params, values, "model.params")

    recorded = manifest["model_params"] or {}
    trained = manifest.get("model_plugin_version") or "unknown"
    where = (
        f"checkpoint {directory}: model {model!r} was trained with plugin {plugin!r} "
        f"(version {trained}), but the installed one (version {installed or 'unknown'})"
    )
    if not isinstance(recorded, Mapping):
        raise TrainyardError(f"checkpoint {directory}: manifest.json model_params is not a mapping")
    fields = [f.name for f in dataclasses.fields(spec.params)] if spec.params is not None else []
    gone = [key for key in recorded if key not in fields]
    if gone:
        have = ", ".join(fields) or "none"
        raise TrainyardError(
            f"{where} has no param {gone[0]!r} (its params: {have}); install the plugin "
            "version the checkpoint was trained with, or retrain"
        )
    try:
        return typed_params(spec.params, dict(recorded), "model.params")
    except TrainyardError as exc:
        raise TrainyardError(f"{where} rejects the recorded params: {exc}") from None


def _owner(registry: Any, model: str) -> str:
    try:
        return registry.owner("model", model)
    except Exception:
        return ""
