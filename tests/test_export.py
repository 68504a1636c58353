"""`trainyard export`: ONNX, TorchScript and MLflow pyfunc models of real checkpoints.

Each built-in model (MLP on feature rows, CNN on images, a tiny BERT on text) is written as
a checkpoint without Ray, exported to each format, and the exported artifact is then run
here with its own runtime (onnxruntime, torch.jit.load, mlflow.pyfunc.load_model) on real
examples of its dataset, with the inputs made from preprocessing.json alone, and compared
with the checkpoint's predictor. A model a format cannot take fails through the real CLI
with one error line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from trainyard.checkpoint import load_predictor, write_checkpoint
from trainyard.config import load_config, resolve
from trainyard.errors import TrainyardError
from trainyard.export import (
    TOLERANCE,
    answers_diff,
    apply_preprocessing,
    export_checkpoint,
)
from trainyard.train.data import prepare_data, split_validation

from tests.helpers_plugins import make_distribution, plugin_registered, unique

ROOT = Path(__file__).resolve().parent.parent

SMALL_BERT = {"max_length": 16, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
              "intermediate_size": 64}
MODELS = {
    "mlp": ("mlp", "breast_cancer", {"hidden": [16]}),
    "cnn": ("cnn", "digits", {"channels": [4, 8], "hidden": 16}),
    "bert": ("bert", "sentiment", SMALL_BERT),
}
FORMATS = ["onnx", "torchscript", "mlflow"]
#: What the tests measured, printed at the end of the module (pytest -s shows it).
MEASURED: dict[tuple[str, str], float] = {}


def write_run(run_dir: Path, model: str, dataset: str, params: dict, plugin: str | None = None):
    """A training run folder holding one really-built checkpoint (untrained weights, the
    fitted processor), written as training writes it; and 7 real raw examples."""
    job = resolve(load_config(base={
        "name": run_dir.name,
        "model": {"name": model, "params": params},
        "data": {"name": dataset},
    }))
    data = prepare_data(job)
    torch.manual_seed(0)
    net = job.model.build(job.model_params, data.info, data.processor)
    write_checkpoint(run_dir / "checkpoint_000000", job=job, model=net, processor=data.processor,
                     info=data.info, epoch=0, metrics={}, plugin=plugin or job.model.name)
    raw = job.dataset.load(job.data_params, 0)
    val = raw.val if raw.val is not None else split_validation(raw, 0.2, 0)[1]
    inputs = val.inputs[:7]
    if model == "bert":  # one text longer than max_length: truncation
        inputs = list(inputs[:6]) + [" ".join(["a really long and rambling review"] * 8)]
    return run_dir, inputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    return {name: write_run(root / f"{name}_run", *spec) for name, spec in MODELS.items()}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Each (model, format) exported once, lazily: (ExportResult, checkpoint folder, raw)."""
    out = tmp_path_factory.mktemp("exported")
    done = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in done:
            run_dir, raw = runs[name]
            # the run folder, as `trainyard deploy` takes it, resolves to its checkpoint
            result = export_checkpoint(run_dir, fmt, out / f"{name}-{fmt}")
            done[name, fmt] = (result, run_dir / "checkpoint_000000", raw)
        return done[name, fmt]

    yield get
    if MEASURED:
        print("\nmax abs diff, exported model vs checkpoint (measured by tests/test_export.py):")
        for (name, fmt), diff in sorted(MEASURED.items()):
            print(f"  {name:5s} {fmt:12s} {diff:.3g}")


def inputs_from_description(result, raw) -> dict:
    """The exported model's inputs made from raw examples by preprocessing.json alone."""
    described = json.loads(result.description.read_text())
    assert described["preprocessing"]["verified"] is True
    return apply_preprocessing(described["preprocessing"], result.output, raw)


def batches(raw):
    """The examples as a batch of 7 and a batch of 1 (the export used a batch of 3)."""
    return [raw, raw[:1]]


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runs_in_onnxruntime_like_the_checkpoint(name, exported):
    import onnxruntime

    result, checkpoint, raw = exported(name, "onnx")
    predictor = load_predictor(checkpoint)
    assert result.artifact == result.output / "model.onnx" and result.artifact.is_file()
    described = json.loads(result.description.read_text())
    assert described["outputs"][0]["classes"] == predictor.info.classes
    assert [i["name"] for i in described["inputs"]] == (
        ["input_ids", "attention_mask"] if name == "bert" else ["input"])
    if name == "bert":
        assert (result.output / "tokenizer").is_dir()
        assert described["preprocessing"]["max_length"] == SMALL_BERT["max_length"]
    else:
        assert len(described["preprocessing"]["mean"]) == predictor.info.input_shape[0]
    session = onnxruntime.InferenceSession(str(result.artifact), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic batch axis
    diff = 0.0
    for x in batches(raw):
        feeds = inputs_from_description(result, x)
        got = session.run(["logits"], feeds)[0]
        expected = predictor.forward(x).numpy()
        assert got.shape == expected.shape
        diff = max(diff, float(np.abs(got - expected).max()))
    MEASURED[name, "onnx"] = diff
    assert diff <= TOLERANCE
    assert result.max_abs_diff <= TOLERANCE


@pytest.mark.parametrize("name", list(MODELS))
def test_torchscript_runs_like_the_checkpoint(name, exported):
    result, checkpoint, raw = exported(name, "torchscript")
    predictor = load_predictor(checkpoint)
    assert result.artifact == result.output / "model.pt"
    model = torch.jit.load(str(result.artifact))
    diff = 0.0
    for x in batches(raw):
        feeds = {k: torch.from_numpy(v) for k, v in inputs_from_description(result, x).items()}
        with torch.no_grad():
            got = model(**feeds) if name == "bert" else model(feeds["input"])
        expected = predictor.forward(x)
        assert got.shape == expected.shape
        diff = max(diff, float((got - expected).abs().max()))
    MEASURED[name, "torchscript"] = diff
    assert diff <= TOLERANCE
    assert result.max_abs_diff <= TOLERANCE


@pytest.mark.parametrize("name", list(MODELS))
def test_mlflow_pyfunc_answers_like_the_checkpoint(name, exported):
    import mlflow.pyfunc
    import pandas as pd

    result, checkpoint, raw = exported(name, "mlflow")
    assert (result.output / "MLmodel").is_file() and result.description is None
    predictor = load_predictor(checkpoint)
    model = mlflow.pyfunc.load_model(str(result.output))
    rows = raw if isinstance(raw, list) else np.asarray(raw).tolist()
    expected = predictor.predict(raw)
    answers = model.predict(rows)
    assert [a["label"] for a in answers] == [a["label"] for a in expected]
    diff = answers_diff(answers, expected)
    # a DataFrame too: named feature columns, or one column of texts or images
    if name == "mlp":
        frame = pd.DataFrame(np.asarray(raw), columns=predictor.info.feature_names)
    else:
        frame = pd.DataFrame({"inputs": list(raw)})
    diff = max(diff, answers_diff(model.predict(frame), expected))
    MEASURED[name, "mlflow"] = diff
    assert diff <= TOLERANCE
    # the checkpoint travels inside the MLflow model
    assert any(p.name == "manifest.json" for p in (result.output / "artifacts").rglob("*"))


def test_output_folder_is_never_overwritten(runs, tmp_path):
    run_dir, _ = runs["mlp"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(TrainyardError, match="already exists"):
        export_checkpoint(run_dir, "torchscript", taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_a_run_name_in_the_manifest_never_leads_the_default_output_out_of_the_folder(runs, tmp_path,
                                                                                   monkeypatch):
    import json
    import shutil

    run_dir, _ = runs["mlp"]
    forged = tmp_path / "forged"
    shutil.copytree(run_dir / "checkpoint_000000", forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    (forged / "manifest.json").write_text(json.dumps({**manifest, "run": "../../escaped"}))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(TrainyardError, match=r"the run name in its manifest.*'\.\./\.\./escaped' is not a valid name"):
        export_checkpoint(forged, "torchscript")
    assert not (tmp_path / "escaped-torchscript").exists() and list(work.iterdir()) == []


def test_the_default_output_of_a_winner_past_the_first_names_its_rank(runs, tmp_path):
    import shutil

    from trainyard.export import default_output

    run_dir, _ = runs["mlp"]
    for rank in ("rank_1", "rank_2"):
        shutil.copytree(run_dir / "checkpoint_000000", tmp_path / "v1" / rank)
    first, second = (default_output(tmp_path / "v1" / r, "onnx") for r in ("rank_1", "rank_2"))
    assert first.name.endswith("-onnx") and "rank" not in first.name
    assert second.name == first.name[:-len("-onnx")] + "-rank_2-onnx"


def test_a_missing_export_extra_is_named(runs, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(TrainyardError, match=r"onnxruntime: pip install 'trainyard\[export\]'"):
        export_checkpoint(runs["mlp"][0], "onnx", tmp_path / "out")


# --------------------------------------------------------------------------------------
# Through the real CLI
# --------------------------------------------------------------------------------------

UNEXPORTABLE = '''
    """A model that computes a per-row scale in Python (tolist, math.tanh): torch.export
    cannot follow it into a graph, and a trace freezes it as a constant of the traced batch."""
    import math

    import numpy as np
    from trainyard import ModelSpec, Processor, hookimpl


    class Rows(Processor):
        def encode(self, inputs):
            import torch

            return torch.as_tensor(np.asarray(inputs, dtype=np.float32))


    def build(params, info, processor):
        import torch

        class LeavesTorch(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(info.input_shape[0], info.num_outputs)

            def forward(self, x):
                scale = torch.tensor([math.tanh(v) for v in x.sum(dim=1).tolist()])
                return self.linear(x) * scale[:, None]

        return LeavesTorch()


    @hookimpl
    def register_models(register):
        register(ModelSpec(name="unexportable", build=build, inputs=["features"], processor=Rows))
'''


def cli(*args: str, pythonpath: Path | None = None, cwd: Path | None = None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRAINYARD_PLUGINS", "TRAINYARD_DISABLE_EXTERNAL_PLUGINS", "TRAINYARD_DEBUG")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "trainyard.cli", "export", *args], env=env, check=False,
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def unexportable(tmp_path_factory):
    """A run of the third-party model above, and the folder its distribution lies in."""
    import importlib

    from trainyard.plugins import get_registry

    get_registry()  # the entry points are read now, before the new distribution is on sys.path
    site = tmp_path_factory.mktemp("site")
    plugin, module_name = unique("unexportable"), unique("unexportable_mod")
    make_distribution(site, unique("trainyard_unexportable"), {plugin: module_name},
                      {module_name: textwrap.dedent(UNEXPORTABLE)})
    sys.path.insert(0, str(site))
    try:
        module = importlib.import_module(module_name)
        with plugin_registered(module, plugin):
            run_dir, _ = write_run(tmp_path_factory.mktemp("runs") / "unexportable_run",
                                   "unexportable", "breast_cancer", {}, plugin=plugin)
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(module_name, None)
    return run_dir, site


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_model_the_format_cannot_take_fails_in_one_line(fmt, unexportable, tmp_path):
    run_dir, site = unexportable
    out = tmp_path / "out"
    proc = cli(str(run_dir), "--format", fmt, "-o", str(out), pythonpath=site)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "cannot export model 'unexportable'" in lines[0] and f"to {fmt}: " in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written left


def test_cli_export_prints_where_and_the_difference(runs, tmp_path):
    run_dir, _ = runs["cnn"]
    proc = cli(str(run_dir), "--format", "torchscript", cwd=tmp_path)  # default -o
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "cnn_run-torchscript"
    assert f"to torchscript: {out / 'model.pt'}" in proc.stdout
    assert f"{out / 'preprocessing.json'}" in proc.stdout
    assert "round-trip check on 6 examples: max abs diff" in proc.stdout
    assert (out / "model.pt").is_file() and (out / "preprocessing.json").is_file()


def test_preprocessing_no_plain_description_reproduces_points_to_the_plugin(runs, tmp_path):
    """A processor whose encoding the plain description does not reproduce: the description
    says to use the plugin's processor, and its state is copied beside the model."""
    from trainyard.export import _verified_preprocessing

    checkpoint = runs["mlp"][0] / "checkpoint_000000"
    predictor = load_predictor(checkpoint)
    plain = predictor.processor.encode
    predictor.processor.encode = lambda raw: plain(raw) * 2  # a step the description lacks
    described = _verified_preprocessing(predictor, checkpoint, tmp_path, ["input"])
    assert described["kind"] == "plugin" and described["verified"] is False
    assert "trainyard_builtins.mlp.FeatureProcessor" in described["steps"][0]
    assert (tmp_path / "processor" / "processor_state.json").is_file()


def test_preprocessing_that_clips_after_standardising_is_not_verified_as_standardize(runs, tmp_path):
    """A third-party processor that standardises and then clips to +/- clip (its state the
    mean and std plus the clip) agrees with the plain standardisation on inputs drawn
    around the training mean, where the clip never fires; on a row far outside them it does
    not, so the description is the plugin's processor, not a verified standardisation."""
    from trainyard.export import _verified_preprocessing, sample_inputs

    checkpoint = runs["mlp"][0] / "checkpoint_000000"
    predictor = load_predictor(checkpoint)
    plain = predictor.processor.encode
    # the built-in standardisation is still verified, far from the training data too
    described = _verified_preprocessing(predictor, checkpoint, tmp_path / "builtin", ["input"])
    assert (described["kind"], described["standardize"], described["verified"]) == ("features", True, True)
    far = [[1000.0, -500.0] + [1000.0] * (predictor.info.input_shape[0] - 2)]
    assert np.array_equal(apply_preprocessing(described, tmp_path / "builtin", far)["input"],
                          plain(far).numpy())

    predictor.processor.state["clip"] = 5.0
    predictor.processor.encode = lambda raw: plain(raw).clamp(-5.0, 5.0)
    around = sample_inputs(predictor, 5, seed=100)  # the clip never fires on these
    assert torch.equal(predictor.processor.encode(around), plain(around))
    described = _verified_preprocessing(predictor, checkpoint, tmp_path / "clipping", ["input"])
    assert described["kind"] == "plugin" and described["verified"] is False
    assert "trainyard_builtins.mlp.FeatureProcessor" in described["steps"][0]
    assert (tmp_path / "clipping" / "processor" / "processor_state.json").is_file()
