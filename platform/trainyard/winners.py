"""The winners registry, written by a search and read by deploy, in one place.

``<registry>/<run name>/rank_<k>/`` is a self-contained checkpoint (weights, resolved config,
processor, label names, model plugin) plus ``winner.json``; ``<registry>/<run name>/
winners.json`` indexes them. The registry is a folder or a URI (s3://, gs://, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from trainyard.errors import TrainyardError
from trainyard.runtime.storage import copy_tree, write_text


def registry_dir(cfg: DictConfig) -> str:
    registry = cfg.tune.registry
    if "://" in registry:
        return f"{registry.rstrip('/')}/{cfg.name}"
    return str(Path(registry).expanduser().resolve() / cfg.name)


def export_winners(trials: list[dict], cfg: DictConfig, metric: str, mode: str) -> list[dict]:
    """Copy the top-k finished trials' best checkpoints into the winners registry.

    ``<registry>/<run name>/rank_<k>/`` is a self-contained checkpoint (weights, resolved
    config, processor, label names, model plugin name) plus ``winner.json``;
    ``<registry>/<run name>/winners.json`` indexes them.
    """
    finished = [t for t in trials if t["state"] != "ERROR" and t["best"] is not None and t["checkpoint"]]
    finished.sort(key=lambda t: t["best"], reverse=(mode == "max"))
    target = registry_dir(cfg)
    winners = []
    for rank, trial in enumerate(finished[: cfg.tune.top_k], start=1):
        dest = f"{target}/rank_{rank}"
        copy_tree(trial["checkpoint"], dest)
        entry = {
            "rank": rank,
            "run": cfg.name,
            "trial_id": trial["trial_id"],
            "metric": metric,
            "mode": mode,
            "value": trial["best"],
            "params": trial["params"],
            "path": dest,
        }
        write_text(f"{dest}/winner.json", json.dumps(entry, indent=2, default=str))
        winners.append(entry)
    write_text(f"{target}/winners.json", json.dumps(winners, indent=2, default=str))
    return winners



def resolve_checkpoint(target: str | Path) -> Path:
    """A winners folder, a rank folder, a tuning run, a training run or a checkpoint, to
    the checkpoint folder it stands for."""
    path = Path(target).expanduser()
    if (path / "manifest.json").is_file():
        return path.resolve()
    if (path / "rank_1" / "manifest.json").is_file():  # a winners registry entry
        return (path / "rank_1").resolve()
    trials = path / "trainyard_trials.json"
    if trials.is_file():  # a tuning run: its exported winner
        winners = json.loads(trials.read_text()).get("winners") or []
        if winners:
            return Path(winners[0]["path"]).resolve()
        raise TrainyardError(f"{path}: the tuning run exported no winner")
    checkpoints = sorted(p for p in path.glob("checkpoint_*") if (p / "manifest.json").is_file())
    if checkpoints:  # a training run: its latest checkpoint
        return checkpoints[-1].resolve()
    raise TrainyardError(
        f"{path}: not a checkpoint, a winners folder, a tuning run or a training run"
    )


def model_name_for(checkpoint: Path) -> str:
    """The name a checkpoint is served under by default: its run's name."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    return str(manifest.get("run") or manifest["model"])

