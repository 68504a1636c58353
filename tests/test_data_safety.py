"""Data that trainyard reads must not run code or ends the process: CIFAR-10 pickles go
through a restricted unpickler, ``tune --resume`` refuses a run folder someone else could
have written, the HTML report escapes everything it takes from a run, and a plugin calling
``sys.exit`` is reported like any other plugin failure.

Real files, real chmod/chown and real subprocesses; no mocks, and no Ray is started.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from trainyard import MetricSpec, hookimpl, plugins
from trainyard.config import typed_params
from trainyard.errors import ConfigError, PluginError
from trainyard.tune.driver import TRUST_RUN_DIR_ENV, _find_run, check_run_dir_trusted, run_tuning
from trainyard.ui.report import write_report
from trainyard_builtins.images import RestrictedUnpickler, UnsafePickleError, load_cifar_pickle

from tests.helpers_plugins import make_distribution, plugin_registered, registry_snapshot, unique

ROOT = Path(__file__).resolve().parents[1]
TRAINYARD = str(Path(sys.executable).with_name("trainyard"))
NOBODY = 65534
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="giving a file to another user needs root")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``trainyard`` command, with none of the switches this tests set."""
    full_env = dict(os.environ)
    for switch in (TRUST_RUN_DIR_ENV, "TRAINYARD_DISABLE_EXTERNAL_PLUGINS", "TRAINYARD_PLUGINS",
                   "TRAINYARD_DISABLE_PLUGINS"):
        full_env.pop(switch, None)
    full_env.update(env or {})
    return subprocess.run([TRAINYARD, *args], capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=300, check=False)


# --------------------------------------------------------------------------------------
# 1. CIFAR-10 batches: a restricted unpickler
# --------------------------------------------------------------------------------------


def _load_cifar(path: Path, **params):
    spec = plugins.get_registry().get("dataset", "cifar10")
    return spec.load(typed_params(spec.params, {"path": str(path), **params}, "data.params"), 0)


def _write_batches(folder: Path, protocol: int, n=(3, 2), seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, count in zip(["data_batch_1", "test_batch"], n):
        entry = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, count)],
            b"filenames": [f"img_{i}.png".encode() for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
        written[name] = entry
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return written


class SystemPayload:
    """Unpickling this runs ``os.system('touch MARKER')``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalPayload:
    """Unpickling this runs ``builtins.eval(...)``, which creates MARKER."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_written_by_numpy_load_through_the_restricted_unpickler(tmp_path, protocol):
    written = _write_batches(tmp_path, protocol)
    data = _load_cifar(tmp_path)
    assert data.info.classes == [f"c{i}" for i in range(10)]
    assert data.train.inputs.shape == (3, 3, 32, 32) and data.train.inputs.dtype == np.float32
    row = written["data_batch_1"][b"data"][1]
    assert data.train.inputs[1, 2, 31, 31] == pytest.approx(row[3071] / 255.0)
    np.testing.assert_array_equal(data.train.targets, written["data_batch_1"][b"labels"])
    np.testing.assert_array_equal(data.val.targets, written["test_batch"][b"labels"])
    # the reader itself: the dict comes back whole, numpy labels included
    entry = {b"data": np.arange(6, dtype=np.uint8), b"labels": [np.int64(3), 4], "extra": {1.5, 2}}
    (tmp_path / "one").write_bytes(pickle.dumps(entry, protocol=protocol))
    back = load_cifar_pickle(tmp_path / "one")
    np.testing.assert_array_equal(back[b"data"], entry[b"data"])
    assert back[b"labels"] == [3, 4] and back[b"extra"] == {1.5, 2}


@pytest.mark.parametrize("payload, refused", [(SystemPayload, "system"), (EvalPayload, "builtins.eval")],
                         ids=["os.system", "builtins.eval"])
@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta", "nested"])
def test_malicious_cifar_pickle_is_refused_naming_file_and_global_and_never_runs(
    tmp_path, payload, refused, where
):
    folder = tmp_path / "cifar"
    _write_batches(folder, protocol=2)
    marker = tmp_path / "pwned"
    evil = payload(marker)
    if where == "nested":  # hidden inside an otherwise valid batch
        obj = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"filenames": [evil]}
        target = folder / "data_batch_1"
    else:
        obj = {b"label_names": evil} if where == "batches.meta" else evil
        target = folder / where
    target.write_bytes(pickle.dumps(obj, protocol=2))

    # the payload is live: plain pickle would run it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload(control), protocol=2))
    assert control.exists()

    with pytest.raises(UnsafePickleError) as caught:
        _load_cifar(folder)
    message = str(caught.value)
    assert str(target) in message and refused in message and "refusing" in message
    assert isinstance(caught.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_restricted_unpickler_refuses_every_global_a_batch_does_not_need(tmp_path):
    path = tmp_path / "batch"
    for obj in (getattr, __import__("subprocess").Popen, np.load, Path):
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with open(path, "rb") as f, pytest.raises(UnsafePickleError, match=str(path)):
            RestrictedUnpickler(f, path, encoding="bytes").load()


def test_cifar_pickle_that_is_not_a_batch_is_a_clear_error(tmp_path):
    _write_batches(tmp_path, protocol=2)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="data_batch_1.*not a CIFAR-10 python pickle"):
        _load_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ValueError, match=r"data_batch_1.*missing \['labels'\]"):
        _load_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_1.*not a CIFAR-10 python pickle"):
        _load_cifar(tmp_path)


# --------------------------------------------------------------------------------------
# 2. tune --resume: only a run folder that is yours alone
# --------------------------------------------------------------------------------------


def _run_folder(root: Path) -> Path:
    """A run folder laid out as Tune and trainyard leave it (mode 755/644)."""
    run = root / "runs" / "tune_safe"
    trial = run / "abc12_00000"
    trial.mkdir(parents=True)
    (run / "trainyard_tune.yaml").write_text((ROOT / "configs" / "tune_mlp.yaml").read_text())
    (run / "tuner.pkl").write_bytes(pickle.dumps({"state": 1}))
    (run / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    (trial / "params.pkl").write_bytes(pickle.dumps({"train.lr": 0.01}))
    (trial / "result.json").write_text("{}")
    for path in (run.parent, run, trial):
        path.chmod(0o755)
    for path in (run / "trainyard_tune.yaml", run / "tuner.pkl", trial / "params.pkl",
                 trial / "result.json", run / "experiment_state-2026-01-01_00-00-00.json"):
        path.chmod(0o644)
    return run


def _refusal(run: Path, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        check_run_dir_trusted(run, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(run) in message and TRUST_RUN_DIR_ENV in message
    assert "tuner.pkl" in message
    return message


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_RUN_DIR_ENV, raising=False)
    return _run_folder(tmp_path)


def test_own_run_folder_not_writable_by_others_is_accepted(run_dir):
    assert check_run_dir_trusted(run_dir) == run_dir
    assert _find_run(str(run_dir), None) == run_dir.resolve()


@pytest.mark.parametrize("target, mode, who", [
    ("tuner.pkl", 0o666, "group and others"),
    ("tuner.pkl", 0o664, "group"),
    (".", 0o757, "others"),
    (".", 0o775, "group"),
    ("experiment_state-2026-01-01_00-00-00.json", 0o646, "others"),
    ("abc12_00000/params.pkl", 0o666, "group and others"),
    ("abc12_00000", 0o777, "group and others"),
])
def test_run_folder_writable_by_group_or_others_is_refused(run_dir, target, mode, who):
    (run_dir / target).chmod(mode)
    message = _refusal(run_dir)
    assert f"writable by {who}" in message
    if target != ".":
        assert repr(target) in message


@needs_root
@pytest.mark.parametrize("target", [".", "tuner.pkl", "abc12_00000/params.pkl"])
def test_run_folder_owned_by_another_user_is_refused(run_dir, target):
    os.chown(run_dir / target, NOBODY, -1)
    message = _refusal(run_dir)
    assert f"uid {NOBODY}" in message and "not by you" in message


def test_tuner_pkl_symlinked_to_a_file_of_someone_else_is_refused(run_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere.pkl"
    elsewhere.write_bytes(b"x")
    elsewhere.chmod(0o666)
    (run_dir / "tuner.pkl").unlink()
    (run_dir / "tuner.pkl").symlink_to(elsewhere)
    assert "writable by group and others" in _refusal(run_dir)


def test_trust_switch_and_parameter_let_a_checked_folder_through(run_dir, monkeypatch):
    (run_dir / "tuner.pkl").chmod(0o666)
    assert check_run_dir_trusted(run_dir, trust=True) == run_dir
    monkeypatch.setenv(TRUST_RUN_DIR_ENV, "0")
    _refusal(run_dir)
    monkeypatch.setenv(TRUST_RUN_DIR_ENV, "1")
    assert check_run_dir_trusted(run_dir) == run_dir
    _refusal(run_dir, trust=False)  # an explicit parameter wins over the environment


def test_resume_entry_refuses_before_ray_starts(run_dir, monkeypatch):
    (run_dir / "tuner.pkl").chmod(0o666)
    with pytest.raises(ConfigError, match="refusing the run folder"):
        run_tuning(None, resume=str(run_dir))
    # a run named under the storage path is checked too
    from trainyard.config import load_config

    cfg = load_config(run_dir / "trainyard_tune.yaml", [f"storage_path={run_dir.parent}"])
    with pytest.raises(ConfigError, match="refusing the run folder"):
        run_tuning(cfg, resume=run_dir.name)


def test_cli_tune_resume_prints_one_line_and_fails(run_dir):
    (run_dir / "tuner.pkl").chmod(0o666)
    result = _cli("tune", "--resume", str(run_dir))
    assert result.returncode == 2, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: --resume: refusing the run folder") and "tuner.pkl" in line


# --------------------------------------------------------------------------------------
# 3. The HTML report escapes everything it takes from the run
# --------------------------------------------------------------------------------------


SCRIPT = "<script>alert(1)</script>"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def _hostile_run(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run \"quoted\" 'single' <b>bold"
    run.mkdir()
    winner = tmp_path / "winner <img src=x onerror=alert(4)>"
    winner.mkdir()
    (winner / "job.yaml").write_text("name: x\n# </pre><script>alert(5)</script>\n")
    metric = "val_<i>acc</i>"

    def trial(tid, act, best, state, error=""):
        return {
            "trial_id": tid,
            "params": {"train.lr": 0.01 * best, "model.params.act": act,
                       "<img src=x onerror=alert(2)>": best},
            "state": state, "error": error, "iterations": 2, "final": best, "best": best,
            "history": [{"iteration": 1, metric: best / 2}, {"iteration": 2, metric: best}],
            "checkpoint": None, "path": str(winner),
        }

    trials = [
        trial('t1"><script>alert(3)</script>', SCRIPT, 0.9, "TERMINATED"),
        trial("t2", "relu", 0.5, "STOPPED"),
        trial("t3", "tanh", 0.1, "ERROR", error='ValueError: <script>alert("err")</script>'),
    ]
    data = {"metric": metric, "mode": "max", "max_t": 2, "trials": trials,
            "winners": [{"trial_id": trials[0]["trial_id"], "value": 0.9, "path": str(winner),
                         "rank": 1}]}
    (run / "trainyard_trials.json").write_text(json.dumps(data))
    return run, winner


def _assert_inert(page: str) -> None:
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "img" not in parser.tags and "i" not in parser.tags
    assert "b" in parser.tags  # the report's own markup is still there
    assert not [a for a in parser.attrs if a.startswith("on")], parser.attrs
    assert "<script" not in page.lower() and "<img" not in page.lower()


def test_report_escapes_params_ids_errors_names_and_paths(tmp_path):
    run, _ = _hostile_run(tmp_path)
    out = write_report(run)
    page = out.read_text(encoding="utf-8")
    _assert_inert(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the param value, as text
    assert "t1&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in page  # the trial id
    assert "&lt;script&gt;alert(&quot;err&quot;)&lt;/script&gt;" in page  # the error
    assert "&lt;img src=x onerror=alert(2)&gt;" in page  # a param name
    assert "&lt;/pre&gt;&lt;script&gt;alert(5)&lt;/script&gt;" in page  # the winner's config
    assert "val_&lt;i&gt;acc&lt;/i&gt;" in page  # the metric
    assert "run &quot;quoted&quot; &#x27;single&#x27; &lt;b&gt;bold" in page  # run name


def test_cli_report_writes_the_escaped_page(tmp_path):
    run, _ = _hostile_run(tmp_path)
    out = tmp_path / "r.html"
    result = _cli("report", str(run), "-o", str(out))
    assert result.returncode == 0, result.stderr
    _assert_inert(out.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------
# 4. A plugin calling sys.exit is a plugin problem, not a silent end of trainyard
# --------------------------------------------------------------------------------------


class ExitingPlugin:
    def __init__(self, code):
        self.code = code

    @hookimpl
    def register_models(self, register):
        if self.code == "bare":
            sys.exit()
        sys.exit(self.code)


def _problems_of(name: str) -> list[str]:
    return [p.message for p in plugins.get_registry().problems if p.plugin == name]


@pytest.mark.parametrize("code, shown", [(3, "sys.exit(3)"), ("bye", "sys.exit('bye')"),
                                         ("bare", "sys.exit()")])
def test_hook_calling_sys_exit_is_reported_naming_plugin_and_hook(code, shown):
    name = unique("exiting")
    with plugin_registered(ExitingPlugin(code), name):
        registry = plugins.get_registry()
        (message,) = _problems_of(name)
        assert message.startswith(f"register_models called {shown}")
        (problem,) = [str(p) for p in registry.problems if p.plugin == name]
        assert problem.startswith(f'plugin "{name}": register_models called {shown}')
        assert name not in {info.name for info in registry.plugins}
        assert {"mlp", "cnn", "bert"} <= set(registry.models)
        with pytest.raises(PluginError, match=f'{name}.*called sys.exit'):
            registry.get("model", "nope")


class InterruptingPlugin:
    @hookimpl
    def register_metrics(self, register):
        raise KeyboardInterrupt


def test_ctrl_c_in_a_hook_still_stops_trainyard():
    name = unique("interrupting")
    before = registry_snapshot()
    plugins.register_plugin(InterruptingPlugin(), name)
    try:
        with pytest.raises(KeyboardInterrupt):
            plugins.get_registry()
    finally:
        plugins.unregister_plugin(name)
    assert registry_snapshot() == before


EXIT_AT_IMPORT = """
import sys
sys.exit(4)
"""

EXIT_IN_HOOK = """
import sys
from trainyard import hookimpl

@hookimpl
def register_metrics(register):
    sys.exit(5)
"""

GOOD = """
from trainyard import MetricSpec, hookimpl

def _score(y_true, y_pred):
    return 1.0

@hookimpl
def register_metrics(register):
    register(MetricSpec("{metric}", _score))
"""


def _exiting_distribution(root: Path) -> dict[str, str]:
    modules = {"exit_import": unique("exit_import_mod"), "exit_hook": unique("exit_hook_mod"),
               "still_good": unique("still_good_mod")}
    metric = unique("still_good_metric")
    make_distribution(root, unique("trainyard_exiting"), entry_points=modules, modules={
        modules["exit_import"]: EXIT_AT_IMPORT,
        modules["exit_hook"]: EXIT_IN_HOOK,
        modules["still_good"]: GOOD.format(metric=metric),
    })
    return {**modules, "metric": metric}


def test_installed_plugins_calling_sys_exit_are_reported_and_others_load(tmp_path, monkeypatch):
    installed = _exiting_distribution(tmp_path)
    before = registry_snapshot()
    with monkeypatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        mp.delenv("TRAINYARD_DISABLE_EXTERNAL_PLUGINS", raising=False)
        mp.delenv("TRAINYARD_PLUGINS", raising=False)
        mp.delenv("TRAINYARD_DISABLE_PLUGINS", raising=False)
        plugins.reset()
        try:
            registry = plugins.get_registry()
            problems = {p.plugin: p.message for p in registry.problems}
            assert problems["exit_import"] == (
                f"error importing {installed['exit_import']}: called sys.exit(4)")
            assert problems["exit_hook"].startswith("register_metrics called sys.exit(5)")
            assert installed["metric"] in registry.metrics
            assert {"mlp", "cnn", "bert"} <= set(registry.models)
        finally:
            plugins.reset()
    assert registry_snapshot() == before


def test_cli_lists_a_plugin_calling_sys_exit_instead_of_ending_silently(tmp_path):
    installed = _exiting_distribution(tmp_path)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = _cli("plugins", env={"PYTHONPATH": path, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert 'failed: plugin "exit_hook": register_metrics called sys.exit(5)' in out
    assert f'failed: plugin "exit_import": error importing {installed["exit_import"]}: called sys.exit(4)' in out
    assert "still_good" in out and "mlp" in out


def test_register_plugin_still_works_after_a_plugin_exited():
    name, good = unique("exiting"), unique("good")
    metric = unique("good_metric")

    class Good:
        @hookimpl
        def register_metrics(self, register):
            register(MetricSpec(metric, lambda y, p: 1.0))

    with plugin_registered(ExitingPlugin(7), name), plugin_registered(Good(), good):
        registry = plugins.get_registry()
        assert metric in registry.metrics and _problems_of(name)
