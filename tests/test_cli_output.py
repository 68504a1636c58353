"""Output that survives logs: with stdout a pipe, tables print every id, name and value
whole (no '…'), progress is one line per event, and `--json` gives scripts stable keys."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import CONFIGS

TRAINYARD = [sys.executable, "-m", "trainyard.cli"]
ELLIPSIS = "…"


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI with stdout and stderr pipes: not a terminal, as in a CI log."""
    return subprocess.run([*TRAINYARD, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def log_console():
    from trainyard.ui.console import make_console

    buffer = io.StringIO()
    return make_console(file=buffer), buffer


def outcome(n: int, id_length: int = 48):
    """A search's outcome as run_tuning returns it, with long trial ids and params."""
    trials = []
    for i in range(n):
        failed = i == n - 1
        trials.append({
            "trial_id": f"trial_{i:03d}_" + "x" * (id_length - 10),
            "params": {"train.lr": 0.000123456 * (i + 1), "model.params.hidden_layer_sizes_name": 64,
                       "model.params.dropout_probability_of_the_head": 0.123456},
            "state": "ERROR" if failed else "TERMINATED", "error": "ValueError: [boom]" if failed else "",
            "iterations": 3, "best": None if failed else 0.5 + i / 100, "final": None if failed else 0.5,
            "checkpoint": None, "history": [], "path": None,
        })
    return SimpleNamespace(trials=trials, metric="val_accuracy", mode="max", run_dir="runs/long",
                           registry_dir="winners/long", winners=[], stopped_by="time_budget",
                           stop_message="the time budget (tune.time_budget_s=30s) ended the search: ...",
                           exploits=[{"trial": "b", "from_trial": "a", "epoch": 2}],
                           registered=[{"rank": 1, "name": "long", "version": "3"}])


# -- tables in a log -------------------------------------------------------------------------------


def test_summary_table_in_a_log_is_whole_and_ranked_one_to_n():
    from trainyard.ui.tune_table import summary_table

    result = outcome(5)
    console, buffer = log_console()
    console.print(summary_table(result))
    text = buffer.getvalue()
    assert ELLIPSIS not in text
    for t in result.trials:
        assert t["trial_id"] in text
    assert "hidden_layer_sizes_name" in text and "dropout_probability_of_the_head" in text
    ranks = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) > 2 and cells[1].startswith("trial_"):
            ranks[cells[1]] = cells[0]
    best_first = sorted(result.trials[:-1], key=lambda t: t["best"], reverse=True)
    assert [ranks[t["trial_id"]] for t in best_first] == ["1", "2", "3", "4"]
    assert ranks[result.trials[-1]["trial_id"]] == "-"  # the failed trial has no rank


def test_rank_and_trial_id_keep_their_width_on_a_narrow_terminal():
    """The reported bug: on an 80-column terminal the rank column came out empty."""
    from rich.console import Console

    from trainyard.ui.tune_table import summary_table

    result = outcome(4, id_length=11)  # Tune's own ids: 3f2a1_00000
    buffer = io.StringIO()
    Console(file=buffer, width=80, force_terminal=True, color_system=None).print(summary_table(result))
    rows = [line for line in buffer.getvalue().splitlines() if "trial_" in line]
    assert [line.split("│")[1].strip() for line in rows] == ["1", "2", "3", "-"]
    for t in result.trials:
        assert t["trial_id"] in buffer.getvalue()


def test_live_trials_table_in_a_log_is_whole():
    from trainyard.ui.tune_table import TrialRow, render_table

    rows = [TrialRow("a_search_with_a_long_name_" + "y" * 30 + f"_{i:05d}",
                     {"model.params.a_parameter_with_a_long_name": 0.5, "train.lr": 1e-4},
                     "RUNNING", 2, 0.9, 0.95) for i in range(3)]
    console, buffer = log_console()
    console.print(render_table(rows, "val_accuracy", "search: trials"))
    text = buffer.getvalue()
    assert ELLIPSIS not in text
    assert all(r.trial_id in text for r in rows) and "a_parameter_with_a_long_name" in text


@pytest.fixture(scope="module")
def plugins_output():
    """`trainyard plugins`, `trainyard plugins --json` and its --help, each run once."""
    runs = {name: run_cli(*args) for name, args in
            {"table": ["plugins"], "json": ["plugins", "--json"], "help": ["plugins", "--help"]}.items()}
    for out in runs.values():
        assert out.returncode == 0, out.stderr
    return {name: out.stdout for name, out in runs.items()}


def test_trainyard_plugins_through_a_pipe_prints_every_name_whole(plugins_output):
    table = plugins_output["table"]
    assert ELLIPSIS not in table
    data = json.loads(plugins_output["json"])
    assert data["plugins"]
    for plugin in data["plugins"]:
        # A whole row of names: an 80-column table cuts the metrics plugin's list short.
        for kind in ("models", "datasets", "metrics"):
            if plugin[kind]:
                assert ", ".join(plugin[kind]) in table
        assert plugin["module"] in table


def test_trainyard_plugins_json_has_its_documented_keys(plugins_output):
    data = json.loads(plugins_output["json"])
    assert set(data) == {"plugins", "problems"}
    keys = {"name", "version", "builtin", "distribution", "module", "location", "models", "datasets", "metrics"}
    assert all(set(p) == keys for p in data["plugins"])
    mlp = next(p for p in data["plugins"] if p["name"] == "mlp")
    assert mlp["builtin"] is True and mlp["models"] == ["mlp"]
    assert "breast_cancer" in next(p for p in data["plugins"] if p["name"] == "tabular")["datasets"]
    documented = plugins_output["help"].replace("\n", " ")
    for key in keys | {"problems"}:
        assert key in documented


# -- progress in a log -----------------------------------------------------------------------------


def test_training_progress_in_a_log_is_one_line_per_epoch():
    from trainyard.config import load_config
    from trainyard.ui.training import TrainingView

    cfg = load_config(CONFIGS / "mlp_breast_cancer.yaml", ["train.epochs=2"])
    console, buffer = log_console()
    view = TrainingView(console, cfg, 0.0)
    with view:
        for epoch in range(2):
            view.handle({"type": "epoch_start", "epoch": epoch, "batches": 3})
            for step in range(1, 4):
                view.handle({"type": "step", "step": step, "loss": 0.5})
            view.handle({"type": "epoch_end", "epoch": epoch,
                         "metrics": {"train_loss": 0.5, "val_accuracy": 0.9}})
    lines = buffer.getvalue().splitlines()
    assert [line for line in lines if line.startswith("epoch ")] == [
        "epoch 1/2  train_loss 0.5000  val_accuracy 0.9000",
        "epoch 2/2  train_loss 0.5000  val_accuracy 0.9000",
    ]
    assert len(lines) == 3  # the header line and one per epoch: no progress bar redraws
    assert "\x1b" not in buffer.getvalue() and "\r" not in buffer.getvalue()
    assert view.first_step_s is not None  # start-up time is still measured


def test_trial_events_become_one_line_each():
    from trainyard.ui.tune_table import TrialRow, trial_event_lines

    row = TrialRow("3f2a1_00000", {"train.lr": 0.001}, "RUNNING", 0)
    assert trial_event_lines(row, None, "val_accuracy") == ["trial 3f2a1_00000 started: lr=0.001"]
    row.iteration, row.metric, row.best = 1, 0.9, 0.9
    assert trial_event_lines(row, ("RUNNING", 0), "val_accuracy") == [
        "trial 3f2a1_00000 epoch 1: accuracy 0.9 (best 0.9)"]
    row.state = "TERMINATED"
    assert trial_event_lines(row, ("RUNNING", 1), "val_accuracy") == [
        "trial 3f2a1_00000 ended after 1 epoch(s): best accuracy 0.9"]
    assert trial_event_lines(row, ("TERMINATED", 1), "val_accuracy") == []  # nothing new
    row.state, row.error = "ERROR", "ValueError: bad"
    assert trial_event_lines(row, ("RUNNING", 1), "val_accuracy") == [
        "trial 3f2a1_00000 failed: ValueError: bad"]


# -- --json ----------------------------------------------------------------------------------------


def test_tune_summary_json_ranks_every_trial_and_is_valid_json():
    from trainyard.jsontext import dumps
    from trainyard.ui.tune_table import summary_json

    result = outcome(4)
    result.trials[0]["final"] = float("nan")  # JSON has no NaN: it is printed as null
    data = json.loads(dumps(summary_json(result), allow_nan=False))  # as `--json` prints it
    assert set(data) == {"run_dir", "metric", "mode", "registry_dir", "trials", "winners", "stopped_by",
                         "stop_message", "exploits", "registered"}
    assert (data["stopped_by"], data["stop_message"]) == (result.stopped_by, result.stop_message)
    assert data["exploits"] == result.exploits and data["registered"] == result.registered
    assert [t["rank"] for t in data["trials"]] == [1, 2, 3, None]
    assert [t["best"] for t in data["trials"][:3]] == sorted((t["best"] for t in result.trials[:3]), reverse=True)
    assert set(data["trials"][0]) == {"rank", "trial_id", "state", "params", "iterations", "best", "final",
                                      "error", "checkpoint"}
    assert data["trials"][-1]["error"] == "ValueError: [boom]"
    assert next(t for t in data["trials"] if t["trial_id"] == result.trials[0]["trial_id"])["final"] is None


class StandInHead:
    """Ray's Jobs API routes `trainyard jobs list` reaches (``/api/version``, ``/api/jobs/``),
    served for real on loopback by aiohttp; no Ray cluster."""

    def __init__(self, jobs: list[dict]):
        import asyncio

        self.jobs = jobs
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, started):
        import asyncio

        from aiohttp import web

        async def version(request):
            return web.json_response({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"})

        async def jobs(request):
            return web.json_response(self.jobs)

        app = web.Application()
        app.router.add_get("/api/version", version)
        app.router.add_get("/api/jobs/", jobs)
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        self.loop.close()

    def stop(self):
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_jobs_list_json_and_a_whole_entrypoint_in_a_log(tmp_path):
    long_entrypoint = "python -m trainyard.cli tune job.yaml " + " ".join(f"key{i}=value{i}" for i in range(20))
    jobs = [
        {"type": "SUBMISSION", "job_id": "02000000", "submission_id": "raysubmit_older_one", "status": "SUCCEEDED",
         "entrypoint": "echo hi", "message": "Job finished successfully.", "start_time": 1_700_000_000_000,
         "end_time": 1_700_000_060_000, "metadata": {}},
        {"type": "SUBMISSION", "job_id": "03000000", "submission_id": "raysubmit_" + "z" * 40, "status": "RUNNING",
         "entrypoint": long_entrypoint, "message": None, "start_time": 1_700_000_100_000, "end_time": None,
         "metadata": {"trainyard_mode": "tune", "trainyard_job": "tune_mlp_with_a_long_name"}},
    ]
    head = StandInHead(jobs)
    # No token, and no RAY_AUTH_MODE that an embedded Ray of an earlier test left in this
    # process's environment (the client would then want a token): the stand-in asks for none.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    try:
        table = subprocess.run([*TRAINYARD, "jobs", "list", "--address", head.url], capture_output=True,
                               text=True, timeout=120, env=env)
        out = subprocess.run([*TRAINYARD, "jobs", "list", "--json", "--address", head.url], capture_output=True,
                             text=True, timeout=120, env=env)
    finally:
        head.stop()
    assert table.returncode == 0 and out.returncode == 0, table.stderr + out.stderr
    assert long_entrypoint in table.stdout and "raysubmit_" + "z" * 40 in table.stdout
    assert ELLIPSIS not in table.stdout and "tune tune_mlp_with_a_long_name" in table.stdout
    data = json.loads(out.stdout)
    assert data["address"] == head.url
    assert [j["submission_id"] for j in data["jobs"]] == ["raysubmit_" + "z" * 40, "raysubmit_older_one"]
    newest, older = data["jobs"]
    assert set(newest) == {"submission_id", "status", "trainyard_mode", "trainyard_job", "entrypoint", "message",
                           "start_time", "end_time", "metadata"}
    assert (newest["status"], newest["trainyard_mode"], newest["trainyard_job"]) == (
        "RUNNING", "tune", "tune_mlp_with_a_long_name")
    assert newest["entrypoint"] == long_entrypoint and newest["end_time"] is None
    assert (older["status"], older["trainyard_mode"], older["end_time"]) == ("SUCCEEDED", None, 1_700_000_060_000)


# -- trainyard up's sample request -----------------------------------------------------------------


def test_sample_request_shows_float32_features_as_typed():
    from trainyard.pipeline import request_body, shown_as_float32

    sample = np.array([17.99, 0.1, 1e-5, 3.0, -2.5], dtype=np.float32).tolist()
    assert sample[0] == 17.989999771118164  # what float32 features turn into
    assert request_body(sample) == '{"inputs": [[17.99, 0.1, 1e-05, 3.0, -2.5]]}'
    # Read back, each is the same float32 the model is given.
    assert np.array_equal(np.array(json.loads(request_body(sample))["inputs"][0], dtype=np.float32),
                          np.array(sample, dtype=np.float32))
    assert shown_as_float32(0.1) == 0.1 and shown_as_float32("17.989999771118164") == "17.989999771118164"
    assert shown_as_float32([[np.float32(17.99)], {"x": 2}]) == [[17.99], {"x": 2}]


# -- one real search -------------------------------------------------------------------------------


def test_tune_json_in_a_log(tmp_path, ray_cluster, capfd):
    """A tiny search through the real `trainyard tune --json` command, run in this process so
    that it shares the session's Ray (stdout and stderr are pytest's files, not terminals):
    the JSON alone on stdout; on stderr one line per trial event, then the summary, whole
    and ranked 1..N."""
    from omegaconf import OmegaConf

    from trainyard.cli import main

    raw = OmegaConf.load(CONFIGS / "tune_mlp.yaml")
    raw.tune.update(search="grid", scheduler="none", num_samples=1, top_k=1,
                    space={"train.lr": {"type": "grid", "values": [0.00001, 0.01]}})
    config = tmp_path / "tiny.yaml"
    config.write_text(OmegaConf.to_yaml(raw))
    capfd.readouterr()
    main.main(["tune", str(config), f"storage_path={tmp_path / 'runs'}", f"tune.registry={tmp_path / 'winners'}",
               "train.epochs=1", "--json"], prog_name="trainyard", standalone_mode=False)
    out = capfd.readouterr()
    data = json.loads(out.out)
    assert set(data) == {"run_dir", "metric", "mode", "registry_dir", "trials", "winners", "stopped_by",
                         "stop_message", "exploits", "registered"}
    assert (data["stopped_by"], data["stop_message"], data["exploits"], data["registered"]) == (None, "", [], [])
    assert data["metric"] == "val_accuracy" and data["mode"] == "max"
    assert [t["rank"] for t in data["trials"]] == [1, 2]
    assert data["trials"][0]["best"] >= data["trials"][1]["best"]
    assert data["winners"][0]["trial_id"] == data["trials"][0]["trial_id"]
    assert ELLIPSIS not in out.err and "\x1b" not in out.err
    for t in data["trials"]:
        tid = t["trial_id"]
        assert f"trial {tid} started:" in out.err
        assert f"trial {tid} epoch 1: accuracy" in out.err
        assert f"trial {tid} ended after 1 epoch(s)" in out.err
    summary_rows = [line for line in out.err.splitlines()
                    if "│" in line and any(f" {t['trial_id']} " in line for t in data["trials"])]
    assert [row.split("│")[1].strip() for row in summary_rows] == ["1", "2"]


def test_pbt_exploits_show_in_the_live_table_and_as_one_log_line_each():
    import io

    from rich.console import Console

    from trainyard.ui.tune_table import LiveTable, make_callback

    exploits = [{"trial": "pbt_00001", "from_trial": "pbt_00000", "epoch": 2, "from_epoch": 2,
                 "old": {"train.lr": 0.01, "model.params.dropout": 0.1},
                 "new": {"train.lr": 0.012, "model.params.dropout": 0.1}}]
    log = Console(file=io.StringIO(), width=200)
    live = LiveTable(log, "val_accuracy", "pbt")
    live.callback = make_callback("val_accuracy", "max", ["train.lr"], lambda: None)
    live.read_exploits = lambda: list(exploits)
    live._print_events()
    exploits.append({**exploits[0], "trial": "pbt_00002", "epoch": 4, "new": {"train.lr": 0.008}})
    live._print_events()
    lines = log.file.getvalue().splitlines()
    # Each exploit once, naming both trials, the epoch and only the values that changed.
    assert lines == ["trial pbt_00001 copied trial pbt_00000 at epoch 2: lr 0.01 -> 0.012",
                     "trial pbt_00002 copied trial pbt_00000 at epoch 4: lr 0.01 -> 0.008"]
    screen = Console(file=io.StringIO(), width=120)
    screen.print(live._table())
    assert "PBT exploits (2)" in screen.file.getvalue() and "pbt_00002 copied" in screen.file.getvalue()


def test_a_resumed_searchs_live_rows_keep_each_trials_best_so_far():
    """After ``tune --resume`` the live view starts empty, while Tune's trials carry their
    results so far: a trial's first result after the resume does not reset its best."""
    from ray.tune.experiment import Trial

    from trainyard.ui.tune_table import make_callback

    trial = Trial("stub", config={"train.lr": 0.01}, trial_id="t0", stub=True)
    for epoch, value in enumerate([0.5, 0.9, 0.7], 1):  # before the driver was stopped
        trial.update_last_result({"training_iteration": epoch, "val_accuracy": value})
    callback = make_callback("val_accuracy", "max", ["train.lr"], lambda: None)  # the resumed driver's
    result = {"training_iteration": 4, "val_accuracy": 0.6}
    trial.update_last_result(result)  # as Tune does before its callbacks
    callback.on_trial_result(0, [trial], trial, result)
    row = callback.rows["t0"]
    assert (row.iteration, row.metric, row.best) == (4, 0.6, 0.9)
    fresh = Trial("stub", config={"train.lr": 0.02}, trial_id="t1", stub=True)
    callback.on_trial_start(0, [trial, fresh], fresh)  # a trial with no result yet: no best
    assert (callback.rows["t1"].best, callback.rows["t1"].iteration) == (None, 0)


def test_output_to_a_reader_that_went_away_ends_quietly_as_shell_tools_do():
    """`trainyard jobs list | head -1`: once the reader has closed the pipe, trainyard stops
    with SIGPIPE's status and no 'unexpected BrokenPipeError' line."""
    proc = subprocess.Popen([sys.executable, "-m", "trainyard.cli", "plugins", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_a_failed_jobs_message_loses_the_log_tail_ray_appends_and_status_keeps_its_last_line():
    """Ray's Jobs API ends a failed job's message with the tail of its log: `--follow` had
    just printed that log, so it came twice; `jobs status` shows the last line of it."""
    from trainyard.cli import _job_message

    message = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 "
               "chars):\n  trial table ...\nerror: --deploy: no API key on the head\n\n")
    assert _job_message(message) == ("Job entrypoint command failed with exit code 1",
                                     "error: --deploy: no API key on the head")
    assert _job_message("Job finished successfully.") == ("Job finished successfully.", "")
    assert _job_message("") == ("", "")


def test_a_search_whose_metric_was_nan_in_every_trial_says_so_not_that_none_finished():
    from trainyard.cli import no_winner_reason
    from trainyard.tune.driver import TuneOutcome

    def outcome(*trials):
        return TuneOutcome("runs/s", "val_err", "min", [dict(t) for t in trials], [], "winners")

    nan = {"state": "TERMINATED", "best": float("nan")}
    assert no_winner_reason(outcome(nan, {"state": "TERMINATED", "best": None})) == (
        "2 trial(s) finished, but none gave a finite val_err (every value was NaN or missing: see that metric's "
        "plugin, or the data), so there is no winner to export")
    assert no_winner_reason(outcome({"state": "ERROR", "best": None})) == (
        "no trial finished, so there is no winner to export")
