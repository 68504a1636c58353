"""The checkpoint format, and rebuilding a model with its processing from one.

A checkpoint folder is self-contained::

    manifest.json      model and dataset names, the plugin that provides the model, task
    job.yaml           the resolved job config
    data_info.json     task, classes (label names), input kind and shape
    processor/         the model plugin's processor state (scaling, tokenizer, ...)
    model.pt           model weights (state_dict)
    optimizer.pt       optimizer state, for resuming
    trainer_state.json epoch and validation metrics

Nothing else is needed to rebuild the model and its pre- and post-processing; the model
plugin must be installed, and the manifest names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainyard.errors import TrainyardError
from trainyard.hookspecs import DataInfo, Processor

FORMAT_VERSION = 1


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
) -> Path:
    import torch

    from trainyard import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT_VERSION,
        "trainyard_version": __version__,
        "model": job.model.name,
        "model_plugin": plugin,
        "dataset": job.dataset.name,
        "task": job.task,
        "run": job.config.name,
    }
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

        batch = self.processor.encode(inputs)
        with torch.inference_mode():
            if isinstance(batch, dict):
                return self.model(**{k: v.to(self.device) for k, v in batch.items()})
            return self.model(batch.to(self.device))


def load_predictor(directory: str | Path, device: str = "cpu", registry: Any = None) -> Predictor:
    """Rebuild a model and its processing from a checkpoint folder alone."""
    import torch

    from trainyard.config import load_config, typed_params

    directory = Path(directory)
    if not (directory / "manifest.json").is_file():
        raise TrainyardError(f"{directory} is not a trainyard checkpoint (no manifest.json)")
    if registry is None:
        from trainyard.plugins import get_registry

        registry = get_registry()
    manifest = json.loads((directory / "manifest.json").read_text())
    config = load_config(directory / "job.yaml")
    spec = registry.get("model", manifest["model"])
    info = DataInfo.from_dict(json.loads((directory / "data_info.json").read_text()))
    params = typed_params(spec.params, config.model.params, "model.params")
    processor = spec.processor(params, info)
    processor.load(directory / "processor")
    model = spec.build(params, info, processor)
    state = torch.load(directory / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return Predictor(model, processor, info, manifest, config, device)
