"""The winners registry, written by a search and read by deploy, in one place.

The registry is a folder or a URI (s3://, gs://, ...). One search run's winners::

    <registry>/<run>/
        winners.json        the index: the current version's winners, best first (one entry
                            per rank, each naming its "version"). Written LAST, atomically:
                            it alone says which version is current.
        v<N>/               one export, complete before the index names it, never changed
            rank_<k>/       a self-contained checkpoint (weights, resolved config, processor,
                            label names, model plugin) plus winner.json
            winners.json    this version's entries
        rank_<k>            (local registries) a symlink to the current v<N>/rank_<k>,
                            updated after the index

An export builds ``v<N>`` under a temporary name next to it and renames it into place
(locally; to a URI it uploads to the fresh prefix ``v<N>/``), then writes the index. A
search killed mid-export leaves the previous version current and whole; a replica that
resolves the registry gets one version's folder (``v<N>/rank_1``), never a mix, and keeps
it when a later export makes another version current. Earlier versions stay (remove one
with ``rm -r`` once nothing serves it). Each entry's ``replaced`` names the winner of the
same rank it took over from (None for the first export), with ``better`` true when that
one scored better.

A registry written before versions (real ``rank_<k>`` folders, an index without
versions) still resolves; its first versioned export moves those folders to ``v0/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from omegaconf import DictConfig

from trainyard import jsontext
from trainyard.checkpoint import MANIFEST, incomplete_reason, is_complete
from trainyard.errors import TrainyardError
from trainyard.runtime.storage import (
    atomic_write_text,
    check_uri,
    copy_into,
    is_uri,
    join,
    list_names,
    read_text,
    remove_stale_tmp,
    remove_tree,
    replace_dir,
    replace_symlink,
    tmp_name,
    write_text,
)

log = logging.getLogger(__name__)

INDEX = "winners.json"
_VERSION = re.compile(r"^v(\d+)$")
_RANK = re.compile(r"^rank_(\d+)$")


def registry_dir(cfg: DictConfig) -> str:
    registry = cfg.tune.registry
    if "://" in registry:
        return f"{registry.rstrip('/')}/{cfg.name}"
    return str(Path(registry).expanduser().resolve() / cfg.name)


def read_index(target: str | Path) -> list[dict]:
    """The current winners of a registry run folder (``<registry>/<run>``), best first; []
    when it has none (or its index cannot be read)."""
    text = read_text(str(target) + "/" + INDEX if is_uri(target) else str(Path(target) / INDEX))
    if text is None:
        return []
    try:
        index = json.loads(text)
    except ValueError:
        return []
    if not isinstance(index, list):
        return []
    return sorted((e for e in index if isinstance(e, dict)), key=lambda e: e.get("rank", 0))


def versions(target: str | Path) -> list[int]:
    """The version numbers a registry run folder holds (complete or not), ascending."""
    return sorted(int(m.group(1)) for name in list_names(str(target)) if (m := _VERSION.match(name)))


def export_winners(trials: list[dict], cfg: DictConfig, metric: str, mode: str) -> list[dict]:
    """Export the top-k finished trials' best checkpoints as a new version of the winners
    registry (see the module docstring) and make it current; return its entries, best
    first: rank, run, trial_id, metric, mode, value, params, path (the version's rank
    folder), version, replaced. With no finished trial the registry is left as it was.

    A trial whose best checkpoint is incomplete (its upload cut short by a killed search)
    is passed over, with a warning naming it, for the next best trial; if every finished
    trial's is, nothing is exported and the error names the best one.
    """
    finished = [t for t in trials if t["state"] != "ERROR" and t["best"] is not None and t["checkpoint"]]
    finished.sort(key=lambda t: t["best"], reverse=(mode == "max"))
    chosen, first_problem = [], None
    for trial in finished:
        if len(chosen) == cfg.tune.top_k:
            break
        reason = incomplete_reason(trial["checkpoint"])
        if reason is None:
            chosen.append(trial)
            continue
        problem = f"trial {trial['trial_id']}: its checkpoint {trial['checkpoint']} is incomplete ({reason})"
        first_problem = first_problem or problem
        log.warning("%s; exporting the next best trial in its place", problem)
    if not chosen:
        if first_problem:
            raise TrainyardError(f"{first_problem}; no winner was exported")
        return []
    target = registry_dir(cfg)
    if is_uri(target):
        return _export_to_uri(chosen, cfg, metric, mode, target)
    return _export_local(chosen, cfg, metric, mode, Path(target))


def _entries(chosen: list[dict], cfg: DictConfig, metric: str, mode: str, target: str,
             version: int, previous: list[dict]) -> list[dict]:
    by_rank = {e.get("rank"): e for e in previous}
    return [
        {
            "rank": rank,
            "run": cfg.name,
            "trial_id": trial["trial_id"],
            "metric": metric,
            "mode": mode,
            "value": trial["best"],
            "params": trial["params"],
            "path": f"{target}/v{version}/rank_{rank}",
            "version": version,
            "replaced": _replaced(by_rank.get(rank), target, metric, mode, trial["best"]),
        }
        for rank, trial in enumerate(chosen, start=1)
    ]


def _replaced(old: dict | None, target: str, metric: str, mode: str, value: float) -> dict | None:
    """What an entry took over from: the previous current winner of its rank."""
    if old is None:
        return None
    version = old.get("version", 0)  # an unversioned (older) registry's winners become v0
    better = None
    if old.get("metric") == metric and old.get("mode") == mode and old.get("value") is not None:
        better = old["value"] > value if mode == "max" else old["value"] < value
    return {
        "version": version,
        "trial_id": old.get("trial_id"),
        "value": old.get("value"),
        "metric": old.get("metric"),
        "path": f"{target}/v{version}/rank_{old.get('rank')}",
        "better": better,
    }


def _dumps(value: object) -> str:
    return jsontext.dumps(value, indent=2, default=str)


def _export_local(chosen: list[dict], cfg: DictConfig, metric: str, mode: str, root: Path) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root)  # what an export killed earlier (on this host) left
    previous = read_index(root)
    version, reserved = _reserve_version(root, previous)
    staging = root / tmp_name(reserved.name)
    try:
        staging.mkdir()
        entries = _entries(chosen, cfg, metric, mode, str(root), version, previous)
        for entry, trial in zip(entries, chosen):
            dest = staging / f"rank_{entry['rank']}"
            copy_into(trial["checkpoint"], str(dest))
            reason = incomplete_reason(dest)
            if reason is not None:
                raise TrainyardError(f"exporting trial {trial['trial_id']}: the copy is incomplete ({reason})")
            atomic_write_text(dest / "winner.json", _dumps(entry))
        atomic_write_text(staging / INDEX, _dumps(entries))
        replace_dir(staging, reserved)  # the whole version appears at once
    except BaseException:
        remove_tree(staging)
        try:
            reserved.rmdir()
        except OSError:
            pass
        raise
    _fsync_dir(root)
    atomic_write_text(root / INDEX, _dumps(entries))  # the commit: v<version> is current
    _point_rank_links(root, version, len(entries), previous)
    return entries


def _reserve_version(root: Path, previous: list[dict]) -> tuple[int, Path]:
    """The next version number, its folder made (empty) so no concurrent export takes it."""
    known = versions(root) + [e["version"] for e in previous if isinstance(e.get("version"), int)]
    version = max(known, default=0) + 1
    while True:
        folder = root / f"v{version}"
        try:
            folder.mkdir()
            return version, folder
        except FileExistsError:
            version += 1


def _point_rank_links(root: Path, version: int, count: int, previous: list[dict]) -> None:
    """``rank_<k>`` -> ``v<version>/rank_<k>`` for the current ranks; stale ranks removed.
    Real ``rank_<k>`` folders of an unversioned registry move to ``v0/``."""
    legacy = root / "v0"
    try:
        for name in sorted(os.listdir(root)):
            match = _RANK.match(name)
            path = root / name
            if match and path.is_dir() and not path.is_symlink():  # an unversioned winner
                legacy.mkdir(exist_ok=True)
                if (legacy / name).exists():
                    remove_tree(path)
                else:
                    os.replace(path, legacy / name)
        if legacy.is_dir() and not (legacy / INDEX).exists() and previous and "version" not in previous[0]:
            old = [{**e, "path": str(legacy / f"rank_{e.get('rank')}"), "version": 0} for e in previous]
            atomic_write_text(legacy / INDEX, _dumps(old))
        for rank in range(1, count + 1):
            replace_symlink(root / f"rank_{rank}", f"v{version}/rank_{rank}")
        for name in os.listdir(root):
            match = _RANK.match(name)
            if match and int(match.group(1)) > count:
                remove_tree(root / name)
    except OSError:
        # A filesystem without symlinks: the index alone names the current version, and
        # resolve_checkpoint reads it.
        pass


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable before the index names its result."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _export_to_uri(chosen: list[dict], cfg: DictConfig, metric: str, mode: str, target: str) -> list[dict]:
    """Upload to the fresh prefix ``v<N>/`` (one a killed upload left is never reused),
    then write the index: until then the previous version stays current."""
    previous = read_index(target)
    known = versions(target) + [e["version"] for e in previous if isinstance(e.get("version"), int)]
    version = max(known, default=0) + 1
    entries = _entries(chosen, cfg, metric, mode, target, version, previous)
    for entry, trial in zip(entries, chosen):
        copy_into(trial["checkpoint"], entry["path"])
        reason = incomplete_reason(entry["path"])
        if reason is not None:
            raise TrainyardError(f"exporting trial {trial['trial_id']}: the copy is incomplete ({reason})")
        write_text(f"{entry['path']}/winner.json", _dumps(entry))
    write_text(f"{target}/v{version}/{INDEX}", _dumps(entries))
    write_text(f"{target}/{INDEX}", _dumps(entries))  # the commit, last
    return entries


def resolve_checkpoint(target: str | Path, what: str = "WINNER") -> Path | str:
    """A winners folder, a rank folder, a tuning run, a training run, a checkpoint or a
    model registered in MLflow (``models:/<name>/<version>``, ``models:/<name>@<alias>``),
    to the (complete) checkpoint folder it stands for. A winners folder gives its current
    version's ``v<N>/rank_1``; a training run its latest complete checkpoint; a registered
    model its checkpoint_uri tag's folder, or its artifacts downloaded (see
    ``trainyard.tracking.registered_checkpoint``). In object storage (``s3://...``) the
    same, read through pyarrow: the checkpoint's URI (a str) is returned, for each replica
    to fetch (``trainyard.checkpoint.load_predictor`` takes it). ``what``: the argument's
    name in a message about the storage."""
    if isinstance(target, str) and target.startswith("models:/"):
        from trainyard.tracking import registered_checkpoint

        return _complete(registered_checkpoint(target))
    if is_uri(target):
        return _resolve_uri(str(target).rstrip("/"), what)
    path = Path(target).expanduser()
    if (path / MANIFEST).is_file():
        return _complete(path)
    current = _current_winner(path)
    if current is not None:  # a winners registry entry, versioned
        return current
    if (path / "rank_1" / MANIFEST).is_file():  # an unversioned registry entry, or a v<N> folder
        return _complete(path / "rank_1")
    trials = path / "trainyard_trials.json"
    if trials.is_file():  # a tuning run: its exported winner
        winners = json.loads(trials.read_text()).get("winners") or []
        if winners:
            return _complete(Path(winners[0]["path"]))
        raise TrainyardError(f"{path}: the tuning run exported no winner")
    latest = latest_complete_checkpoint(path)
    if latest is not None:  # a training run: its latest complete checkpoint
        return latest.resolve()
    found = [p for p in path.glob("checkpoint_*") if p.is_dir()]
    if found:
        raise TrainyardError(
            f"{path}: none of its {len(found)} checkpoint folders is complete (each was "
            "interrupted while written or copied)"
        )
    if read_index(path):
        raise TrainyardError(f"{path}: its winners.json names a version that is not there")
    if not path.exists():
        raise TrainyardError(f"{path}: no such file or folder")
    raise TrainyardError(
        f"{path}: not a checkpoint, a winners folder, a tuning run or a training run"
    )


def _resolve_uri(uri: str, what: str = "WINNER") -> str:
    """:func:`resolve_checkpoint` for a winners folder, rank folder, training run or
    checkpoint in object storage."""
    check_uri(uri, what)  # a missing bucket, credentials or endpoint: one line, now
    if read_text(join(uri, MANIFEST)) is not None:
        return _complete_uri(uri)
    index = read_index(uri)
    if index and isinstance(index[0].get("version"), int):
        folder = join(uri, f"v{index[0]['version']}", f"rank_{index[0].get('rank', 1)}")
        if read_text(join(folder, MANIFEST)) is not None:
            return _complete_uri(folder)
        raise TrainyardError(f"{uri}: its winners.json names v{index[0]['version']}, which is not there")
    if read_text(join(uri, "rank_1", MANIFEST)) is not None:
        return _complete_uri(join(uri, "rank_1"))
    trials = read_text(join(uri, "trainyard_trials.json"))
    if trials is not None:
        winners = json.loads(trials).get("winners") or []
        if winners:
            return resolve_checkpoint(str(winners[0]["path"]), what)
        raise TrainyardError(f"{uri}: the tuning run exported no winner")
    found = [join(uri, name) for name in list_names(uri) if name.startswith("checkpoint_")]
    complete = [c for c in found if incomplete_reason(c) is None]
    if complete:  # a training run: its latest complete checkpoint
        return max(complete, key=lambda c: (_epoch_at(c), c))
    if found:
        raise TrainyardError(
            f"{uri}: none of its {len(found)} checkpoint folders is complete (each was "
            "interrupted while written or copied)"
        )
    raise TrainyardError(f"{uri}: not a checkpoint, a winners folder, a tuning run or a training run")


def _complete_uri(uri: str) -> str:
    reason = incomplete_reason(uri)
    if reason is not None:
        raise TrainyardError(f"{uri}: incomplete checkpoint ({reason}): its writing or copying was interrupted")
    return uri


def _epoch_at(checkpoint: str) -> int:
    try:
        return int(json.loads(read_text(join(checkpoint, "trainer_state.json")) or "")["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _current_winner(path: Path) -> Path | None:
    """The current version's best rank folder, when ``path`` has a versioned index."""
    index = read_index(path)
    if not index or not isinstance(index[0].get("version"), int):
        return None
    folder = path / f"v{index[0]['version']}" / f"rank_{index[0].get('rank', 1)}"
    if not folder.is_dir():  # e.g. the index of a v<N> folder itself
        return None
    return _complete(folder)


def _complete(folder: Path) -> Path:
    reason = incomplete_reason(folder)
    if reason is not None:
        raise TrainyardError(
            f"{folder}: incomplete checkpoint ({reason}): its writing or copying was interrupted"
        )
    return folder.resolve()


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """A local training run's latest complete checkpoint folder (by the epoch it holds);
    None when it has none."""
    complete = [p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and is_complete(p)]
    return max(complete, key=lambda p: (_epoch(p), p.name)) if complete else None


def _epoch(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def model_name_for(checkpoint: Path | str) -> str:
    """The name a checkpoint (a folder or a URI) is served under by default: its run's name."""
    text = read_text(join(checkpoint, MANIFEST))
    if text is None:
        raise TrainyardError(f"{checkpoint}: not a trainyard checkpoint (no manifest.json)")
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise TrainyardError(f"{checkpoint}: its manifest.json is not valid JSON ({exc})") from None
    name = manifest.get("run") or manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(name, str):
        raise TrainyardError(f"{checkpoint}: its manifest.json names no run or model; give the model a name")
    return name
