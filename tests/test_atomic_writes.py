"""Winners, checkpoints and metrics survive a process killed mid-write (issue 16).

Real files, real processes, no Ray: checkpoints are written with ``write_checkpoint`` from
the built-in MLP. A writer is stopped at a chosen point by a Python audit hook in the child
process (it sleeps inside the hook, before the real operation runs) and then killed with a
real SIGKILL, so the kill lands deterministically between two real filesystem operations.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIGS, ROOT
from trainyard.checkpoint import incomplete_reason, is_complete, load_predictor, write_checkpoint
from trainyard.errors import TrainyardError
from trainyard.runtime.storage import copy_tree
from trainyard.winners import export_winners, read_index, resolve_checkpoint

RUN = "atomic_run"
METRIC = "val_accuracy"
ENTRY_KEYS = {"rank", "run", "trial_id", "metric", "mode", "value", "params", "path"}


@lru_cache(maxsize=1)
def _job_and_data():
    from trainyard.config import load_config, resolve
    from trainyard.train.data import prepare_data

    job = resolve(load_config(CONFIGS / "mlp_breast_cancer.yaml", ["name=atomic"]))
    return job, prepare_data(job)


def write_mlp_checkpoint(folder: Path, seed: int = 0, epoch: int = 0) -> Path:
    """A real checkpoint of the built-in MLP, weights drawn from ``seed``."""
    import torch

    job, data = _job_and_data()
    torch.manual_seed(seed)
    model = job.model.build(job.model_params, data.info, data.processor)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return write_checkpoint(folder, job=job, model=model, processor=data.processor, info=data.info,
                            epoch=epoch, metrics={"epoch": epoch}, optimizer=optimizer,
                            plugin=job.model.name)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Five trials' checkpoints, each with its own weights."""
    root = tmp_path_factory.mktemp("trials")
    return {tid: write_mlp_checkpoint(root / tid, seed=i) for i, tid in enumerate("abcde")}


def trials(sources: dict[str, Path], values: dict[str, float]) -> list[dict]:
    return [{"trial_id": tid, "state": "TERMINATED", "best": value, "checkpoint": str(sources[tid]),
             "params": {"train.lr": 0.001 * (i + 1)}} for i, (tid, value) in enumerate(values.items())]


def tune_cfg(registry: Path | str, top_k: int = 2):
    return OmegaConf.create({"name": RUN, "tune": {"registry": str(registry), "top_k": top_k}})


def export(sources, registry, values: dict[str, float], top_k: int = 2) -> list[dict]:
    return export_winners(trials(sources, values), tune_cfg(registry, top_k), METRIC, "max")


def assert_current_version_whole(run: Path, sources: dict[str, Path]) -> tuple[int, list[dict]]:
    """The index names one version; every rank of it is complete, is its index entry, and
    holds exactly its trial's files (no mix of trials or versions); deploy resolves to it
    and the checkpoint loads."""
    index = json.loads((run / "winners.json").read_text())
    version = index[0]["version"]
    assert [e["rank"] for e in index] == list(range(1, len(index) + 1))
    for entry in index:
        assert entry["version"] == version
        folder = run / f"v{version}" / f"rank_{entry['rank']}"
        assert incomplete_reason(folder) is None
        assert json.loads((folder / "winner.json").read_text()) == entry
        manifest = json.loads((folder / "manifest.json").read_text())
        source = sources[entry["trial_id"]]
        for name in ["manifest.json", *manifest["files"]]:
            assert filecmp.cmp(folder / name, source / name, shallow=False), (entry["trial_id"], name)
    served = resolve_checkpoint(run)
    assert served == (run / f"v{version}" / "rank_1").resolve()
    assert load_predictor(served).manifest["model"] == "mlp"
    return version, index


# ---------------------------------------------------------------------------------------
# Winners: versioned, indexed last, nothing stale
# ---------------------------------------------------------------------------------------


def test_each_export_is_a_new_version_naming_the_winner_it_replaced(sources, tmp_path):
    registry = tmp_path / "winners"
    run = registry / RUN
    first = export(sources, registry, {"a": 0.95, "b": 0.90})
    assert all(ENTRY_KEYS <= set(e) for e in first)
    assert [(e["rank"], e["trial_id"], e["version"], e["replaced"]) for e in first] == [
        (1, "a", 1, None), (2, "b", 1, None)]
    assert first[0]["path"] == str(run / "v1" / "rank_1")
    assert assert_current_version_whole(run, sources)[0] == 1

    # A worse search: a new version, and the better winner it replaced is named.
    second = export(sources, registry, {"c": 0.80, "d": 0.70})
    assert [(e["trial_id"], e["version"]) for e in second] == [("c", 2), ("d", 2)]
    assert second[0]["replaced"] == {"version": 1, "trial_id": "a", "value": 0.95, "metric": METRIC,
                                     "path": str(run / "v1" / "rank_1"), "better": True}
    assert second[1]["replaced"]["trial_id"] == "b"
    assert assert_current_version_whole(run, sources)[0] == 2
    # The earlier winner is still there, whole, and deployable by its version folder.
    assert resolve_checkpoint(run / "v1") == (run / "v1" / "rank_1").resolve()
    assert json.loads((run / "v1" / "rank_1" / "winner.json").read_text())["trial_id"] == "a"
    # The old layout's paths still reach the current winners.
    assert os.readlink(run / "rank_1") == "v2/rank_1"
    assert (run / "rank_1" / "manifest.json").is_file()

    third = export(sources, registry, {"e": 0.99})
    assert third[0]["replaced"]["better"] is False and third[0]["replaced"]["version"] == 2
    assert read_index(run) == third


def test_stale_ranks_do_not_survive_into_the_current_version(sources, tmp_path):
    registry = tmp_path / "winners"
    run = registry / RUN
    export(sources, registry, {"a": 0.9, "b": 0.8, "c": 0.7}, top_k=3)
    assert sorted(p.name for p in run.glob("rank_*")) == ["rank_1", "rank_2", "rank_3"]

    export(sources, registry, {"d": 0.95, "e": 0.85}, top_k=1)
    version, index = assert_current_version_whole(run, sources)
    assert version == 2 and [e["trial_id"] for e in index] == ["d"]
    assert sorted(p.name for p in (run / "v2").iterdir()) == ["rank_1", "winners.json"]
    assert sorted(p.name for p in run.glob("rank_*")) == ["rank_1"]
    assert sorted(p.name for p in (run / "v1").glob("rank_*")) == ["rank_1", "rank_2", "rank_3"]


def test_no_finished_trial_leaves_the_registry_as_it_was(sources, tmp_path):
    registry = tmp_path / "winners"
    export(sources, registry, {"a": 0.9})
    before = (registry / RUN / "winners.json").read_text()
    failed = [{**t, "state": "ERROR"} for t in trials(sources, {"b": 0.99})]
    assert export_winners(failed, tune_cfg(registry), METRIC, "max") == []
    assert (registry / RUN / "winners.json").read_text() == before


def test_a_trial_whose_best_checkpoint_is_incomplete_gives_way_to_the_next_best(sources, tmp_path, caplog):
    """A search killed mid-upload and resumed can leave a trial's recorded best checkpoint
    without its manifest: the export warns, naming it, and exports the next best trial; with
    every candidate incomplete it exports nothing and says which."""
    registry = tmp_path / "winners"
    torn = tmp_path / "torn_a"
    shutil.copytree(sources["a"], torn)
    (torn / "manifest.json").unlink()
    candidates = trials({**sources, "a": torn}, {"a": 0.99, "b": 0.90, "c": 0.80})
    with caplog.at_level("WARNING", logger="trainyard.winners"):
        exported = export_winners(candidates, tune_cfg(registry, top_k=2), METRIC, "max")
    assert [(e["rank"], e["trial_id"], e["value"]) for e in exported] == [(1, "b", 0.90), (2, "c", 0.80)]
    assert assert_current_version_whole(registry / RUN, sources)[0] == 1
    assert f"trial a: its checkpoint {torn} is incomplete (no manifest.json)" in caplog.text

    before = (registry / RUN / "winners.json").read_text()
    with pytest.raises(TrainyardError, match=r"trial a: .* is incomplete \(no manifest.json\); no winner was exported"):
        export_winners(candidates[:1], tune_cfg(registry, top_k=1), METRIC, "max")
    assert (registry / RUN / "winners.json").read_text() == before


def test_an_unversioned_registry_still_deploys_and_its_winners_move_to_v0(sources, tmp_path):
    run = tmp_path / "winners" / RUN
    legacy = []
    for rank, tid in enumerate("ab", start=1):  # the layout trainyard wrote before versions
        shutil.copytree(sources[tid], run / f"rank_{rank}")
        entry = {"rank": rank, "run": RUN, "trial_id": tid, "metric": METRIC, "mode": "max",
                 "value": 1 - rank / 10, "params": {}, "path": str(run / f"rank_{rank}")}
        (run / f"rank_{rank}" / "winner.json").write_text(json.dumps(entry))
        legacy.append(entry)
    (run / "winners.json").write_text(json.dumps(legacy))
    assert resolve_checkpoint(run) == (run / "rank_1").resolve()

    new = export(sources, tmp_path / "winners", {"c": 0.95})
    assert new[0]["version"] == 1
    assert new[0]["replaced"] == {"version": 0, "trial_id": "a", "value": 0.9, "metric": METRIC,
                                  "path": str(run / "v0" / "rank_1"), "better": False}
    assert assert_current_version_whole(run, sources)[0] == 1
    assert sorted(p.name for p in run.glob("rank_*")) == ["rank_1"] and (run / "rank_1").is_symlink()
    assert sorted(p.name for p in (run / "v0").iterdir()) == ["rank_1", "rank_2", "winners.json"]
    assert load_predictor(resolve_checkpoint(run / "v0")).manifest["model"] == "mlp"


def test_a_uri_registry_uploads_a_fresh_version_prefix_and_writes_the_index_last(sources, tmp_path):
    registry = f"file://{tmp_path / 'winners'}"
    run = tmp_path / "winners" / RUN
    first = export(sources, registry, {"a": 0.9, "b": 0.8})
    assert first[0]["path"] == f"{registry}/{RUN}/v1/rank_1"
    assert assert_current_version_whole(run, sources)[0] == 1
    # An upload killed part way: files under a new prefix, the index untouched.
    shutil.copytree(sources["c"], run / "v2" / "rank_1")
    (run / "v2" / "rank_1" / "model.safetensors").unlink()
    assert assert_current_version_whole(run, sources)[0] == 1
    second = export(sources, registry, {"d": 0.7})
    assert second[0]["version"] == 3  # the abandoned prefix is never reused
    assert second[0]["replaced"]["trial_id"] == "a" and second[0]["replaced"]["better"] is True
    assert assert_current_version_whole(run, sources)[0] == 3


EXPORT_CHILD = r"""
import json, os, re, sys, time
from omegaconf import OmegaConf
from trainyard.winners import export_winners

spec = json.loads(sys.argv[1])
state = {"seen": 0, "fired": False}

def pause(event, args):
    if state["fired"] or event != spec["event"] or len(args) < 2:
        return
    if not re.search(spec["pattern"], str(args[1])):
        return
    state["seen"] += 1
    if state["seen"] < spec["nth"]:
        return
    state["fired"] = True
    os.close(os.open(spec["marker"], os.O_CREAT | os.O_WRONLY))
    time.sleep(600)  # killed here, before the operation runs

sys.addaudithook(pause)
export_winners(spec["trials"], OmegaConf.create(spec["cfg"]), spec["metric"], "max")
print("export finished without being killed")
"""

# (where the export is killed, audit event, pattern its destination matches, nth match,
#  version the registry serves afterwards)
KILL_POINTS = {
    "mid_copy_of_rank_2": ("shutil.copyfile", r"/\.v2\.tmp-[^/]+/rank_2/", 2, 1),
    "before_the_version_folder_is_renamed_into_place": ("os.rename", r"/v2$", 1, 1),
    "before_the_index_is_renamed_into_place": ("os.rename", rf"/{RUN}/winners\.json$", 1, 1),
    "after_the_index_before_the_rank_links": ("os.symlink", r"/\.rank_1\.tmp-", 1, 2),
}


def run_until_paused(code: str, spec: dict, marker: Path, timeout: float = 120) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"the child ended before its kill point: {out[-2000:]} {err[-3000:]}")
        assert time.monotonic() < deadline, "the child never reached its kill point"
        time.sleep(0.02)
    return child


def kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_an_export_killed_at_any_point_leaves_one_whole_version_served(point, sources, tmp_path):
    event, pattern, nth, served_after = KILL_POINTS[point]
    registry = tmp_path / "winners"
    run = registry / RUN
    export(sources, registry, {"a": 0.95, "b": 0.90})
    marker = tmp_path / "paused"
    spec = {"event": event, "pattern": pattern, "nth": nth, "marker": str(marker),
            "trials": trials(sources, {"c": 0.99, "d": 0.98}),
            "cfg": OmegaConf.to_container(tune_cfg(registry)), "metric": METRIC}
    child = run_until_paused(EXPORT_CHILD, spec, marker)
    if point == "mid_copy_of_rank_2":  # rank_1 copied whole, rank_2 part way
        (staging,) = run.glob(".v2.tmp-*")
        assert is_complete(staging / "rank_1") and not is_complete(staging / "rank_2")
    kill(child)

    version, index = assert_current_version_whole(run, sources)
    assert version == served_after
    assert [e["trial_id"] for e in index] == (["a", "b"] if served_after == 1 else ["c", "d"])
    # rank_<k> links lag the index at most; they never point at an incomplete folder.
    for link in run.glob("rank_*"):
        assert is_complete(link)

    # The next export cleans up what the killed one left, takes a fresh version and names
    # the winner that was current.
    after = export(sources, registry, {"e": 0.5})
    assert after[0]["version"] == 3
    assert after[0]["replaced"]["version"] == served_after
    assert assert_current_version_whole(run, sources)[0] == 3
    assert not list(run.glob(".*tmp-*"))
    assert os.readlink(run / "rank_1") == "v3/rank_1" and not (run / "rank_2").exists()


# ---------------------------------------------------------------------------------------
# Checkpoints: complete only once the manifest lands, last
# ---------------------------------------------------------------------------------------


def test_the_manifest_lists_every_file_with_its_size(tmp_path):
    folder = write_mlp_checkpoint(tmp_path / "ckpt", epoch=3)
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.relative_to(folder).as_posix(): p.stat().st_size
               for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert manifest["files"] == on_disk
    assert {"model.safetensors", "optimizer.pt", "job.yaml", "data_info.json", "trainer_state.json"} <= set(on_disk)
    assert is_complete(folder) and not list(folder.glob(".*tmp-*"))


CHECKPOINT_CHILD = r"""
import json, os, re, sys, time
import torch
from trainyard.checkpoint import write_checkpoint
from trainyard.config import load_config, resolve
from trainyard.train.data import prepare_data

spec = json.loads(sys.argv[1])
job = resolve(load_config(spec["config"], ["name=atomic"]))
data = prepare_data(job)
model = job.model.build(job.model_params, data.info, data.processor)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
state = {"fired": False}

def pause(event, args):
    if state["fired"] or event != spec["event"] or not args:
        return
    if not re.search(spec["pattern"], str(args[1] if event == "os.rename" else args[0])):
        return
    state["fired"] = True
    os.close(os.open(spec["marker"], os.O_CREAT | os.O_WRONLY))
    time.sleep(600)

sys.addaudithook(pause)
write_checkpoint(spec["folder"], job=job, model=model, processor=data.processor, info=data.info,
                 epoch=1, metrics={"epoch": 1}, optimizer=optimizer, plugin=job.model.name)
"""


@pytest.mark.parametrize("event, pattern", [
    ("open", r"trainer_state\.json$"),  # weights written, the rest not
    ("os.rename", r"/manifest\.json$"),  # every file written, the manifest not yet in place
])
def test_a_checkpoint_killed_mid_write_is_never_picked(event, pattern, tmp_path):
    run = tmp_path / "run"
    write_mlp_checkpoint(run / "checkpoint_000000", epoch=0)
    marker = tmp_path / "paused"
    spec = {"config": str(CONFIGS / "mlp_breast_cancer.yaml"), "folder": str(run / "checkpoint_000001"),
            "event": event, "pattern": pattern, "marker": str(marker)}
    kill(run_until_paused(CHECKPOINT_CHILD, spec, marker))

    killed = run / "checkpoint_000001"
    assert (killed / "model.safetensors").is_file() and not (killed / "manifest.json").exists()
    assert not is_complete(killed)
    assert resolve_checkpoint(run) == (run / "checkpoint_000000").resolve()
    with pytest.raises(TrainyardError, match="no manifest.json"):
        load_predictor(killed)


def test_an_interrupted_copy_is_incomplete_whatever_order_it_copied_in(tmp_path):
    """Ray uploads a checkpoint's files in no set order: a copy cut short can hold the
    manifest and miss or truncate another file."""
    run = tmp_path / "run"
    write_mlp_checkpoint(run / "checkpoint_000000", epoch=0)
    truncated = write_mlp_checkpoint(run / "checkpoint_000001", epoch=1)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    missing = write_mlp_checkpoint(run / "checkpoint_000002", epoch=2)
    next(p for p in (missing / "processor").rglob("*") if p.is_file()).unlink()

    assert "model.safetensors has" in incomplete_reason(truncated)
    assert "is missing" in incomplete_reason(missing)
    assert resolve_checkpoint(run) == (run / "checkpoint_000000").resolve()
    with pytest.raises(TrainyardError, match="incomplete checkpoint .*model.safetensors"):
        load_predictor(truncated)
    with pytest.raises(TrainyardError, match="incomplete checkpoint"):
        resolve_checkpoint(truncated)
    # The latest complete one is picked by its epoch.
    write_mlp_checkpoint(run / "checkpoint_000003", epoch=3)
    assert resolve_checkpoint(run) == (run / "checkpoint_000003").resolve()


def test_a_checkpoint_written_before_manifests_listed_files_still_counts(tmp_path):
    folder = write_mlp_checkpoint(tmp_path / "run" / "checkpoint_000000")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert is_complete(folder)
    assert resolve_checkpoint(tmp_path / "run") == folder.resolve()
    assert load_predictor(folder).manifest["model"] == "mlp"


def test_copy_tree_replaces_a_folder_whole(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "stale.txt").write_text("stale")
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "fresh.txt").write_text("fresh")
    dest = tmp_path / "dest"
    copy_tree(str(old), str(dest))
    copy_tree(str(new), str(dest))
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["sub", "sub/fresh.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "new", "old"]


# ---------------------------------------------------------------------------------------
# metrics.jsonl: replaced atomically, a truncated last line tolerated
# ---------------------------------------------------------------------------------------


def test_a_truncated_last_metrics_line_is_skipped_and_the_run_goes_on(tmp_path):
    from trainyard.train.driver import _MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": e, "val_loss": 1.0 / (e + 1)} for e in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text[: len(text) - 12])  # the last line cut short, as a crash leaves it
    log = _MetricsLog(path)
    assert log.history == rows[:2] and log.skipped == 1
    log.add(rows[2])
    log.add({"epoch": 3, "val_loss": 0.2})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_epochs_a_killed_driver_never_logged_come_back_from_the_latest_checkpoint(tmp_path):
    """Killed at epoch 10's line while the workers checkpointed 12-14: the resumed run's
    metrics.jsonl still has one line per epoch (the checkpoint keeps the epochs before it)."""
    from trainyard.train.driver import _MetricsLog, latest_checkpoint_state

    rows = [{"epoch": e, "val_loss": 1.0 / (e + 1)} for e in range(15)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:11]))
    for epoch in (12, 13, 14):
        folder = tmp_path / f"checkpoint_{epoch:06d}"
        folder.mkdir()
        state = json.dumps({"epoch": epoch, "metrics": rows[epoch], "earlier": rows[:epoch]})
        (folder / "trainer_state.json").write_text(state)
        files = {"trainer_state.json": len(state)}
        (folder / "manifest.json").write_text(json.dumps({"files": files if epoch < 14 else {"gone.bin": 1}}))
    log = _MetricsLog(tmp_path / "metrics.jsonl")
    log.fill_from(latest_checkpoint_state(tmp_path))  # 14's folder is incomplete: 13 is the latest
    assert log.history == rows[:14]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:14]


METRICS_CHILD = r"""
import sys
from pathlib import Path
from trainyard.train.driver import _MetricsLog

log = _MetricsLog(Path(sys.argv[1]))
epoch = 0
while True:  # epochs 0..199 again and again: a resumed epoch replaces its line
    log.add({"epoch": epoch % 200, "val_loss": 0.5, "note": "x" * 2000})
    epoch += 1
"""


def test_metrics_jsonl_is_whole_for_any_reader_and_after_a_kill(tmp_path):
    """A reader (the UI, a resumed driver) never sees a part-written metrics.jsonl, and
    one killed at a random moment among the rewrites leaves a whole file."""
    from trainyard.train.driver import _MetricsLog

    path = tmp_path / "metrics.jsonl"
    rng = random.Random(16)
    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", METRICS_CHILD, str(path)], cwd=ROOT,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (path.exists() and path.stat().st_size > 300_000):
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reads, until = 0, time.monotonic() + rng.uniform(0.5, 1.0)
        while time.monotonic() < until:  # read while it rewrites
            lines = path.read_text().splitlines()
            assert len(lines) >= 140 and all(json.loads(line)["val_loss"] == 0.5 for line in lines)
            reads += 1
        kill(child)
        assert reads >= 3
        for line in path.read_text().splitlines():  # every line whole
            assert json.loads(line)["val_loss"] == 0.5
        log = _MetricsLog(path)
        assert log.skipped == 0 and len(log.history) >= 140
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
