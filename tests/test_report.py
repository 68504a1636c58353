"""The tuning report in a real headless browser (Debian's chromium, driven by Playwright):
a real small search on a real local Ray Tune, its report served over loopback HTTP, every
panel rendered, axes that follow the search space, no console error, nothing fetched
from anywhere else. Plus the panels' one-line reasons where there is nothing to draw
(no browser, no Ray)."""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from trainyard.ui.report import param_axes, param_importances, read_space, write_report

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

#: One dimension of every kind: the expected scale of each param's axes.
SPACE = {
    "train.lr": ({"type": "loguniform", "low": 0.00001, "high": 0.03}, "log"),
    "train.batch_size": ({"type": "choice", "values": [16, 32, 64]}, "category"),
    "model.params.dropout": ({"type": "uniform", "low": 0.0, "high": 0.3}, "linear"),
    "train.grad_accum_steps": ({"type": "randint", "low": 1, "high": 3}, "linear"),
    "model.params.hidden": ({"type": "grid", "values": [[16], [32, 16]]}, "category"),
}


@pytest.fixture(scope="module")
def search(tmp_path_factory, ray_cluster):
    """A real search: random over four dimensions times a two-point grid (4 trials,
    2 epochs, ASHA), plus an exploits.jsonl such as PBT writes, naming two of its trials."""
    from omegaconf import OmegaConf

    from trainyard.config import load_config
    from trainyard.tune.driver import run_tuning

    tmp = tmp_path_factory.mktemp("report")
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tune_mlp.yaml"))
    raw.update(name="report_run", storage_path=str(tmp / "runs"))
    raw["tune"].update(registry=str(tmp / "winners"), num_samples=2, grace_period=1,
                       space={k: dim for k, (dim, _) in SPACE.items()})
    outcome = run_tuning(load_config(base=raw, overrides=["train.epochs=2"]))
    run = Path(outcome.run_dir)
    a, b = outcome.trials[0]["trial_id"], outcome.trials[1]["trial_id"]
    lines = [
        {"trial": a, "from_trial": b, "epoch": 1, "time": 1767225600.0,
         "old": {"train.lr": 0.001, "train.batch_size": 16}, "new": {"train.lr": 0.0012, "train.batch_size": 64}},
        {"trial": b, "from_trial": a, "epoch": 2, "from_epoch": 1, "time": "2026-01-01T00:01:00",
         "old": {"train.lr": 0.02}, "new": {"train.lr": 0.016}},
    ]
    (run / "exploits.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return outcome, write_report(run)


def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the report's browser test needs Debian's chromium "
                    "(apt-get install -y chromium; .ci/run installs it)", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the Python package playwright is missing: .venv/bin/python -m pip install "
                    "'playwright>=1.50,<2' (its browser is Debian's chromium, never "
                    "'playwright install')", pytrace=False)
    return CHROMIUM


@pytest.fixture
def served(search):
    """The report's folder over HTTP on loopback: the report's URL and its base."""
    outcome, report = search
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(report.parent))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    yield base + report.name, base
    server.shutdown()
    server.server_close()


PANELS_JS = """() => [...document.querySelectorAll('section.panel')].map(s => {
  const r = s.getBoundingClientRect();
  const svgs = [...s.querySelectorAll('svg')].map(v => {
    const b = v.getBBox();
    return {w: b.width, h: b.height, marks: v.querySelectorAll('polyline,circle,rect').length};
  });
  return {id: s.id, w: r.width, h: r.height, svgs, tables: s.querySelectorAll('table').length,
          why: [...s.querySelectorAll('p.why')].map(p => p.textContent)};
})"""

AXES_JS = """() => [...document.querySelectorAll('#panel-parallel g.axis, #panel-params g.axis')].map(g => ({
  panel: g.closest('section').id, param: g.dataset.param, scale: g.dataset.scale,
  role: g.getAttribute('class'), ticks: [...g.querySelectorAll('text.tick')].map(t => t.textContent)}))"""

LINES_JS = """sel => [...document.querySelectorAll(sel)].map(p => ({
  trial: p.dataset.trial, winner: p.classList.contains('winner'),
  points: p.points.numberOfItems, length: p.getTotalLength(),
  width: getComputedStyle(p).strokeWidth, stroke: getComputedStyle(p).stroke}))"""


def test_every_panel_renders_in_a_headless_browser(search, served, tmp_path):
    from playwright.sync_api import sync_playwright

    outcome, report = search
    url, base = served
    trials, winner = outcome.trials, outcome.winners[0]["trial_id"]
    messages, requests = [], []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=_chromium(), headless=True, args=FLAGS,
            viewport={"width": 1250, "height": 900})
        try:
            page = context.new_page()
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            assert page.goto(url).status == 200
            page.wait_for_load_state("load")
            panels = {p["id"]: p for p in page.evaluate(PANELS_JS)}
            axes = page.evaluate(AXES_JS)
            parallel = page.evaluate(LINES_JS, "#panel-parallel polyline.trial")
            curves = page.evaluate(LINES_JS, "#panel-curves polyline.trial")
            bars = page.evaluate("""() => [...document.querySelectorAll('#panel-importance rect.bar')].map(
                r => [r.dataset.param, r.getBoundingClientRect().width, r.querySelector('title').textContent])""")
            exploits = page.evaluate("""() => [...document.querySelectorAll('#exploits tr')].slice(1).map(
                tr => [...tr.cells].map(c => c.textContent))""")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            context.close()

    # Nothing went wrong in the page, and nothing was fetched but the page itself.
    assert messages == []
    assert requests and all(r.startswith(base) for r in requests), requests

    # Every panel is there, laid out, and drew something.
    expected = ["winner", "confusion", "importance", "parallel", "curves", "params", "exploits", "trials"]
    assert list(panels) == [f"panel-{p}" for p in expected]
    for pid, p in panels.items():
        assert p["w"] > 300 and p["h"] > 60 and p["why"] == [], (pid, p)
        assert all(s["w"] > 100 and s["h"] > 50 and s["marks"] > 0 for s in p["svgs"]), (pid, p)
    assert [len(panels[f"panel-{p}"]["svgs"]) for p in ("importance", "parallel", "curves", "params")] == [
        1, 1, 1, len(SPACE)]
    assert panels["panel-confusion"]["tables"] == panels["panel-trials"]["tables"] == 1

    # Parallel coordinates: one line per trial through every param and the metric, the
    # winner's alone red and on top.
    assert sorted(p["trial"] for p in parallel) == sorted(t["trial_id"] for t in trials)
    assert all(p["points"] == len(SPACE) + 1 and p["length"] > 50 for p in parallel), parallel
    assert [p["trial"] for p in parallel if p["winner"]] == [winner] == [parallel[-1]["trial"]]
    assert parallel[-1]["stroke"] == "rgb(214, 39, 40)"
    assert all(p["stroke"] != "rgb(214, 39, 40)" for p in parallel[:-1])

    # Learning curves: every trial's, the winner's highlighted: thicker, red, on top.
    assert sorted(c["trial"] for c in curves) == sorted(t["trial_id"] for t in trials)
    top = curves[-1]
    assert top["winner"] and top["trial"] == winner
    assert top["points"] == next(t["iterations"] for t in trials if t["trial_id"] == winner)
    assert float(top["width"].rstrip("px")) > max(float(c["width"].rstrip("px")) for c in curves[:-1])

    # Importance: one bar per param, Optuna's fANOVA numbers, summing to one.
    assert sorted(b[0] for b in bars) == sorted(SPACE)
    scores = param_importances(trials, param_axes(trials, read_space(report.parent)), "max")
    assert [b[0] for b in bars] == list(scores)  # most important first
    for name, width, title in bars:
        assert width >= 1 and title == f"{name}: {scores[name]:.3f}"
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)

    # The axes follow the space: log for the loguniform param only, categories for choice
    # and grid holding the values tried and no other, linear for uniform and randint.
    params = [a for a in axes if "metric" not in a["role"] and a["param"] in SPACE]
    assert {(a["panel"], a["param"]) for a in params} == {
        (panel, k) for panel in ("panel-parallel", "panel-params") for k in SPACE}
    for a in params:
        assert a["scale"] == SPACE[a["param"]][1], a
    assert {a["param"] for a in axes if a["scale"] == "log"} == {"train.lr"}
    for key in ("train.batch_size", "model.params.hidden"):
        tried = {json.dumps(t["params"][key]) for t in trials}
        for a in (a for a in params if a["param"] == key):
            assert sorted(a["ticks"]) == sorted(tried), (a, tried)
    assert {json.dumps(t["params"]["model.params.hidden"]) for t in trials} == {"[16]", "[32, 16]"}

    # PBT's exploits: the two readable lines, the unreadable one counted.
    a, b = trials[0]["trial_id"], trials[1]["trial_id"]
    assert exploits == [
        ["2026-01-01 00:00:00 UTC", "1", a, b, "train.lr: 0.001 → 0.0012; train.batch_size: 16 → 64"],
        ["2026-01-01T00:01:00", "2", b, f"{a} (its epoch 1)", "train.lr: 0.02 → 0.016"],
    ]
    assert "1 line(s) could not be read" in report.read_text(encoding="utf-8")

    # The screenshot is a real, tall, full page.
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1200 and height > 2500 and len(png) > 60_000, (width, height, len(png))


# --------------------------------------------------------------------------------------
# The panels' reasons, and axes without a saved space (no browser, no Ray)
# --------------------------------------------------------------------------------------


def _trial(tid, params, best, state="TERMINATED"):
    history = [] if best is None else [{"iteration": 1, "val_accuracy": best}]
    return {"trial_id": tid, "params": params, "state": state, "error": "boom" if state == "ERROR" else "",
            "iterations": len(history), "final": best, "best": best, "history": history,
            "checkpoint": None, "path": ""}


def _run(tmp_path: Path, trials: list[dict]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainyard_trials.json").write_text(json.dumps(
        {"metric": "val_accuracy", "mode": "max", "max_t": 1, "trials": trials, "winners": []}))
    return run


def test_importance_says_why_in_one_line_with_too_few_trials_or_equal_scores(tmp_path):
    (tmp_path / "a").mkdir()
    one = [_trial("t0", {"train.lr": 0.1}, 0.9), _trial("t1", {"train.lr": 0.2}, None, "ERROR")]
    page = write_report(_run(tmp_path / "a", one)).read_text()
    assert ('<p class="why">No hyperparameter importance: it needs at least 2 finished trials, '
            "and 1 finished.</p>") in page
    assert 'class="bar"' not in page
    assert "exploits" not in page  # no exploits.jsonl, no panel

    (tmp_path / "b").mkdir()
    same = [_trial(f"t{i}", {"train.lr": 0.1 * (i + 1)}, 0.5) for i in range(3)]
    page = write_report(_run(tmp_path / "b", same)).read_text()
    assert "No hyperparameter importance: all 3 finished trials scored the same." in page


def test_a_param_with_one_value_scores_zero_and_the_others_share_the_rest():
    trials = [_trial(f"t{i}", {"a": 0.1 * (i + 1), "act": "relu"}, 0.5 + 0.1 * i) for i in range(4)]
    scores = param_importances(trials, param_axes(trials, {}), "max")
    assert scores["act"] == 0.0 and scores["a"] == pytest.approx(1.0)
    # Four trials: the panel says how far to trust it; from ten on it does not.
    from trainyard.ui.report import importance_panel

    assert "fitted to 4 trials is a rough guide only" in importance_panel(trials, param_axes(trials, {}), "max", "l")
    many = [_trial(f"t{i}", {"a": 0.1 * (i + 1), "act": "relu"}, 0.5 + 0.01 * i) for i in range(10)]
    assert "rough guide" not in importance_panel(many, param_axes(many, {}), "max", "loss")


def test_without_a_saved_space_numbers_are_linear_and_the_rest_categories(tmp_path):
    trials = [_trial("t0", {"train.lr": 0.00001, "act": "relu"}, 0.5),
              _trial("t1", {"train.lr": 0.01, "act": "tanh"}, 0.7)]
    run = _run(tmp_path, trials)
    assert read_space(run) == {}
    axes = {a.name: a for a in param_axes(trials, {})}
    assert axes["train.lr"].scale == "linear"  # a wide range alone does not make a log axis
    assert axes["act"].scale == "category" and [c for _, c in axes["act"].categories] == ["relu", "tanh"]
    (run / "exploits.jsonl").write_text("")
    page = write_report(run).read_text()
    assert 'data-scale="log"' not in page and "PBT recorded no exploit." in page



def test_exploits_kept_in_the_trials_file_show_when_the_jsonl_is_gone(tmp_path):
    trials = [_trial("t0", {"train.lr": 0.01}, 0.6), _trial("t1", {"train.lr": 0.02}, None, "PENDING")]
    run = _run(tmp_path, trials)
    data = json.loads((run / "trainyard_trials.json").read_text())
    data["exploits"] = [{"trial": "t0", "from_trial": "t1", "epoch": 3, "time": 0,
                         "old": {"train.lr": 0.01}, "new": {"train.lr": 0.008}}]
    data["stop_message"] = "the time budget (tune.time_budget_s=5s) ended the search"
    (run / "trainyard_trials.json").write_text(json.dumps(data))
    page = write_report(run).read_text()
    assert '<table id="exploits">' in page and "train.lr: 0.01 → 0.008" in page
    assert "1970-01-01 00:00:00 UTC" in page
    assert "1 stopped early" not in page and "1 never started" in page and "never reported an epoch" in page
    assert "<p>the time budget (tune.time_budget_s=5s) ended the search.</p>" in page


def test_report_output_that_is_a_folder_missing_or_someone_else_s_file_is_refused(tmp_path):
    from trainyard.errors import TrainyardError

    run = _run(tmp_path, [_trial("t0", {"train.lr": 0.1}, 0.9)])
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    for output, message in ((tmp_path, "is a folder; give a file"),
                            (tmp_path / "nowhere" / "r.html", "does not exist"),
                            (data, "exists and is not an HTML file; the report does not overwrite it")):
        with pytest.raises(TrainyardError, match=message):
            write_report(run, output)
    assert data.read_text() == "a,b\n1,2\n"
    page = tmp_path / "mine.html"
    assert write_report(run, page) == page and "<html" in page.read_text()[:200].lower()
    assert write_report(run, page) == page  # an HTML report is rewritten
    with pytest.raises(TrainyardError, match=r"nope: no such folder$"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainyardError, match=r"is not a finished trainyard tuning run \(no trainyard_trials.json\)"):
        write_report(tmp_path / "empty")
