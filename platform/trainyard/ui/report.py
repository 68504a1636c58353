"""``trainyard report RUN``: one self-contained HTML file for a tuning run.

Plots are inline SVG, drawn here, so the file opens offline in any browser with nothing
else next to it. Every value read from the run (trial ids, params, states, errors, names,
paths) goes through :func:`_e` (``html.escape``, quotes included) before it reaches the page:
a param value or an error message holding markup shows as text and never runs.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from trainyard.errors import TrainyardError

WIDTH, HEIGHT, PAD = 520, 300, 48
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]


def _e(value: Any) -> str:
    """``value`` as HTML text, safe in element text and in quoted attribute values."""
    return html.escape(str(value), quote=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scale(values: list[float], log: bool, lo_px: float, hi_px: float):
    vals = [math.log10(v) for v in values] if log else list(values)
    lo, hi = min(vals), max(vals)
    if hi == lo:
        lo, hi = lo - 1, hi + 1

    def f(v: float) -> float:
        v = math.log10(v) if log else v
        return lo_px + (v - lo) / (hi - lo) * (hi_px - lo_px)

    return f, (lo, hi)


def _axis_label(v: float, log: bool) -> str:
    value = 10 ** v if log else v
    return f"{value:.2g}"


def _frame(title: str, xlabel: str, ylabel: str, xr, yr, xlog: bool, body: str) -> str:
    ticks = []
    for i in range(5):
        fx = xr[0] + (xr[1] - xr[0]) * i / 4
        fy = yr[0] + (yr[1] - yr[0]) * i / 4
        x = PAD + (WIDTH - 2 * PAD) * i / 4
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * i / 4
        ticks.append(f'<text x="{x:.1f}" y="{HEIGHT - PAD + 16}" text-anchor="middle">{_axis_label(fx, xlog)}</text>')
        ticks.append(f'<text x="{PAD - 6}" y="{y + 4:.1f}" text-anchor="end">{fy:.3g}</text>')
        ticks.append(f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
    return (
        f'<figure><figcaption>{_e(title)}</figcaption>'
        f'<svg width="{WIDTH}" height="{HEIGHT}" font-size="11" font-family="sans-serif">'
        + "".join(ticks)
        + f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="none" stroke="#999"/>'
        + body
        + f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">{_e(xlabel)}</text>'
        + f'<text x="12" y="{HEIGHT / 2}" transform="rotate(-90 12 {HEIGHT / 2})" text-anchor="middle">{_e(ylabel)}</text>'
        + "</svg></figure>"
    )


def scatter(trials: list[dict], key: str, metric: str) -> str:
    points = [(t["params"][key], t["best"], t) for t in trials
              if _number(t["params"].get(key)) and _number(t["best"])]
    if not points:
        return ""
    xs = [p[0] for p in points]
    log = min(xs) > 0 and max(xs) / min(xs) > 20
    fx, xr = _scale(xs, log, PAD, WIDTH - PAD)
    fy, yr = _scale([p[1] for p in points], False, HEIGHT - PAD, PAD)
    dots = "".join(
        f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="5" fill="{"#d62728" if t["state"] == "STOPPED" else "#1f77b4"}" '
        f'opacity="0.8"><title>{_e(t["trial_id"])}: {_e(key)}={x:.4g}, {_e(metric)}={y:.4f} ({_e(str(t["state"]).lower())})</title></circle>'
        for x, y, t in points
    )
    return _frame(f"best {metric} against {key}", key + (" (log)" if log else ""), metric, xr, yr, log, dots)


def curves(trials: list[dict], metric: str) -> str:
    series = [t for t in trials if t["history"]]
    if not series:
        return ""
    its = [h["iteration"] for t in series for h in t["history"]]
    vals = [h[metric] for t in series for h in t["history"] if not math.isnan(h[metric])]
    fx, xr = _scale(its, False, PAD, WIDTH - PAD)
    fy, yr = _scale(vals, False, HEIGHT - PAD, PAD)
    lines = []
    for i, t in enumerate(series):
        pts = " ".join(f"{fx(h['iteration']):.1f},{fy(h[metric]):.1f}" for h in t["history"])
        dash = ' stroke-dasharray="5,3"' if t["state"] == "STOPPED" else ""
        lines.append(
            f'<polyline points="{pts}" fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="2"{dash}>'
            f'<title>{_e(t["trial_id"])} ({_e(str(t["state"]).lower())})</title></polyline>'
        )
    return _frame(f"learning curves: {metric} per epoch (dashed: stopped early by the scheduler)",
                  "epoch", metric, xr, yr, False, "".join(lines))


def write_report(run: str | Path, output: str | Path | None = None) -> Path:
    run_dir = Path(run).expanduser()
    data_file = run_dir / "trainyard_trials.json"
    if not data_file.is_file():
        raise TrainyardError(f"{run_dir} is not a finished trainyard tuning run (no trainyard_trials.json)")
    data = json.loads(data_file.read_text())
    trials, metric, winners = data["trials"], data["metric"], data["winners"]
    keys = list(trials[0]["params"]) if trials else []
    charts = [scatter(trials, k, metric) for k in keys] + [curves(trials, metric)]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return _e(v) if v is not None else "-"

    rows = []
    ordered = sorted(trials, key=lambda t: (t["best"] is None, -(t["best"] or 0) if data["mode"] == "max" else (t["best"] or 0)))
    for t in ordered:
        note = {"STOPPED": "stopped early by the scheduler", "ERROR": t["error"], "TERMINATED": "ran all epochs"}
        rows.append("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in [
            t["trial_id"], *[t["params"].get(k) for k in keys], t["iterations"], t["best"], t["final"],
            str(t["state"]).lower(), note.get(t["state"], "")]) + "</tr>")
    winner_html = "<p>No trial finished.</p>"
    if winners:
        w = winners[0]
        job = Path(w["path"], "job.yaml")
        config = job.read_text() if job.is_file() else "(config not found)"
        value = f"{w['value']:.4f}" if _number(w["value"]) else _e(w["value"])
        winner_html = (
            f"<p>Trial <b>{_e(w['trial_id'])}</b>: {_e(metric)} = <b>{value}</b>, "
            f"exported to <code>{_e(w['path'])}</code>.</p><pre>{_e(config)}</pre>"
        )
    stopped = sum(t["state"] == "STOPPED" for t in trials)
    failed = sum(t["state"] == "ERROR" for t in trials)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>trainyard report: {_e(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1150px}}figure{{display:inline-block;margin:0 1em 1em 0}}
figcaption{{font-weight:bold;margin-bottom:4px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>Tuning run {_e(run_dir.name)}</h1>
<p>{len(trials)} trials; metric <b>{_e(metric)}</b> ({_e(data['mode'])}); {stopped} stopped early by the scheduler; {failed} failed.</p>
<h2>Winner</h2>{winner_html}
<h2>Metric against the hyperparameters</h2>{''.join(charts)}
<h2>Trials</h2><table><tr>{''.join(f'<th>{_e(h)}</th>' for h in ['trial', *keys, 'epochs', 'best', 'final', 'state', 'note'])}</tr>
{''.join(rows)}</table>
<p>TensorBoard logs: <code>tensorboard --logdir {_e(run_dir.resolve())}</code></p>
</body></html>"""
    out = Path(output) if output else run_dir / "report.html"
    out.write_text(page)
    return out
