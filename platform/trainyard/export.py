"""``trainyard export``: a checkpoint as an ONNX, TorchScript or MLflow pyfunc model.

Whatever ``trainyard deploy`` accepts (a winners folder, a tuning run, a training run or a
checkpoint) is resolved to its checkpoint, rebuilt with
:func:`trainyard.checkpoint.load_predictor`, and written to one output folder:

onnx
    ``model.onnx`` (``torch.onnx.export``, the dynamo exporter; a dynamic batch axis)
torchscript
    ``model.pt`` (``torch.jit.trace``; load with ``torch.jit.load``)

    Both hold the network alone: the model plugin's preprocessing (feature
    standardisation, image normalisation, BERT tokenisation) is not in the graph.
    ``preprocessing.json`` beside the file describes the inputs (names, dtype, shape), the
    outputs (logits and the class names in order) and how to make the inputs from raw
    data (the mean and std as numbers; for text, the tokenizer copied to ``tokenizer/``
    and its max length). The description is checked too: applied to the check examples,
    and to feature rows and images far outside the training data (zeros, the mean plus and
    minus 10 and 1000 stds), it must give the tensors the plugin's processor gives, else
    the processor's own state is copied to ``processor/`` and the description says to use
    the plugin's processor.
mlflow
    an MLflow pyfunc model folder (``MLmodel``; code, not a pickle): its ``load_context``
    rebuilds the predictor from the checkpoint, copied as the artifact ``checkpoint``, and
    its ``predict`` takes raw inputs (a list, an array, a DataFrame) and returns the
    plugin's answers (label, index, scores; or value). trainyard and the model's plugin
    must be installed where it is loaded. No tracking server is involved, and MLflow's
    usage telemetry is off unless ``MLFLOW_DISABLE_TELEMETRY`` says otherwise.

Every export is checked before it is kept: the written artifact is loaded back and run on
examples made from the checkpoint's data description (a batch of another size than the one
exported with, and a batch of one), and its outputs are compared with the predictor's
(logits; for MLflow the answers' scores or values). The largest absolute difference is
reported; above the tolerance the export fails. A model a format cannot take fails with a
:class:`~trainyard.errors.TrainyardError` naming the format, the model and the reason, and
leaves no output folder.

onnx, onnxscript, onnxruntime and mlflow-skinny come with the ``export`` extra
(``pip install 'trainyard[export]'``); they are imported only here, when needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainyard.batches import call_model
from trainyard.errors import TrainyardError

FORMATS = ("onnx", "torchscript", "mlflow")
#: Largest absolute difference between the exported model and the checkpoint's.
TOLERANCE = 1e-4
DESCRIPTION = "preprocessing.json"
#: Examples in the batch the model is exported (traced) with; the check uses other sizes.
EXPORT_BATCH = 3
CHECK_BATCHES = (5, 1)
#: Above this many bytes of weights, ONNX keeps them in a ``model.onnx.data`` file beside
#: (protobuf's 2 GiB limit).
ONNX_INLINE_LIMIT = 1_500_000_000

_EXTRA = "pip install 'trainyard[export]'"
_MODULES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "mlflow": ("mlflow",)}


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote, and how far the written model's outputs were
    from the checkpoint's."""

    format: str
    output: Path          # the output folder
    artifact: Path        # model.onnx, model.pt, or the MLflow model folder (= output)
    checkpoint: Path      # the checkpoint folder exported
    max_abs_diff: float
    examples: int         # examples the check ran
    tolerance: float
    description: Path | None = None  # preprocessing.json (onnx, torchscript)


def default_output(checkpoint: Path, fmt: str) -> Path:
    """``<run>-<format>`` in the working folder (the run's name read from the checkpoint's
    manifest, checked like any name that becomes a folder); ``<run>-rank_N-<format>`` for a
    winner other than the first (``winners/<run>/vK/rank_N``), which shares its run name."""
    import re

    from trainyard.names import check_name
    from trainyard.winners import model_name_for

    name = check_name(model_name_for(checkpoint), f"{checkpoint}: the run name in its manifest (give -o)",
                      error=TrainyardError)
    rank = re.fullmatch(r"rank_(\d+)", Path(checkpoint).name)
    if rank and int(rank.group(1)) != 1:
        name = f"{name}-rank_{int(rank.group(1))}"
    return Path(f"{name}-{fmt}")


def export_checkpoint(
    target: str | Path,
    fmt: str,
    output: str | Path | None = None,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export ``target`` (anything ``trainyard deploy`` takes) to ``fmt`` in ``output``
    (default: ``<run>-<format>``), check it, and return what was written. The output
    folder must not exist or be empty; it appears whole or not at all."""
    from trainyard.checkpoint import load_predictor
    from trainyard.winners import resolve_checkpoint

    if fmt not in FORMATS:
        raise TrainyardError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    _require(fmt)
    checkpoint = resolve_checkpoint(target, "CHECKPOINT")
    out = Path(output) if output is not None else default_output(checkpoint, fmt)
    out = out.expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainyardError(f"{out} already exists and is not an empty folder; remove it or give "
                             "another -o")
    predictor = load_predictor(checkpoint)
    model_name = predictor.manifest.get("model", "?")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's is 0700
        writer = {"onnx": _export_onnx, "torchscript": _export_torchscript, "mlflow": _export_mlflow}[fmt]
        try:
            artifact, diff, examples, described = writer(predictor, checkpoint, staging, tolerance)
        except Exception as exc:  # the format cannot take this model: one line, why
            reason = _one_line(exc, with_type=not isinstance(exc, TrainyardError))
            raise TrainyardError(f"cannot export model {model_name!r} ({checkpoint}) to {fmt}: "
                                 f"{reason}") from None
        if not diff <= tolerance:  # NaN fails too
            raise TrainyardError(
                f"cannot export model {model_name!r} ({checkpoint}) to {fmt}: the exported model's "
                f"outputs differ from the checkpoint's by up to {diff:.3g} (tolerance {tolerance:g})"
            )
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(
        format=fmt,
        output=out,
        artifact=out / artifact.relative_to(staging),
        checkpoint=checkpoint,
        max_abs_diff=diff,
        examples=examples,
        tolerance=tolerance,
        description=out / DESCRIPTION if described else None,
    )


def _require(fmt: str) -> None:
    import importlib.util

    missing = [m for m in _MODULES.get(fmt, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise TrainyardError(f"exporting to {fmt} needs {', '.join(missing)}: {_EXTRA}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(exc: BaseException, with_type: bool = True, last: bool = False) -> str:
    """An exception as one short line: the type and the first (or last) line of the message
    of its root cause (an exporter's own error wraps the one that says why)."""
    while exc.__cause__ is not None and not isinstance(exc, TrainyardError):
        exc = exc.__cause__
    lines = [" ".join(_ANSI.sub("", line).split()) for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    text = (lines[-1] if last else lines[0]) if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    if not with_type and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, warnings and logs, C++'s included (the
    round-trip check decides whether an export is good)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
        except OSError:  # no such descriptors (an embedding host): Python's streams only
            pass
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                yield
        finally:
            for stream in (sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


# ---------------------------------------------------------------------------------------
# Check examples, made from the checkpoint's description of its data
# ---------------------------------------------------------------------------------------

def sample_inputs(predictor: Any, n: int, seed: int = 0) -> Any:
    """``n`` raw inputs of the kind the checkpoint's model takes: feature rows and images
    drawn around the processor's mean and std (where it has them), texts of the
    tokenizer's words (some longer than the max length)."""
    import numpy as np

    info = predictor.info
    rng = np.random.default_rng(seed)
    state = getattr(predictor.processor, "state", None) or {}
    if info.inputs == "text":
        words = _vocabulary_words(predictor.processor)
        limit = int(getattr(predictor.processor.params, "max_length", 16) or 16)
        lengths = [1, 3, 7, 2 * limit, 4, 12, 2, 5]
        texts = ["The food was wonderful."]
        for i in range(n - 1):
            count = lengths[i % len(lengths)]
            texts.append(" ".join(rng.choice(words, size=count)) + rng.choice([".", "!", ""]))
        return texts[:n]
    shape = [int(s) for s in info.input_shape]
    mean, std = _mean_std(state, shape[0] if shape else 0)
    if info.inputs == "image":
        c = shape[0]
        m = np.zeros(c) if mean is None else mean
        s = np.ones(c) if std is None else std
        x = rng.normal(size=(n, *shape)) * s[None, :, None, None] + m[None, :, None, None]
        return x.astype(np.float32)
    m = np.zeros(shape) if mean is None else mean
    s = np.ones(shape) if std is None else std
    return (rng.normal(size=(n, *shape)) * s + m).astype(np.float32).tolist()


def outlying_inputs(predictor: Any) -> Any:
    """Raw inputs far outside the training data, where a step that leaves the examples
    :func:`sample_inputs` draws unchanged (a clip, a squashing) shows: for feature rows and
    images, zeros and the mean plus and minus 10 and 1000 stds (where the processor has
    them; else 0 +/- 10 and 1000); None for text."""
    import numpy as np

    info = predictor.info
    if info.inputs == "text":
        return None
    state = getattr(predictor.processor, "state", None) or {}
    shape = [int(s) for s in info.input_shape]
    mean, std = _mean_std(state, shape[0] if shape else 0)
    width = shape[0] if shape else 1
    m = np.zeros(width) if mean is None else mean
    s = np.ones(width) if std is None else std
    rows = np.stack([np.zeros(width)] + [m + k * s for k in (10, -10, 1000, -1000)])
    if info.inputs == "image":
        return np.broadcast_to(rows[:, :, None, None], (len(rows), *shape)).astype(np.float32)
    return rows.reshape(len(rows), *shape).astype(np.float32).tolist()


def _mean_std(state: dict, width: int):
    import numpy as np

    mean, std = state.get("mean"), state.get("std")
    if (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == width
            and all(isinstance(v, (int, float)) for v in mean + std)):
        return np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return None, None


def _vocabulary_words(processor: Any) -> list[str]:
    tokenizer = getattr(processor, "tokenizer", None)
    words: list[str] = []
    if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 1)[:5000]
    return words or "the food was good bad service film great awful slow kind".split()


# ---------------------------------------------------------------------------------------
# ONNX and TorchScript: the network alone, with preprocessing.json beside it
# ---------------------------------------------------------------------------------------

def _to_numpy(batch: Any) -> dict:
    if isinstance(batch, dict):
        return {k: v.detach().cpu().numpy() for k, v in batch.items()}
    return {"input": batch.detach().cpu().numpy()}


def _check_batches(predictor: Any) -> list[tuple[Any, Any, Any]]:
    """(raw, encoded batch, the predictor's outputs) for each check batch."""
    cases = []
    for i, n in enumerate(CHECK_BATCHES):
        raw = sample_inputs(predictor, n, seed=100 + i)
        cases.append((raw, predictor.processor.encode(raw), predictor.forward(raw)))
    return cases


def _on_batch(n: int, call: Any) -> Any:
    """``call()``, the exported model run on a check batch of ``n``; its failure as one line."""
    try:
        return call()
    except TrainyardError:
        raise
    except Exception as exc:
        raise TrainyardError(
            f"the exported model fails on a batch of {n} (it was exported with a batch of "
            f"{EXPORT_BATCH}), so the graph holds more than the model's tensor operations: "
            f"{_one_line(exc, with_type=False, last=True)}"
        ) from None


def _max_diff(got: Any, expected: Any) -> float:
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        raise TrainyardError(f"the exported model's output has shape {list(got.shape)}, the "
                             f"checkpoint's {list(expected.shape)}")
    return float(np.max(np.abs(got - expected))) if got.size else 0.0


def _export_onnx(predictor, checkpoint, folder: Path, tolerance: float):
    import onnxruntime
    import torch

    model = predictor.model.eval()
    batch = predictor.processor.encode(sample_inputs(predictor, EXPORT_BATCH))
    names = list(batch) if isinstance(batch, dict) else ["input"]
    output = _output_name(predictor.info)
    batch_dim = torch.export.Dim("batch")
    if isinstance(batch, dict):
        args, kwargs = (), dict(batch)
        dynamic = {k: {0: batch_dim} for k in batch}
    else:
        args, kwargs = (batch,), None
        dynamic = ({0: batch_dim},)
    path = folder / "model.onnx"
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, args, str(path), kwargs=kwargs, input_names=names,
                              output_names=[output], dynamic_shapes=dynamic, dynamo=True,
                              external_data=size > ONNX_INLINE_LIMIT, verbose=False)
    except Exception as exc:
        raise TrainyardError(f"torch.onnx.export failed: {_one_line(exc)}") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff, count = 0.0, 0
    for raw, encoded, expected in _check_batches(predictor):
        feeds = _to_numpy(encoded)
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        got = _on_batch(len(raw), lambda: session.run([output], feeds)[0])
        diff = max(diff, _max_diff(got, expected.cpu().numpy()))
        count += len(raw)
    inputs = [{"name": k, "dtype": str(v.dtype), "shape": ["batch", *v.shape[1:]]}
              for k, v in _to_numpy(batch).items()]
    _describe(predictor, checkpoint, folder, "onnx", path.name, inputs, output, diff, count,
              tolerance, {"onnxruntime": "onnxruntime.InferenceSession('model.onnx')"
                          f".run(['{output}'], inputs)[0]"})
    return path, diff, count, True


def _export_torchscript(predictor, checkpoint, folder: Path, tolerance: float):
    import torch

    model = predictor.model.eval()
    batch = predictor.processor.encode(sample_inputs(predictor, EXPORT_BATCH))
    path = folder / "model.pt"
    try:
        with _quiet(), torch.no_grad():
            if isinstance(batch, dict):
                traced = torch.jit.trace(model, example_kwarg_inputs=dict(batch), check_trace=False)
            else:
                traced = torch.jit.trace(model, batch, check_trace=False)
    except Exception as exc:
        raise TrainyardError(f"torch.jit.trace failed: {_one_line(exc)}") from None
    with _quiet():
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    diff, count = 0.0, 0
    for raw, encoded, expected in _check_batches(predictor):
        with _quiet(), torch.no_grad():
            got = _on_batch(len(raw), lambda: call_model(loaded, encoded))
        if not isinstance(got, torch.Tensor):
            raise TrainyardError(f"the traced model returns {type(got).__name__}, not a tensor")
        diff = max(diff, _max_diff(got.cpu().numpy(), expected.cpu().numpy()))
        count += len(raw)
    inputs = [{"name": k, "dtype": str(v.dtype), "shape": ["batch", *v.shape[1:]]}
              for k, v in _to_numpy(batch).items()]
    call = ("torch.jit.load('model.pt')(**inputs)" if isinstance(batch, dict)
            else "torch.jit.load('model.pt')(torch.from_numpy(inputs['input']))")
    _describe(predictor, checkpoint, folder, "torchscript", path.name, inputs,
              _output_name(predictor.info), diff, count, tolerance, {"torch": call})
    return path, diff, count, True


def _output_name(info: Any) -> str:
    return "logits" if info.task == "classification" else "outputs"


def _describe(predictor, checkpoint: Path, folder: Path, fmt: str, file: str, inputs: list,
              output: str, diff: float, count: int, tolerance: float, usage: dict) -> None:
    """Write ``preprocessing.json`` (and what it refers to: ``tokenizer/`` or
    ``processor/``) into ``folder``."""
    info, manifest = predictor.info, predictor.manifest
    if info.task == "classification":
        outputs = [{"name": output, "dtype": "float32", "shape": ["batch", len(info.classes)],
                    "meaning": "logits, one per class; softmax over the last axis gives the "
                               "class probabilities, class i is classes[i]",
                    "classes": list(info.classes)}]
    else:
        width = max(1, len(info.target_names))
        outputs = [{"name": output, "dtype": "float32", "shape": ["batch", width],
                    "meaning": "the predicted values, one per target",
                    "targets": list(info.target_names)}]
    preprocessing = _verified_preprocessing(predictor, checkpoint, folder,
                                            [n["name"] for n in inputs])
    description = {
        "format": fmt,
        "file": file,
        "usage": usage,
        "model": manifest.get("model"),
        "model_plugin": manifest.get("model_plugin"),
        "model_plugin_version": manifest.get("model_plugin_version"),
        "trainyard_version": manifest.get("trainyard_version"),
        "checkpoint": str(checkpoint),
        "task": info.task,
        "raw_inputs": {"kind": info.inputs, "shape": list(info.input_shape),
                       "feature_names": list(info.feature_names)},
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": preprocessing,
        "check": {"max_abs_diff": diff, "tolerance": tolerance, "examples": count,
                  "against": "trainyard.checkpoint.load_predictor(checkpoint).forward(raw)"},
    }
    (folder / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")


def _verified_preprocessing(predictor, checkpoint: Path, folder: Path, names: list[str]) -> dict:
    """How to make the inputs from raw data, checked against the processor on the check
    examples and on inputs far outside the training data (:func:`outlying_inputs`: the
    check examples are drawn around the processor's mean and std, where a clip never
    fires); the plugin's own processor (its state copied beside) where no plain description
    reproduces it."""
    import numpy as np

    described = None
    with contextlib.suppress(Exception):
        described = _plain_preprocessing(predictor, folder, names)
    if described is not None:
        try:
            raws = [sample_inputs(predictor, n, seed=100 + i) for i, n in enumerate(CHECK_BATCHES)]
            outlying = outlying_inputs(predictor)
            for raw in raws if outlying is None else [*raws, outlying]:
                want = _to_numpy(predictor.processor.encode(raw))
                got = apply_preprocessing(described, folder, raw)
                if set(got) != set(want) or any(
                        got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
                        or not np.allclose(got[k], want[k], rtol=1e-6, atol=1e-5) for k in want):
                    raise ValueError("differs")
            described["verified"] = True
            return described
        except Exception:
            shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    processor = predictor.processor
    shutil.copytree(checkpoint / "processor", folder / "processor")
    return {
        "kind": "plugin",
        "steps": [
            f"the model plugin's own processor makes the inputs: build "
            f"{type(processor).__module__}.{type(processor).__qualname__}(params, info), call "
            "its load('processor') (its state, copied beside this file) and encode(raw); or "
            "use trainyard.checkpoint.load_predictor(checkpoint).processor.encode(raw)"
        ],
        "verified": False,
    }


def _plain_preprocessing(predictor, folder: Path, names: list[str]) -> dict | None:
    """A plain description of the built-in processors' steps, or None."""
    info, processor = predictor.info, predictor.processor
    state = getattr(processor, "state", None) or {}
    shape = [int(s) for s in info.input_shape]
    if info.inputs == "text":
        tokenizer = getattr(processor, "tokenizer", None)
        max_length = getattr(processor.params, "max_length", None)
        if tokenizer is None or not isinstance(max_length, int):
            return None
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        return {
            "kind": "text",
            "inputs": list(names),
            "tokenizer": "tokenizer",
            "max_length": max_length,
            "padding": "max_length",
            "truncation": True,
            "steps": [
                "tokenize the list of strings with the Hugging Face tokenizer in tokenizer/ "
                f"(padded and truncated to max_length {max_length}); the inputs are its "
                + " and ".join(names) + " as int64",
                "python: tok = transformers.AutoTokenizer.from_pretrained('tokenizer'); "
                f"enc = tok(texts, padding='max_length', truncation=True, max_length={max_length}, "
                "return_tensors='np'); inputs = {"
                + ", ".join(f"'{n}': enc['{n}'].astype('int64')" for n in names) + "}",
            ],
        }
    if len(names) != 1:
        return None
    mean, std = _mean_std(state, shape[0] if shape else 0)
    if info.inputs == "image" and len(shape) == 3:
        if mean is None:
            return None
        return {
            "kind": "image", "layout": "NCHW", "shape": shape,
            "mean": mean.tolist(), "std": std.tolist(),
            "steps": [
                f"images as float32 [N, {shape[0]}, {shape[1]}, {shape[2]}] ("
                + ("[N, H, W] gets a channel axis, " if shape[0] == 1 else "")
                + "pixel values as in the training data)",
                f"{names[0]} = (x - mean[c]) / std[c] per channel c, in float32",
            ],
        }
    if info.inputs == "features" and len(shape) == 1:
        if not state:
            return {"kind": "features", "standardize": False, "width": shape[0],
                    "steps": [f"{names[0]} = the rows as float32 [N, {shape[0]}], unchanged"]}
        if mean is None:
            return None
        return {
            "kind": "features", "standardize": True, "width": shape[0],
            "feature_names": list(info.feature_names),
            "mean": mean.tolist(), "std": std.tolist(),
            "steps": [f"{names[0]} = (row - mean) / std per feature, as float32 [N, {shape[0]}]"],
        }
    return None


def apply_preprocessing(described: dict, folder: str | Path, raw: Any) -> dict:
    """Make an exported model's inputs from raw data, following its ``preprocessing.json``
    section (``described``) alone: what a user of the exported file does. Returns the
    inputs by name, as numpy arrays."""
    import numpy as np

    kind = described.get("kind")
    if kind == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(Path(folder, described["tokenizer"])))
        enc = tokenizer(list(raw), padding="max_length", truncation=True,
                        max_length=described["max_length"], return_tensors="np")
        names = described.get("inputs") or ["input_ids", "attention_mask"]
        return {k: np.asarray(enc[k]).astype(np.int64) for k in names}
    if kind == "image":
        x = np.asarray(raw, dtype=np.float32)
        if x.ndim == 3 and described["shape"][0] == 1:
            x = x[:, None]
        mean = np.asarray(described["mean"], np.float32)[None, :, None, None]
        std = np.asarray(described["std"], np.float32)[None, :, None, None]
        return {"input": np.ascontiguousarray((x - mean) / std, dtype=np.float32)}
    if kind == "features":
        x = np.asarray(raw, dtype=np.float32)
        if described.get("standardize"):
            x = (x - np.asarray(described["mean"], np.float32)) / np.asarray(described["std"], np.float32)
        return {"input": np.ascontiguousarray(x, dtype=np.float32)}
    raise TrainyardError(f"preprocessing of kind {kind!r} has no plain description: use the "
                         "model plugin's processor")


# ---------------------------------------------------------------------------------------
# MLflow pyfunc: the whole predictor, raw inputs in, answers out
# ---------------------------------------------------------------------------------------

_PYFUNC_CODE = '''\
"""An MLflow pyfunc model wrapping a trainyard checkpoint (the artifact "checkpoint") with
its model plugin's own pre- and post-processing. Written by `trainyard export --format
mlflow`; needs trainyard and the model's plugin installed where it is loaded."""

from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


class TrainyardModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainyard.checkpoint import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        """Raw inputs (feature rows, image arrays or strings: a list, an array, a
        DataFrame) to one answer each: label, index and scores, or value."""
        from trainyard.export import raw_inputs

        return self.predictor.predict(raw_inputs(model_input, self.predictor.info))


set_model(TrainyardModel())
'''


def raw_inputs(model_input: Any, info: Any) -> Any:
    """What an MLflow pyfunc ``predict`` receives, as the raw inputs a trainyard processor
    takes: a list of rows, images or strings; a numpy array; a pandas DataFrame (feature
    columns, by ``info.feature_names`` where it has them all; or one column of strings,
    rows or images); a pandas Series; one string; or ``{"inputs": [...]}``."""
    import numpy as np

    if isinstance(model_input, dict) and "inputs" in model_input:
        model_input = model_input["inputs"]
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns") and hasattr(model_input, "to_numpy"):  # a DataFrame
        columns = [str(c) for c in model_input.columns]
        if info.inputs == "features" and info.feature_names and set(info.feature_names) <= set(columns):
            return model_input[list(info.feature_names)].to_numpy(dtype=np.float32)
        if len(columns) == 1:
            model_input = model_input.iloc[:, 0]
        elif info.inputs == "features":
            return model_input.to_numpy(dtype=np.float32)
        else:
            raise TrainyardError(f"a DataFrame of {info.inputs} inputs needs one column, "
                                 f"got {len(columns)}")
    if hasattr(model_input, "tolist") and hasattr(model_input, "index"):  # a Series
        model_input = model_input.tolist()
    if info.inputs == "text":
        if isinstance(model_input, np.ndarray):
            model_input = model_input.reshape(-1).tolist()
        return [str(t) for t in model_input]
    if info.inputs == "image" and isinstance(model_input, list):
        return np.stack([np.asarray(x, dtype=np.float32) for x in model_input])
    return model_input


def _export_mlflow(predictor, checkpoint: Path, folder: Path, tolerance: float):
    # Saving and loading a model locally needs no server; nor does it send MLflow's usage
    # telemetry unless the user asks for it (MLFLOW_DISABLE_TELEMETRY=false).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow.pyfunc

    import trainyard

    target = folder / "model"
    with tempfile.TemporaryDirectory() as scratch:
        code = Path(scratch) / "trainyard_pyfunc.py"
        code.write_text(_PYFUNC_CODE)
        requirements = [f"trainyard=={trainyard.__version__}"]
        plugin = _plugin_requirement(predictor.manifest)
        if plugin:
            requirements.append(plugin)
        with _quiet():
            mlflow.pyfunc.save_model(
                path=str(target),
                python_model=str(code),
                artifacts={"checkpoint": str(checkpoint)},
                pip_requirements=requirements,
                metadata={"trainyard_run": predictor.manifest.get("run"),
                          "trainyard_model": predictor.manifest.get("model"),
                          "trainyard_task": predictor.info.task,
                          "classes": list(predictor.info.classes)},
            )
    # The MLflow model is the output folder itself.
    for item in target.iterdir():
        os.replace(item, folder / item.name)
    target.rmdir()
    with _quiet():
        loaded = mlflow.pyfunc.load_model(str(folder))
    diff, count = 0.0, 0
    for i, n in enumerate(CHECK_BATCHES):
        raw = sample_inputs(predictor, n, seed=100 + i)
        expected = predictor.predict(raw)
        with _quiet():
            got = loaded.predict(_as_list(raw))
        diff = max(diff, answers_diff(got, expected))
        count += len(raw)
    return folder, diff, count, False


def _as_list(raw: Any) -> Any:
    return raw.tolist() if hasattr(raw, "tolist") else list(raw)


def answers_diff(got: Any, expected: list[dict]) -> float:
    """Largest absolute difference between two lists of answers' scores (or values); a
    different label or length is a TrainyardError."""
    import numpy as np

    got = list(got)
    if len(got) != len(expected):
        raise TrainyardError(f"the exported model gave {len(got)} answers for {len(expected)} inputs")
    diff = 0.0
    for a, b in zip(got, expected):
        if "scores" in b:
            if a.get("label") != b["label"]:
                raise TrainyardError(f"the exported model answers {a.get('label')!r} where the "
                                     f"checkpoint answers {b['label']!r}")
            x = [a["scores"][k] for k in b["scores"]]
            y = list(b["scores"].values())
        else:
            x, y = np.ravel(a["value"]), np.ravel(b["value"])
        diff = max(diff, float(np.max(np.abs(np.asarray(x, float) - np.asarray(y, float)))))
    return diff


def _plugin_requirement(manifest: dict) -> str | None:
    """The distribution of a third-party model plugin, pinned to the version it was
    trained with; None for a built-in one."""
    try:
        from trainyard.plugins import get_registry

        registry = get_registry()
        name = manifest.get("model_plugin") or registry.owner("model", manifest["model"])
        for info in registry.plugins:
            if info.name == name and not info.builtin and info.distribution \
                    and not info.distribution.startswith("("):
                version = manifest.get("model_plugin_version") or info.version
                return f"{info.distribution}=={version}" if version and version != "?" \
                    else info.distribution
    except Exception:
        pass
    return None
