"""The checkpoint format, and rebuilding a model with its processing from one.

A checkpoint folder is self-contained::

    manifest.json      model and dataset names, task, the plugin that provides the model
                       and its version, and the model's full params as trained
    job.yaml           the resolved job config
    data_info.json     task, classes (label names), input kind and shape
    processor/         the model plugin's processor state (scaling, tokenizer, ...)
    model.safetensors  model weights (safetensors; checkpoints before it: model.pt)
    optimizer.pt       optimizer state, for resuming
    scheduler.pt       learning-rate schedule state, for resuming (train.scheduler)
    trainer_state.json epoch, validation metrics, early-stopping state

``manifest.json`` is written LAST (to a temporary name, then renamed into place) and lists
every other file with its size (``files``): it is the checkpoint's completion marker. A
folder without it, or whose files are missing or shorter than it says (a write or a copy,
such as Ray's upload to storage, interrupted in any order), is incomplete:
:func:`is_complete` says so, :func:`load_predictor` refuses it, and whatever picks "the
latest checkpoint" (``trainyard.winners.resolve_checkpoint``) skips it. Manifests written
before ``files`` existed cannot tell and count as complete.

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
from trainyard.runtime.storage import atomic_write_text, is_uri, join, read_text

FORMAT_VERSION = 2
#: The checkpoint's manifest, written last: its completion marker.
MANIFEST = "manifest.json"


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
    scheduler: Any = None,
    state: dict | None = None,
    durable: bool = True,
) -> Path:
    """Write a checkpoint folder (see the module docstring for its layout).

    ``plugin`` names the plugin that provides the model; ``registry`` (default: the
    process's) is where its version is looked up. ``durable``: the manifest, written last,
    reaches the disk before this returns; False for a scratch folder that is copied to
    storage at once (a training epoch's, which Ray copies as it takes the report).
    """
    import torch

    from trainyard import __version__

    if registry is None:
        from trainyard.plugins import get_registry

        registry = get_registry()
    plugin = plugin or registry.owners.get(("model", job.model.name), "")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A manifest an earlier write left goes first: until the new one lands last, the
    # folder is incomplete.
    (directory / MANIFEST).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT_VERSION,
        "trainyard_version": __version__,
        "model": job.model.name,
        "model_plugin": plugin,
        "model_plugin_version": registry.version(plugin),
        "dataset": job.dataset.name,
        "task": job.task,
        "run": job.config.name,
    }
    manifest["model_params"] = job.params_json
    (directory / "job.yaml").write_text(job.config_yaml)
    (directory / "data_info.json").write_text(json.dumps(info.to_dict(), indent=2))
    (directory / "processor").mkdir(exist_ok=True)
    processor.save(directory / "processor")
    save_weights(unwrap(model), directory)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    (directory / "trainer_state.json").write_text(
        json.dumps({**(state or {}), "epoch": epoch, "metrics": metrics}, indent=2)
    )
    manifest["files"] = _file_sizes(directory)
    text = json.dumps(manifest, indent=2)
    if durable:
        atomic_write_text(directory / MANIFEST, text)  # the completion marker, last
    else:
        (directory / MANIFEST).write_text(text)
    return directory


def _file_sizes(directory: Path) -> dict[str, int]:
    """Every file in the folder but the manifest (and a temporary file a killed write left),
    by its path relative to the folder, with its size."""
    sizes = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if name == MANIFEST or (path.name.startswith(".") and ".tmp-" in path.name) or not path.is_file():
            continue
        sizes[name] = path.stat().st_size
    return sizes


def incomplete_reason(directory: str | Path) -> str | None:
    """Why ``directory`` (a folder, or a URI such as ``s3://bucket/prefix``) is not a
    complete checkpoint (see the module docstring); None when it is one."""
    if is_uri(directory):
        return _remote_incomplete_reason(str(directory))
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError) as exc:
        return f"manifest.json is unreadable ({exc})"
    return _missing_files(manifest, lambda name: (Path(directory) / name).stat().st_size)


def _remote_incomplete_reason(uri: str) -> str | None:
    """:func:`incomplete_reason` for a checkpoint in object storage: its manifest read, and
    its objects' sizes listed, through pyarrow's filesystem."""
    import pyarrow.fs

    try:
        text = read_text(join(uri, MANIFEST))
    except OSError as exc:
        return f"manifest.json is unreadable ({str(exc).splitlines()[0] if str(exc) else exc})"
    if text is None:
        return "no manifest.json"
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        return f"manifest.json is unreadable ({exc})"
    fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
    inner = inner.rstrip("/")
    sizes = {info.path[len(inner) + 1:]: info.size
             for info in fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
             if info.type == pyarrow.fs.FileType.File}

    def size(name: str) -> int:
        if name not in sizes:
            raise FileNotFoundError(name)
        return sizes[name]

    return _missing_files(manifest, size)


def _missing_files(manifest: Any, size: Any) -> str | None:
    """Why the files a manifest lists are not all there at their sizes (``size(name)``
    gives one's size, or raises OSError); None when they are."""
    if not isinstance(manifest, dict):
        return "manifest.json is not a JSON object"
    files = manifest.get("files")
    if files is None:  # written before manifests listed their files: cannot tell
        return None
    if not isinstance(files, Mapping):
        return "manifest.json files is not a mapping"
    for name, want in files.items():
        try:
            have = size(name)
        except OSError:
            return f"{name} is missing"
        if have != want:
            return f"{name} has {have} bytes, the manifest says {want}"
    return None


#: Where checkpoints read from object storage are kept on this machine (see fetch_checkpoint).
CACHE_ENV = "TRAINYARD_CACHE_DIR"


def checkpoint_cache() -> Path:
    """The folder :func:`fetch_checkpoint` downloads to: ``$TRAINYARD_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/trainyard`` (``~/.cache/trainyard``), ``checkpoints/`` in it; made
    readable by this user alone (replicas load what it holds)."""
    import os

    base = os.environ.get(CACHE_ENV) or str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "trainyard")
    folder = Path(base).expanduser() / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def fetch_checkpoint(uri: str) -> Path:
    """A local copy of the (complete) checkpoint at ``uri`` (``s3://...``, ``gs://...``),
    downloaded through pyarrow into :func:`checkpoint_cache` unless a copy of the same
    manifest is there already (the stored checkpoint is checked complete either way). The download lands under a temporary name and is renamed
    into place once complete, so concurrent replicas on one node never see a part."""
    import hashlib

    import pyarrow.fs

    from trainyard.runtime.storage import remove_tree, replace_dir, tmp_name

    manifest = read_text(join(uri, MANIFEST))
    if manifest is None:
        raise TrainyardError(f"{uri} is not a trainyard checkpoint (no manifest.json)")
    key = hashlib.sha256(f"{uri.rstrip('/')}\n{manifest}".encode()).hexdigest()[:24]
    reason = incomplete_reason(uri)  # the stored one, even when a copy is cached
    if reason is not None:
        raise TrainyardError(
            f"{uri} is an incomplete checkpoint ({reason}): its writing or copying was "
            "interrupted; use an earlier checkpoint"
        )
    cache = checkpoint_cache()
    folder = cache / key
    if folder.is_dir() and incomplete_reason(folder) is None:
        return folder
    staging = cache / tmp_name(key)
    try:
        pyarrow.fs.copy_files(uri.rstrip("/"), str(staging))
        reason = incomplete_reason(staging)
        if reason is not None:
            raise TrainyardError(f"{uri}: the downloaded copy is incomplete ({reason})")
        if folder.is_dir():  # another process's complete copy, or a broken one: replaced
            if incomplete_reason(folder) is None:
                return folder
            remove_tree(folder)
        try:
            replace_dir(staging, folder)
        except OSError:
            if not (folder.is_dir() and incomplete_reason(folder) is None):
                raise
    finally:
        remove_tree(staging)
    return folder


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` is a checkpoint whose writing (or copying) finished."""
    return incomplete_reason(directory) is None


WEIGHTS, LEGACY_WEIGHTS = "model.safetensors", "model.pt"


def save_weights(model: Any, directory: Path) -> None:
    """The model's weights as safetensors: plain tensors, no pickle, loadable by any
    safetensors reader (tied weights, as BERT's, stored once)."""
    from safetensors.torch import save_model

    save_model(model, str(directory / WEIGHTS))


def load_weights(directory: str | Path, model: Any) -> None:
    """Load a checkpoint's weights into ``model``: safetensors, or a ``model.pt`` state dict
    (checkpoints written before safetensors), read without unpickling code."""
    directory = Path(directory)
    if (directory / WEIGHTS).is_file():
        from safetensors.torch import load_model

        load_model(model, str(directory / WEIGHTS), device="cpu")
        return
    import torch

    model.load_state_dict(torch.load(directory / LEGACY_WEIGHTS, map_location="cpu", weights_only=True))


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
    """Rebuild a model and its processing from a checkpoint folder alone (a local folder,
    or a URI such as ``s3://bucket/.../rank_1``, downloaded first by :func:`fetch_checkpoint`).

    The model plugin is looked up by the name in the manifest, and the model is built
    with the params the manifest records (the full params as trained). The training job
    is not resolved again: its dataset and metric plugins need not be installed.
    ``predictor.config`` is ``job.yaml`` as written.
    """

    if is_uri(directory):  # object storage: a verified local copy (fetch_checkpoint)
        directory = fetch_checkpoint(str(directory))
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise TrainyardError(f"{directory} is not a trainyard checkpoint (no manifest.json)")
    reason = incomplete_reason(directory)
    if reason is not None:
        raise TrainyardError(
            f"{directory} is an incomplete checkpoint ({reason}): its writing or copying was "
            "interrupted; use an earlier checkpoint"
        )
    if registry is None:
        from trainyard.plugins import get_registry

        registry = get_registry()
    manifest = read_manifest(directory)
    fmt = manifest.get("format", 1)
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise TrainyardError(
            f"checkpoint {directory} has format {fmt}, newer than this trainyard reads "
            f"(up to {FORMAT_VERSION}); upgrade trainyard to load it"
        )
    config = OmegaConf.load(directory / "job.yaml")
    spec = registry.get("model", manifest["model"])
    trained_by, installed = manifest.get("model_plugin"), registry.owners.get(("model", manifest["model"]))
    if trained_by and installed and trained_by != installed:
        raise TrainyardError(
            f"checkpoint {directory}: its model {manifest['model']!r} was trained with plugin "
            f"{trained_by!r}, but here that name is plugin {installed!r}'s; install {trained_by!r} "
            "(and disable the other with TRAINYARD_DISABLE_PLUGINS) to load it")
    info = DataInfo.from_dict(json.loads((directory / "data_info.json").read_text()))
    params = _model_params(directory, manifest, config, spec, registry)
    processor = spec.processor(params, info)
    processor.load(directory / "processor")
    model = spec.build(params, info, processor)
    try:
        load_weights(directory, model)
    except RuntimeError as exc:  # torch's and safetensors' "size mismatch", "Missing key(s)"
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise TrainyardError(
            f"checkpoint {directory}: its weights do not fit the model its manifest.json and "
            f"data_info.json describe ({reason[:200]}); were they edited, or copied from another "
            "checkpoint?") from None
    model.to(device).eval()
    return Predictor(model, processor, info, manifest, config, device)


def read_manifest(directory: str | Path) -> dict:
    """A checkpoint's manifest.json, checked for what loading it needs (a mapping naming
    its model plugin)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainyardError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), str):
        raise TrainyardError(f"{path}: names no model plugin (its 'model' key); this is not a manifest "
                             "trainyard wrote")
    return manifest


# ---------------------------------------------------------------------------------------
# Params and the plugin's version in the manifest
# ---------------------------------------------------------------------------------------

def _model_params(
    directory: Path, manifest: dict, config: Any, spec: Any, registry: Any
) -> Any:
    """The model's params: the recorded ones typed by the installed plugin's schema, or
    for a checkpoint that predates them, job.yaml's filled with the current defaults."""
    from trainyard.config import typed_params

    model = manifest["model"]
    plugin = manifest.get("model_plugin") or registry.owners.get(("model", model), "")
    installed = registry.version(plugin)
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


def local_run_dir(storage: str, name: str) -> Path:
    """The folder a run's or a search's own records (config, metrics, trials, history, the
    report) are kept in: ``<storage>/<name>`` for a local storage path; for object storage,
    a local folder (under trainyard's cache, one per storage URI), uploaded to
    ``<storage>/<name>/`` when the run ends. Ray keeps its state and the checkpoints at the
    URI itself."""
    if not is_uri(storage):
        return Path(storage) / name
    import hashlib

    key = hashlib.sha256(storage.rstrip("/").encode()).hexdigest()[:12]
    return checkpoint_cache().parent / "runs" / key / name


def upload_records(run_dir: Path, target: str) -> None:
    """Copy the files of a search's local run folder (not its sub-folders: Tune uploads
    the trials itself) to ``target`` in object storage."""
    import pyarrow.fs

    for path in sorted(run_dir.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            pyarrow.fs.copy_files(str(path), join(target, path.name))


def checkpoint_uri(checkpoint: Any) -> str:
    """A Ray checkpoint's location as trainyard names it: its path for a local one, a URI
    (``s3://bucket/...``) for one in object storage (Ray's ``path`` drops the scheme)."""
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local")
    if kind == "local" or is_uri(checkpoint.path):
        return checkpoint.path
    scheme = "gs" if kind == "gcs" else kind
    return f"{scheme}://{checkpoint.path}"
