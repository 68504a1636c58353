"""``trainyard report RUN``: one self-contained HTML file for a tuning run.

Plots are inline SVG, drawn here, so the file opens offline in any browser with nothing
else next to it. Every value read from the run (trial ids, params, states, errors, names,
paths) goes through :func:`_e` (``html.escape``, quotes included) before it reaches the page:
a param value or an error message holding markup shows as text and never runs.

For a classification run the page also shows the winner's confusion matrix on its
validation split: the winner's checkpoint is loaded on the CPU and the job's dataset
loaded and split as in training. When that cannot be done here (a regression task, no
winner, a dataset or checkpoint not loadable on this machine) one line says why instead.
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


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


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
    vals = [h[metric] for t in series for h in t["history"] if _finite(h.get(metric))]
    if not vals:  # a metric that was NaN at every epoch (say roc_auc, a class missing)
        return ""
    fx, xr = _scale(its, False, PAD, WIDTH - PAD)
    fy, yr = _scale(vals, False, HEIGHT - PAD, PAD)
    lines = []
    for i, t in enumerate(series):
        pts = " ".join(f"{fx(h['iteration']):.1f},{fy(h[metric]):.1f}" for h in t["history"]
                       if _finite(h.get(metric)))
        dash = ' stroke-dasharray="5,3"' if t["state"] == "STOPPED" else ""
        lines.append(
            f'<polyline points="{pts}" fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="2"{dash}>'
            f'<title>{_e(t["trial_id"])} ({_e(str(t["state"]).lower())})</title></polyline>'
        )
    return _frame(f"learning curves: {metric} per epoch (dashed: stopped early by the scheduler)",
                  "epoch", metric, xr, yr, False, "".join(lines))


# --------------------------------------------------------------------------------------
# The winner's confusion matrix
# --------------------------------------------------------------------------------------


class _NoMatrix(Exception):
    """Why the confusion matrix cannot be shown: the panel's one line."""


def _why(exc: BaseException) -> str:
    """An exception as one short line."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def validation_split(checkpoint: str | Path) -> Any:
    """The validation split of a checkpoint's job, as training held it out: its
    ``job.yaml`` resolved, the dataset loaded and split with the job's seed."""
    from trainyard.config import load_config, resolve
    from trainyard.train.data import split_validation

    job = resolve(load_config(Path(checkpoint) / "job.yaml"))
    data = job.dataset.load(job.data_params, job.config.seed)
    if data.val is not None:
        return data.val
    return split_validation(data, job.config.data.val_fraction, job.config.seed)[1]


def winner_confusion(checkpoint: str | Path, batch: int = 512) -> tuple[list[str], Any]:
    """``(classes, matrix)``: scikit-learn's confusion matrix (rows true, columns predicted,
    in the order of the checkpoint's classes) of the checkpoint's predictions on its
    validation split, predicted on the CPU. Raises :class:`_NoMatrix` saying why not."""
    from trainyard.hookspecs import DataInfo

    folder = Path(checkpoint)
    if "://" in str(checkpoint) or not folder.is_dir():
        raise _NoMatrix(f"the winner's checkpoint {checkpoint} is not a folder on this machine")
    try:
        info = DataInfo.from_dict(json.loads((folder / "data_info.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise _NoMatrix(f"the winner's checkpoint has no readable data_info.json ({_why(exc)})") from None
    if info.task != "classification":
        raise _NoMatrix(f"the task is {info.task}, not classification")
    if not info.classes:
        raise _NoMatrix("the winner's checkpoint names no classes")
    try:
        val = validation_split(folder)
    except Exception as exc:  # noqa: BLE001 - a plugin's or the data's error, shown as the reason
        raise _NoMatrix(f"the validation data could not be loaded here ({_why(exc)})") from None
    if len(val) == 0:
        raise _NoMatrix("the validation split is empty")
    try:
        import numpy as np

        from trainyard.checkpoint import load_predictor

        predictor = load_predictor(folder, device="cpu")
        preds = []
        for start in range(0, len(val), batch):
            outputs = predictor.forward(val.inputs[start:start + batch])
            preds.append(outputs.detach().float().cpu().numpy().argmax(axis=1))
        predicted = np.concatenate(preds)
    except Exception as exc:  # noqa: BLE001 - the model plugin's error, shown as the reason
        raise _NoMatrix(f"the winner could not predict its validation split here ({_why(exc)})") from None
    from sklearn.metrics import confusion_matrix

    labels = list(range(len(info.classes)))
    return list(info.classes), confusion_matrix(np.asarray(val.targets).astype(np.int64), predicted,
                                                labels=labels)


def confusion_table(classes: list[str], matrix: Any) -> str:
    """The matrix as an HTML table (``id="confusion"``): one row per true class, one column
    per predicted class, each cell a count shaded by its share of the row."""
    head = "".join(f'<th class="pred">{_e(c)}</th>' for c in classes)
    rows = []
    for i, name in enumerate(classes):
        total = int(matrix[i].sum())
        cells = []
        for j, count in enumerate(matrix[i]):
            count = int(count)
            share = count / total if total else 0.0
            color = "#2ca02c" if i == j else "#1f77b4"
            text = "#fff" if share > 0.6 else "#000"
            style = f"background:{color}{round(share * 255):02x};color:{text}" if count else ""
            cells.append(
                f'<td class="cm" style="{style}" title="true {_e(name)}, predicted {_e(classes[j])}: '
                f'{count} of {total} ({share:.0%})">{count}</td>'
            )
        rows.append(f'<tr><th class="true">{_e(name)}</th>{"".join(cells)}<td>{total}</td></tr>')
    return (
        '<table id="confusion"><tr><th>true \\ predicted</th>' + head + "<th>total</th></tr>"
        + "".join(rows) + "</table>"
    )


def confusion_panel(winners: list[dict]) -> str:
    """The winner's confusion matrix with a caption, or one line saying why there is none."""
    try:
        if not winners:
            raise _NoMatrix("no trial finished, so there is no winner")
        w = winners[0]
        classes, matrix = winner_confusion(w["path"])
    except _NoMatrix as why:
        return f'<p class="why">No confusion matrix: {_e(why)}.</p>'
    except Exception as exc:  # noqa: BLE001 - the report is written whatever the panel meets
        return f'<p class="why">No confusion matrix: {_e(_why(exc))}.</p>'
    n = int(matrix.sum())
    correct = int(matrix.trace())
    return (
        f"<p>Trial <b>{_e(w['trial_id'])}</b> on its validation split: {n} examples, "
        f"{correct} correct ({correct / n:.1%}). Rows: the true class; columns: the predicted "
        "class; shade: share of the row.</p>" + confusion_table(classes, matrix)
    )


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
    confusion = confusion_panel(winners)
    stopped = sum(t["state"] == "STOPPED" for t in trials)
    failed = sum(t["state"] == "ERROR" for t in trials)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>trainyard report: {_e(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1150px}}figure{{display:inline-block;margin:0 1em 1em 0}}
figcaption{{font-weight:bold;margin-bottom:4px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>Tuning run {_e(run_dir.name)}</h1>
<p>{len(trials)} trials; metric <b>{_e(metric)}</b> ({_e(data['mode'])}); {stopped} stopped early by the scheduler; {failed} failed.</p>
<h2>Winner</h2>{winner_html}
<h2>Confusion matrix of the winner</h2>{confusion}
<h2>Metric against the hyperparameters</h2>{''.join(charts)}
<h2>Trials</h2><table><tr>{''.join(f'<th>{_e(h)}</th>' for h in ['trial', *keys, 'epochs', 'best', 'final', 'state', 'note'])}</tr>
{''.join(rows)}</table>
<p>TensorBoard logs: <code>tensorboard --logdir {_e(run_dir.resolve())}</code></p>
</body></html>"""
    out = Path(output) if output else run_dir / "report.html"
    out.write_text(page)
    return out
