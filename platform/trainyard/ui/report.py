"""``trainyard report RUN``: one self-contained HTML file for a tuning run.

Plots are inline SVG, drawn here, so the file opens offline in any browser with nothing
else next to it, and the page holds no script at all (its Content-Security-Policy forbids
one). Every value read from the run (trial ids, params, states, errors, names, paths)
goes through :func:`_e` (``html.escape``, quotes included) before it reaches the page: a
param value or an error message holding markup shows as text and never runs.

The axes follow the search space the run saved in ``trainyard_tune.yaml``: a log scale
only for the log-sampled kinds (``loguniform``), categories (the values tried, in the
space's order) for ``choice`` and ``grid``, a linear scale for the rest (``uniform``,
``randint``). A run folder without that file gets linear axes for numbers and
categories for anything else.

The page's panels, each a ``<section class="panel">``:

* the winner and its config; the winner's confusion matrix on its validation split (for a
  classification run: the checkpoint is loaded on the CPU and the job's dataset loaded and
  split as in training; when that cannot be done here one line says why instead);
* hyperparameter importance: Optuna's fANOVA evaluator on the finished trials' best
  values, the trials replayed into an in-memory Optuna study;
* parallel coordinates: one line per trial across the params and the metric, colored by
  the metric, the winner in red;
* learning curves of every trial, the winner's highlighted;
* the metric against each param;
* PBT's exploits, when the run folder has ``exploits.jsonl``;
* the table of trials.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainyard.errors import TrainyardError
from trainyard.runtime.storage import atomic_write_text

WIDTH, HEIGHT, PAD = 520, 300, 48
#: Space kinds sampled on a log scale: drawn on a log axis. Every other numeric kind is linear.
LOG_KINDS = ("loguniform", "qloguniform")
#: Space kinds whose values are a list: drawn as categories, the values tried as ticks.
CATEGORY_KINDS = ("choice", "grid")
WINNER = "#d62728"
#: viridis, worst to best
RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]
#: No script, no fetch: inline styles and SVG only.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(value: Any) -> str:
    """``value`` as HTML text, safe in element text and in quoted attribute values."""
    return html.escape(str(value), quote=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if _number(value):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _ramp(frac: float) -> str:
    """The color of ``frac`` (0 worst .. 1 best) on the viridis ramp."""
    frac = min(max(frac, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(frac), len(RAMP) - 2)
    t = frac - i
    a, b = RAMP[i], RAMP[i + 1]
    rgb = [round(int(a[k:k + 2], 16) * (1 - t) + int(b[k:k + 2], 16) * t) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


# --------------------------------------------------------------------------------------
# Axes that follow the search space
# --------------------------------------------------------------------------------------


def _category_key(value: Any) -> str:
    """One category per distinct value (a list value included), as a string."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    for i in range(first, first + n + 2):
        v = i * step
        if v > hi + step * 1e-9:
            break
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks (as values) for a log axis spanning 10**lo .. 10**hi."""
    mantissas = (1,) if hi - lo >= 2 else (1, 2, 5)
    ticks = [m * 10.0 ** k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in mantissas]
    inside = [v for v in ticks if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
    if len(inside) < 2:
        inside = sorted({10 ** lo, *inside, 10 ** hi})
    return inside


@dataclass
class Axis:
    """One param's (or the metric's) axis: ``scale`` is log, linear or category."""

    name: str
    scale: str
    kind: str = ""  # the space's type, when known
    lo: float = 0.0  # the domain, log10 for a log axis
    hi: float = 1.0
    categories: list[tuple[str, str]] = field(default_factory=list)  # (key, label)
    integer: bool = False  # whole numbers only: ticks at whole numbers

    @classmethod
    def numeric(cls, name: str, values: list[float], log: bool, kind: str = "",
                integer: bool = False) -> Axis:
        vals = [math.log10(v) for v in values] if log else list(values)
        lo, hi = min(vals), max(vals)
        if hi == lo:
            pad = 0.5 if log else (abs(lo) * 0.1 or 1.0)
            lo, hi = lo - pad, hi + pad
        return cls(name, "log" if log else "linear", kind, lo, hi, integer=integer)

    def frac(self, value: Any) -> float | None:
        """Where ``value`` lies along the axis, 0..1; None where it has no place on it."""
        if self.scale == "category":
            keys = [k for k, _ in self.categories]
            key = _category_key(value)
            return (keys.index(key) + 0.5) / len(keys) if key in keys else None
        if not _finite(value) or (self.scale == "log" and value <= 0):
            return None
        v = math.log10(value) if self.scale == "log" else value
        return (v - self.lo) / (self.hi - self.lo)

    def ticks(self) -> list[tuple[float, str]]:
        if self.scale == "category":
            n = len(self.categories)
            return [((i + 0.5) / n, label) for i, (_, label) in enumerate(self.categories)]
        if self.scale == "log":
            return [(self.frac(v), f"{v:.3g}") for v in _log_ticks(self.lo, self.hi)]
        return [(self.frac(v), f"{v:.4g}") for v in _nice_ticks(self.lo, self.hi, integer=self.integer)]

    def padded(self, share: float = 0.05) -> Axis:
        """The axis with its domain widened by ``share`` at each end, so that marks at the
        extremes are not cut by the frame; a category axis already has its half-steps."""
        if self.scale == "category":
            return self
        pad = (self.hi - self.lo) * share
        return Axis(self.name, self.scale, self.kind, self.lo - pad, self.hi + pad, integer=self.integer)

    @property
    def title(self) -> str:
        return self.name + {"log": " (log)", "category": ""}.get(self.scale, "")


def read_space(run_dir: Path) -> dict[str, dict]:
    """The search space the run saved (``tune.space`` of ``trainyard_tune.yaml``): config
    key -> ``{"type", "low", "high", "values"}``; empty when the file is missing or unreadable."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "trainyard_tune.yaml").read_text(encoding="utf-8"))
        space = saved["tune"]["space"]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return {}
    if not isinstance(space, dict):
        return {}
    return {str(k): v for k, v in space.items() if isinstance(v, dict)}


def _short(value: Any, limit: int = 24) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def param_axis(key: str, tried: list[Any], dim: dict | None) -> Axis:
    """The axis of param ``key``: its space dimension's kind decides the scale; the domain
    covers the space's bounds and every value tried (a PBT mutation may leave them)."""
    dim = dim or {}
    kind = str(dim.get("type") or "")
    present = [v for v in tried if v is not None]
    numeric = bool(present) and all(_finite(v) for v in present)
    if kind in CATEGORY_KINDS or not numeric or (not kind and not present):
        order = [*(dim.get("values") or []), *present]
        seen = {_category_key(v) for v in present}
        categories: dict[str, str] = {}
        for v in order:
            k = _category_key(v)
            if k in seen and k not in categories:
                categories[k] = _short(v)
        return Axis(key, "category", kind, categories=list(categories.items()) or [("null", "-")])
    bounds = [float(dim[b]) for b in ("low", "high") if _finite(dim.get(b))]
    if kind == "randint" and len(bounds) == 2:
        bounds[1] -= 1  # randint's high is exclusive
    values = [*present, *bounds]
    log = kind in LOG_KINDS and all(v > 0 for v in values)
    integer = kind == "randint" or all(isinstance(v, int) for v in present)
    return Axis.numeric(key, values, log, kind, integer)


def param_axes(trials: list[dict], space: dict[str, dict]) -> list[Axis]:
    """One axis per param: the space's keys in order, then any other key a trial holds."""
    keys = list(space)
    for t in trials:
        keys += [k for k in t["params"] if k not in keys]
    return [param_axis(k, [t["params"].get(k) for t in trials], space.get(k)) for k in keys]


def metric_axis(metric: str, trials: list[dict]) -> Axis | None:
    values = [t["best"] for t in trials if _finite(t["best"])]
    return Axis.numeric(metric, values, False) if values else None


class _Colors:
    """A trial's color by its best value: the ramp from the worst (dark) to the best
    (yellow) under the run's mode; grey for a trial without a value."""

    def __init__(self, trials: list[dict], mode: str):
        values = [t["best"] for t in trials if _finite(t["best"])]
        self.lo, self.hi = (min(values), max(values)) if values else (0.0, 1.0)
        self.mode = mode

    def __call__(self, trial: dict) -> str:
        if not _finite(trial["best"]):
            return "#999999"
        frac = 0.5 if self.hi == self.lo else (trial["best"] - self.lo) / (self.hi - self.lo)
        return _ramp(frac if self.mode != "min" else 1 - frac)


def _why_line(text: str) -> str:
    return f'<p class="why">{_e(text)}</p>'


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _axis_group(axis: Axis, x0: float, y0: float, length: float, vertical: bool,
                role: str, grid_to: float | None = None) -> str:
    """An axis as ``<g class="axis">`` naming its param and scale, with its ticks; a
    vertical axis runs upwards from (x0, y0)."""
    parts = [f'<g class="axis {role}" data-param="{_e(axis.name)}" data-scale="{axis.scale}">']
    if vertical:
        parts.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{y0:.1f}" y2="{y0 - length:.1f}" stroke="#555"/>')
    else:
        parts.append(f'<line x1="{x0:.1f}" x2="{x0 + length:.1f}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#555"/>')
    for frac, label in axis.ticks():
        if frac is None or not -0.001 <= frac <= 1.001:
            continue
        if vertical:
            y = y0 - frac * length
            if grid_to is not None:
                parts.append(f'<line x1="{x0:.1f}" x2="{grid_to:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            parts.append(f'<line x1="{x0 - 4:.1f}" x2="{x0:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555"/>')
            parts.append(f'<text class="tick" x="{x0 - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">{_e(label)}</text>')
        else:
            x = x0 + frac * length
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0:.1f}" y2="{y0 + 4:.1f}" stroke="#555"/>')
            parts.append(f'<text class="tick" x="{x:.1f}" y="{y0 + 16:.1f}" text-anchor="middle">{_e(label)}</text>')
    parts.append("</g>")
    return "".join(parts)


def _svg(width: float, height: float, body: str, cls: str) -> str:
    return (f'<svg class="{cls}" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'font-size="11" font-family="sans-serif" role="img">{body}</svg>')


def _xy_plot(caption: str, cls: str, xaxis: Axis, yaxis: Axis, body_fn) -> str:
    """A plot of ``yaxis`` against ``xaxis``; ``body_fn(fx, fy)`` draws the marks, given
    the two axes' value -> pixel functions (None where a value has no place)."""
    left, right, top, bottom = PAD + 10, WIDTH - 16, 16, HEIGHT - PAD
    w, h = right - left, bottom - top
    xaxis, yaxis = xaxis.padded(), yaxis.padded()

    def fx(v):
        f = xaxis.frac(v)
        return None if f is None else left + f * w

    def fy(v):
        f = yaxis.frac(v)
        return None if f is None else bottom - f * h

    body = (
        _axis_group(yaxis, left, bottom, h, True, "y", grid_to=right)
        + _axis_group(xaxis, left, bottom, w, False, "x")
        + body_fn(fx, fy)
        + f'<text x="{(left + right) / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{_e(xaxis.title)}</text>'
        + f'<text x="12" y="{(top + bottom) / 2:.1f}" transform="rotate(-90 12 {(top + bottom) / 2:.1f})" '
          f'text-anchor="middle">{_e(yaxis.title)}</text>'
    )
    return f'<figure><figcaption>{_e(caption)}</figcaption>{_svg(WIDTH, HEIGHT, body, cls)}</figure>'


def scatter(trials: list[dict], axis: Axis, metric: Axis, winner: str | None) -> str:
    """The best metric of each trial against one param. Categories are spread a little
    sideways so that trials with the same value stay apart."""
    points = [(t, t["params"].get(axis.name)) for t in trials if _finite(t["best"])]
    points = [(t, x) for t, x in points if axis.frac(x) is not None]
    if not points:
        return ""

    def body(fx, fy):
        marks = []
        band = (WIDTH - PAD - 26) / max(len(axis.categories), 1)
        ordered = sorted(enumerate(points), key=lambda p: p[1][0]["trial_id"] == winner)
        for i, (t, x) in ordered:
            cx, cy = fx(x), fy(t["best"])
            if axis.scale == "category":
                cx += ((i * 0.618034) % 1 - 0.5) * min(band * 0.5, 40)
            won = t["trial_id"] == winner
            fill = WINNER if won else ("#ff7f0e" if t["state"] == "STOPPED" else "#1f77b4")
            extra = ' r="7" stroke="#000" stroke-width="1.5"' if won else ' r="5" opacity="0.8"'
            marks.append(
                f'<circle class="trial{" winner" if won else ""}" data-trial="{_e(t["trial_id"])}" '
                f'cx="{cx:.1f}" cy="{cy:.1f}" fill="{fill}"{extra}><title>{_e(t["trial_id"])}: '
                f'{_e(axis.name)}={_e(_fmt(x))}, {_e(metric.name)}={t["best"]:.4f} '
                f'({_e(str(t["state"]).lower())}{", winner" if won else ""})</title></circle>'
            )
        return "".join(marks)

    return _xy_plot(f"best {metric.name} against {axis.name} (red: the winner; orange: stopped early)",
                    "scatter", axis, metric, body)


def parallel_coordinates(trials: list[dict], axes: list[Axis], metric: Axis | None,
                         colors: _Colors, winner: str | None, mode: str) -> str:
    """One polyline per trial through one vertical axis per param and, last, the metric's;
    colored by the metric, the winner in red on top. A failed trial (no metric) is grey
    and dashed, and stops at the last param."""
    if not trials or not axes:
        return _why_line("No parallel coordinates: no trials, or no params.")
    columns = [*axes, *([metric] if metric else [])]
    width = min(1100.0, max(WIDTH, 150.0 * len(columns) + 60))
    height, top, bottom = 360.0, 40.0, 320.0
    left, right = 70.0, width - 70.0
    step = (right - left) / max(len(columns) - 1, 1)
    xs = [left + i * step for i in range(len(columns))] if len(columns) > 1 else [(left + right) / 2]
    parts = []
    for x, axis in zip(xs, columns):
        role = "metric" if metric is not None and axis is metric else "param"
        parts.append(_axis_group(axis, x, bottom, bottom - top, True, role))
        parts.append(f'<text class="axis-title" x="{x:.1f}" y="{top - 14:.1f}" text-anchor="middle" '
                     f'font-weight="bold">{_e(axis.title)}</text>')
    ordered = sorted(trials, key=lambda t: (t["trial_id"] == winner, _finite(t["best"])))
    for t in ordered:
        pts = []
        for x, axis in zip(xs, columns):
            value = t["best"] if metric is not None and axis is metric else t["params"].get(axis.name)
            frac = axis.frac(value)
            if frac is not None:
                pts.append(f"{x:.1f},{bottom - frac * (bottom - top):.1f}")
        won = t["trial_id"] == winner
        style = (f'stroke="{WINNER}" stroke-width="4"' if won else
                 f'stroke="{colors(t)}" stroke-width="2" opacity="0.85"')
        if not _finite(t["best"]):
            style += ' stroke-dasharray="4,3"'
        summary = ", ".join(f"{a.name}={_fmt(t['params'].get(a.name))}" for a in axes)
        value = f"{t['best']:.4f}" if _finite(t["best"]) else "no value"
        parts.append(
            f'<polyline class="trial{" winner" if won else ""}" data-trial="{_e(t["trial_id"])}" '
            f'points="{" ".join(pts)}" fill="none" {style}><title>{_e(t["trial_id"])} '
            f'({_e(str(t["state"]).lower())}{", winner" if won else ""}): {_e(summary)}; '
            f'{_e(metric.name if metric else "metric")} {value}</title></polyline>'
        )
    legend = (
        '<defs><linearGradient id="ramp">'
        + "".join(f'<stop offset="{i / (len(RAMP) - 1):.2f}" stop-color="{c}"/>' for i, c in enumerate(RAMP))
        + '</linearGradient></defs>'
        f'<rect x="{left:.1f}" y="{height - 22:.1f}" width="120" height="10" fill="url(#ramp)"/>'
        f'<text x="{left + 126:.1f}" y="{height - 13:.1f}">worst → best {_e(metric.name if metric else "")} '
        f'({_e(mode)}); red: the winner; grey dashed: failed</text>'
    )
    return ('<figure><figcaption>parallel coordinates: every trial across the params and its best '
            f'{_e(metric.name if metric else "metric")}</figcaption>'
            + _svg(width, height, legend + "".join(parts), "parallel") + "</figure>")


def curves(trials: list[dict], metric: str, winner: str | None = None, colors: _Colors | None = None,
           exploits: list[dict] | None = None) -> str:
    """Every trial's metric per epoch, the winner's thick and red on top (dashed: stopped
    early); a PBT exploit is a black-ringed dot on the trial's curve."""
    series = [t for t in trials if any(_finite(h.get(metric)) for h in t["history"])]
    if not series:
        return ""
    its = [h["iteration"] for t in series for h in t["history"]]
    vals = [h[metric] for t in series for h in t["history"] if _finite(h.get(metric))]
    xaxis = Axis.numeric("epoch", its, False, integer=True)
    yaxis = Axis.numeric(metric, vals, False)
    colors = colors or _Colors(trials, "max")

    def body(fx, fy):
        lines = []
        for t in sorted(series, key=lambda t: t["trial_id"] == winner):
            won = t["trial_id"] == winner
            pts = " ".join(f"{fx(h['iteration']):.1f},{fy(h[metric]):.1f}" for h in t["history"]
                           if _finite(h.get(metric)))
            dash = ' stroke-dasharray="5,3"' if t["state"] == "STOPPED" else ""
            style = (f'stroke="{WINNER}" stroke-width="3.5"' if won
                     else f'stroke="{colors(t)}" stroke-width="1.6" opacity="0.75"')
            lines.append(
                f'<polyline class="trial{" winner" if won else ""}" data-trial="{_e(t["trial_id"])}" '
                f'points="{pts}" fill="none" {style}{dash}><title>{_e(t["trial_id"])} '
                f'({_e(str(t["state"]).lower())}{", winner" if won else ""})</title></polyline>'
            )
            points = [h for h in t["history"] if _finite(h.get(metric))]
            if len(points) == 1:  # one epoch: a line of one point draws nothing, so a dot
                lines.append(
                    f'<circle class="trial{" winner" if won else ""}" data-trial="{_e(t["trial_id"])}" '
                    f'cx="{fx(points[0]["iteration"]):.1f}" cy="{fy(points[0][metric]):.1f}" r="3.5" '
                    f'fill="{WINNER if won else colors(t)}"><title>{_e(t["trial_id"])} '
                    f'({_e(str(t["state"]).lower())})</title></circle>'
                )
            if won:
                last = [h for h in t["history"] if _finite(h.get(metric))][-1]
                x, y = fx(last["iteration"]), fy(last[metric])
                anchor = "end" if x > WIDTH / 2 else "start"
                lines.append(f'<text class="winner-label" x="{x:.1f}" y="{y - 8:.1f}" text-anchor="{anchor}" '
                             f'fill="{WINNER}" font-weight="bold">winner {_e(t["trial_id"])}</text>')
        by_id = {t["trial_id"]: t for t in series}
        for ex in exploits or []:
            t = by_id.get(ex.get("trial"))
            point = next((h for h in t["history"] if h["iteration"] == ex.get("epoch")
                          and _finite(h.get(metric))), None) if t else None
            if point:
                lines.append(
                    f'<circle class="exploit" cx="{fx(point["iteration"]):.1f}" cy="{fy(point[metric]):.1f}" '
                    f'r="4" fill="#fff" stroke="#000" stroke-width="1.5"><title>{_e(ex.get("trial"))} '
                    f'copied {_e(ex.get("from_trial"))} at epoch {_e(ex.get("epoch"))}</title></circle>'
                )
        return "".join(lines)

    caption = f"learning curves: {metric} per epoch, the winner in red (dashed: stopped early)"
    if exploits:
        caption += "; ringed dots: PBT exploits"
    return _xy_plot(caption, "curves", xaxis, yaxis, body)


# --------------------------------------------------------------------------------------
# Hyperparameter importance
# --------------------------------------------------------------------------------------


def param_importances(trials: list[dict], axes: list[Axis], mode: str) -> dict[str, float]:
    """Each param's importance to the best metric (they sum to 1), by Optuna's fANOVA
    evaluator (a random forest, seeded) on the finished trials, those with a finite best
    value (a trial stopped early by the scheduler included, a failed one not), replayed into
    an in-memory Optuna study with distributions from the axes. A param that took one value
    only scores 0. Raises ValueError saying why there is nothing to compute."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    finished = [t for t in trials if t["state"] != "ERROR" and _finite(t["best"])]
    if len(finished) < 2:
        raise ValueError(f"it needs at least 2 finished trials, and {len(finished)} finished")
    if len({t["best"] for t in finished}) == 1:
        raise ValueError(f"all {len(finished)} finished trials scored the same")
    if not axes:
        raise ValueError("the run has no params")
    distributions, encoders = {}, {}
    for axis in axes:
        values = [t["params"].get(axis.name) for t in finished]
        if axis.scale == "category":
            keys = [k for k, _ in axis.categories]
            distributions[axis.name] = CategoricalDistribution(keys)
            encoders[axis.name] = lambda v, keys=keys: _category_key(v) if _category_key(v) in keys else None
        else:
            nums = [float(v) for v in values if _finite(v)]
            if not nums:
                continue
            log = axis.scale == "log"
            distributions[axis.name] = FloatDistribution(min(nums), max(nums), log=log)
            encoders[axis.name] = lambda v: float(v) if _finite(v) else None
    built = []
    for t in finished:
        params, dists = {}, {}
        for name, dist in distributions.items():
            value = encoders[name](t["params"].get(name))
            if value is not None:
                params[name], dists[name] = value, dist
        built.append(optuna.trial.create_trial(params=params, distributions=dists, value=float(t["best"])))
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
            study.add_trials(built)
            result = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    finally:
        optuna.logging.set_verbosity(level)
    if not result:
        raise ValueError("no param is present in every finished trial")
    return {k: float(v) for k, v in result.items()}


#: Below this many finished trials the importance panel says its figures are a rough guide.
FEW_TRIALS = 10


def importance_panel(trials: list[dict], axes: list[Axis], mode: str, metric: str) -> str:
    try:
        scores = param_importances(trials, axes, mode)
    except ValueError as why:
        return _why_line(f"No hyperparameter importance: {why}.")
    except Exception as exc:  # noqa: BLE001 - the report is written whatever the panel meets
        return _why_line(f"No hyperparameter importance: {_why(exc)}.")
    finished = sum(t["state"] != "ERROR" and _finite(t["best"]) for t in trials)
    label_w, bar_w, row = 200, 260, 26
    height = 20 + row * len(scores)
    top = max(scores.values()) or 1.0
    bars = []
    for i, (name, score) in enumerate(scores.items()):
        y = 10 + i * row
        w = max(bar_w * score / top, 1.0) if math.isfinite(score) else 1.0
        bars.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{_e(_short(name, 32))}</text>'
            f'<rect class="bar" data-param="{_e(name)}" x="{label_w}" y="{y + 3}" width="{w:.1f}" height="16" '
            f'fill="#1f77b4"><title>{_e(name)}: {score:.3f}</title></rect>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{score:.0%}</text>'
        )
    return (f'<figure><figcaption>importance of each param to the best {_e(metric)}: Optuna\'s fANOVA '
            f'on {finished} finished trials (failed ones left out); the shares sum to 100%'
            + (f'. A forest fitted to {finished} trials is a rough guide only' if finished < FEW_TRIALS else "")
            + '</figcaption>'
            + _svg(label_w + bar_w + 60, height, "".join(bars), "importance") + "</figure>")


# --------------------------------------------------------------------------------------
# PBT's exploits
# --------------------------------------------------------------------------------------

EXPLOITS_FILE = "exploits.jsonl"


def read_exploits(run_dir: Path, recorded: Any = None) -> tuple[list[dict], int] | None:
    """The exploits PBT recorded in ``exploits.jsonl`` (one JSON object a line: trial,
    from_trial, epoch, old, new, time; from_epoch where known) and how many lines could not
    be read. Without the file: ``recorded`` (the copy ``trainyard_trials.json`` keeps) when
    it holds any, else None."""
    path = run_dir / EXPLOITS_FILE
    if not path.is_file():
        if isinstance(recorded, list) and recorded:
            rows = [r for r in recorded if isinstance(r, dict)]
            return rows, len(recorded) - len(rows)
        return None
    rows, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return [], 1
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _when(value: Any) -> str:
    if _finite(value):
        try:
            return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):
            pass
    return _fmt(value)


def exploits_panel(exploits: list[dict], bad: int) -> str:
    """PBT's exploits as a table (``id="exploits"``): when, at which epoch, which trial
    copied which, and the params it changed (old -> new)."""
    if not exploits:
        text = "PBT recorded no exploit."
        return _why_line(text + (f" {bad} line(s) of {EXPLOITS_FILE} could not be read." if bad else ""))
    rows = []
    for ex in exploits:
        old = ex.get("old") if isinstance(ex.get("old"), dict) else {}
        new = ex.get("new") if isinstance(ex.get("new"), dict) else {}
        changed = [k for k in new if new.get(k) != old.get(k)] + [k for k in old if k not in new]
        change = "; ".join(f"{k}: {_fmt(old.get(k))} → {_fmt(new.get(k))}" for k in changed) or "no param changed"
        donor = _fmt(ex.get("from_trial"))
        if ex.get("from_epoch") is not None:
            donor += f" (its epoch {_fmt(ex.get('from_epoch'))})"
        rows.append(
            f'<tr data-trial="{_e(ex.get("trial"))}"><td>{_e(_when(ex.get("time")))}</td><td>{_e(_fmt(ex.get("epoch")))}</td>'
            f'<td>{_e(_fmt(ex.get("trial")))}</td><td>{_e(donor)}</td>'
            f'<td class="change">{_e(change)}</td></tr>'
        )
    note = f" {bad} line(s) could not be read." if bad else ""
    return (f"<p>{len(exploits)} exploit(s): a weak trial took a strong one's checkpoint and params, "
            f"then perturbed them.{_e(note)}</p>"
            '<table id="exploits"><tr><th>time</th><th>epoch</th><th>trial</th><th>copied from</th>'
            "<th>params (old → new)</th></tr>" + "".join(rows) + "</table>")


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
    if job.dataset.streaming:
        raise ValueError(f"dataset {job.dataset.name!r} is streamed by Ray Data; the report does "
                         "not read it again")
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



# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1150px}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
figcaption{font-weight:bold;margin-bottom:4px;max-width:520px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td.change{text-align:left}tr.winner td{background:#fde2e2}
pre{background:#f6f6f6;padding:1em}p.why{color:#555;font-style:italic}
svg .trial:hover{stroke-width:5;opacity:1}svg circle.trial:hover{stroke:#000;stroke-width:2}"""


def _panel(pid: str, title: str, body: str) -> str:
    return f'<section class="panel" id="panel-{pid}"><h2>{_e(title)}</h2>{body}</section>'


def write_report(run: str | Path, output: str | Path | None = None) -> Path:
    run_dir = Path(run).expanduser()
    data_file = run_dir / "trainyard_trials.json"
    if not run_dir.exists():
        raise TrainyardError(f"{run_dir}: no such folder")
    if not data_file.is_file():
        raise TrainyardError(f"{run_dir} is not a finished trainyard tuning run (no trainyard_trials.json)")
    out = Path(output).expanduser() if output else run_dir / "report.html"
    if out.is_dir():
        raise TrainyardError(f"-o: {out} is a folder; give a file, such as {out / 'report.html'}")
    if not out.parent.is_dir():
        raise TrainyardError(f"-o: the folder {out.parent} does not exist")
    if out.exists() and out.suffix.lower() not in (".html", ".htm"):
        raise TrainyardError(f"-o: {out} exists and is not an HTML file; the report does not overwrite it")
    data = json.loads(data_file.read_text())
    trials, metric, winners, mode = data["trials"], data["metric"], data["winners"], data["mode"]
    winner = winners[0]["trial_id"] if winners else None
    space = read_space(run_dir)
    axes = param_axes(trials, space)
    keys = [a.name for a in axes]
    y = metric_axis(metric, trials)
    colors = _Colors(trials, mode)
    exploits = read_exploits(run_dir, data.get("exploits"))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, dict)):
            return _e(json.dumps(v, default=str))
        return _e(v) if v is not None else "-"

    rows = []
    ordered = sorted(trials, key=lambda t: (not _finite(t["best"]),
                                            -(t["best"] or 0) if mode == "max" else (t["best"] or 0)))
    for t in ordered:
        note = {"STOPPED": "stopped early", "ERROR": t["error"], "TERMINATED": "ran all epochs",
                "PENDING": "never reported an epoch"}
        won = t["trial_id"] == winner
        rows.append(f'<tr class="trial{" winner" if won else ""}" data-trial="{_e(t["trial_id"])}">' + "".join(
            f"<td>{cell(x)}</td>" for x in [
                t["trial_id"], *[t["params"].get(k) for k in keys], t["iterations"], t["best"], t["final"],
                str(t["state"]).lower(), ("the winner; " if won else "") + note.get(t["state"], "")]) + "</tr>")
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
    scatters = [scatter(trials, a, y, winner) for a in axes] if y else []
    scatters = "".join(scatters) or _why_line("No plot: no trial reported the metric.")
    curve = curves(trials, metric, winner, colors, exploits[0] if exploits else None)
    panels = [
        _panel("winner", "Winner", winner_html),
        _panel("confusion", "Confusion matrix of the winner", confusion_panel(winners)),
        _panel("importance", "Hyperparameter importance", importance_panel(trials, axes, mode, metric)),
        _panel("parallel", "All trials in parallel coordinates",
               parallel_coordinates(trials, axes, y, colors, winner, mode)),
        _panel("curves", "Learning curves",
               curve or _why_line("No learning curves: no trial reported the metric at any epoch.")),
        _panel("params", "Metric against the hyperparameters", scatters),
    ]
    if exploits is not None:
        panels.append(_panel("exploits", "PBT exploits", exploits_panel(*exploits)))
    head = "".join(f"<th>{_e(h)}</th>" for h in ["trial", *keys, "epochs", "best", "final", "state", "note"])
    panels.append(_panel("trials", "Trials", f"<table id=\"trials\"><tr>{head}</tr>{''.join(rows)}</table>"))
    stopped = sum(t["state"] == "STOPPED" for t in trials)
    failed = sum(t["state"] == "ERROR" for t in trials)
    pending = sum(t["state"] == "PENDING" for t in trials)
    ended = f"<p>{_e(data['stop_message'])}.</p>" if data.get("stop_message") else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>trainyard report: {_e(run_dir.name)}</title><style>{STYLE}</style></head><body>
<h1>Tuning run {_e(run_dir.name)}</h1>
<p>{len(trials)} trials; metric <b>{_e(metric)}</b> ({_e(mode)}); {stopped} stopped early; {failed} failed{f"; {pending} never started" if pending else ""}.</p>{ended}
{''.join(panels)}
<p>TensorBoard logs: <code>tensorboard --logdir {_e(run_dir.resolve())}</code></p>
</body></html>"""
    atomic_write_text(out, page)
    return out
