"""The example third-party plugin (examples/trainyard-example-plugin), installed as its own
distribution: listed, found through its entry point, trained, tuned and served on the real
Ray, and gone from an environment that does not have it installed.

.ci/bootstrap.py installs it (``pip install -e examples/trainyard-example-plugin``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from trainyard import plugins
from trainyard.checkpoint import load_predictor
from trainyard.config import load_config

from tests.conftest import ROOT, remove_applications

EXAMPLE = ROOT / "examples" / "trainyard-example-plugin"
CONFIG = EXAMPLE / "configs" / "wine_resmlp.yaml"
DIST, PLUGIN, MODULE = "trainyard-example-plugin", "example", "trainyard_example.plugin"
WINE_CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module", autouse=True)
def example_installed():
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed; run python3 .ci/bootstrap.py "
                    "(or pip install -e examples/trainyard-example-plugin)")


def _trainyard(*args: str, python: list[str] | None = None, cwd: Path | None = None):
    """Run the real CLI in a fresh process (wide, so table cells are not cut)."""
    command = python or [sys.executable, "-m", "trainyard.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=cwd, env={**os.environ, "COLUMNS": "250"})


def _row(output: str, plugin: str) -> str | None:
    rows = [line for line in output.splitlines() if line.startswith(f"│ {plugin} ")]
    return rows[0] if rows else None


# --------------------------------------------------------------------------------------
# Installed: listed and discovered through its entry point
# --------------------------------------------------------------------------------------


def test_installed_example_is_listed_by_trainyard_plugins_with_its_distribution_and_version():
    out = _trainyard("plugins")
    assert out.returncode == 0, out.stderr
    row = _row(out.stdout, PLUGIN)
    assert row is not None, out.stdout
    for shown in (DIST, "0.1.0", "resmlp", "wine", "balanced_accuracy"):
        assert shown in row, (shown, row)
    assert "failed" not in out.stdout


def test_example_is_discovered_through_its_installed_entry_point_not_registered_by_hand():
    (ep,) = [ep for ep in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)
             if ep.name == PLUGIN]
    assert (ep.value, ep.dist.metadata["Name"]) == (MODULE, DIST)

    registry = plugins.get_registry()
    info = next(p for p in registry.plugins if p.name == PLUGIN)
    # register_plugin would record "(registered in process)" and no version.
    assert (info.distribution, info.version, info.module, info.builtin) == (DIST, "0.1.0", MODULE, False)
    assert Path(info.location).resolve() == EXAMPLE / "trainyard_example" / "plugin.py"
    assert plugins.get_plugin_manager().get_plugin(PLUGIN) is sys.modules[MODULE]
    assert info.provides == {"model": ["resmlp"], "dataset": ["wine", "spirals"], "metric": ["balanced_accuracy"]}


# --------------------------------------------------------------------------------------
# Trained, tuned and served on the real Ray
# --------------------------------------------------------------------------------------


def test_train_job_with_the_example_model_dataset_and_metric_runs_on_ray(ray_cluster, tmp_path):
    from trainyard.train.driver import run_training

    cfg = load_config(CONFIG, [f"storage_path={tmp_path}", "name=wine_train", "train.epochs=2"])
    result = run_training(cfg)

    assert [row["epoch"] for row in result.history] == [0, 1]
    final = result.history[-1]
    assert {"val_balanced_accuracy", "val_accuracy", "val_loss"} <= set(final)
    assert final["val_balanced_accuracy"] > 0.6, result.history  # chance: 0.33
    predictor = load_predictor(result.checkpoint)
    assert predictor.manifest["model"] == "resmlp" and predictor.manifest["model_plugin"] == PLUGIN
    assert predictor.info.classes == WINE_CLASSES


@pytest.fixture(scope="module")
def tuned(ray_cluster, tmp_path_factory):
    from trainyard.tune.driver import run_tuning

    root = tmp_path_factory.mktemp("example_tune")
    cfg = load_config(CONFIG, [f"storage_path={root / 'runs'}", f"tune.registry={root / 'winners'}",
                               "train.epochs=2", "tune.num_samples=2", "tune.scheduler=none"])
    return run_tuning(cfg)


def test_a_tiny_tune_search_with_the_example_exports_a_winner(tuned):
    assert [t["state"] for t in tuned.trials] == ["TERMINATED", "TERMINATED"]
    assert tuned.metric == "val_balanced_accuracy" and tuned.mode == "max"
    assert {"train.lr", "model.params.width", "model.params.dropout"} == set(tuned.trials[0]["params"])
    (winner,) = tuned.winners
    assert winner["value"] == max(t["best"] for t in tuned.trials)
    assert load_predictor(winner["path"]).manifest["model_plugin"] == PLUGIN


@pytest.fixture(scope="module")
def served(tuned, serve_port):
    """The winner served by trainyard's own deploy, on the session's Serve (one per Ray
    cluster); removed when the module is done."""
    from trainyard.serve.deploy import deploy
    from trainyard.serve.config import load_serve_config

    port = serve_port
    cfg = load_serve_config(base={"port": port, "models": [
        {"winner": tuned.winners[0]["path"], "name": "wine", "num_cpus": 0.1}]})
    endpoints = deploy(cfg)
    yield endpoints["wine"], tuned.winners[0]["path"]
    remove_applications()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def test_the_tuned_winner_deploys_and_answers_over_http(served):
    from sklearn.datasets import load_wine

    url, winner = served
    rows = load_wine().data[[0, 70, 150]].astype(float)  # one of each cultivar
    expected = load_predictor(winner).predict(rows)

    status, body = _post(url + "/predict", {"inputs": rows.tolist()})
    assert status == 200, body
    assert [p["label"] for p in body["predictions"]] == [e["label"] for e in expected]
    assert all(set(p["scores"]) == set(WINE_CLASSES) for p in body["predictions"])

    oip = {"inputs": [{"name": "input-0", "shape": [3, 13], "datatype": "FP32",
                       "data": rows.reshape(-1).tolist()}]}
    status, body = _post(url + "/infer", oip)
    assert status == 200, body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == [e["label"] for e in expected]
    probs = np.asarray(outputs["probabilities"]["data"]).reshape(3, 3)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)


# --------------------------------------------------------------------------------------
# Uninstalled, it is gone
# --------------------------------------------------------------------------------------


def _site_packages_view(dest: Path, hide: str | None) -> Path:
    """A view of this environment's site-packages (symlinks to every entry), without the
    files that pip installed for the distribution ``hide``: as if it were uninstalled,
    while the shared environment itself is left alone."""
    dist = importlib.metadata.distribution(DIST)
    site = Path(dist.locate_file("")).resolve()
    hidden: set[str] = set()
    if hide is not None:
        hidden = {Path(str(f)).parts[0] for f in importlib.metadata.distribution(hide).files or []}
        assert any(name.endswith(".dist-info") for name in hidden), hidden
    dest.mkdir()
    for entry in site.iterdir():
        if entry.name not in hidden:
            (dest / entry.name).symlink_to(entry)
    return dest


def _python_over(view: Path) -> list[str]:
    """This Python without its own site-packages, with ``view`` as the site dir instead
    (.pth files, trainyard's editable install among them, processed as usual)."""
    code = ("import site, sys; site.addsitedir(sys.argv.pop(1)); "
            "from trainyard.cli import main; sys.argv[0] = 'trainyard'; main()")
    return [sys.executable, "-S", "-c", code, str(view)]


def test_uninstalled_the_example_is_gone_from_plugins_and_its_config_is_refused(tmp_path):
    with_it = _python_over(_site_packages_view(tmp_path / "with", hide=None))
    without = _python_over(_site_packages_view(tmp_path / "without", hide=DIST))

    listed = _trainyard("plugins", python=with_it, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert DIST in (_row(listed.stdout, PLUGIN) or ""), listed.stdout

    gone = _trainyard("plugins", python=without, cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert _row(gone.stdout, PLUGIN) is None and DIST not in gone.stdout
    assert "resmlp" not in gone.stdout and "balanced_accuracy" not in gone.stdout
    assert _row(gone.stdout, "mlp") is not None and "failed" not in gone.stdout  # built-ins stay

    refused = _trainyard("train", str(CONFIG), "--dry-run", python=without, cwd=tmp_path)
    assert refused.returncode == 2
    assert "model.name: no model named 'resmlp' is installed" in refused.stderr
    assert "Traceback" not in refused.stderr
    accepted = _trainyard("train", str(CONFIG), "--dry-run", python=with_it, cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert OmegaConf.create(accepted.stdout).model.name == "resmlp"
