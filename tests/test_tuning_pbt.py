"""Population based training: the config, the loop taking up new values from a copied
checkpoint (in this process, through the loop's Session seam), and a real PBT search on a
local Ray Tune whose exploits are recorded and take effect."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from tests.test_training_essentials import LocalSession, _loop
from trainyard.config import load_config, resolve
from trainyard.errors import ConfigError
from trainyard.train.loop import setup
from trainyard.tune.space import mutable_keys, validate_space


def _cfg(*overrides: str):
    return load_config(CONFIGS / "mlp_breast_cancer.yaml", ["scaling.num_workers=1", *overrides])


def _pbt(*overrides: str, space: dict | None = None):
    base = {"tune": {"space": space}} if space is not None else None
    return load_config(CONFIGS / "tune_pbt.yaml", list(overrides), base=base)


# --------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------


def test_the_shipped_pbt_config_is_valid_and_mutates_lr_weight_decay_and_dropout():
    cfg = _pbt()
    validate_space(cfg)
    assert mutable_keys(cfg) == ["train.lr", "train.weight_decay", "model.params.dropout"]


@pytest.mark.parametrize(("overrides", "key"), [
    (["tune.search=optuna"], "tune.search: optuna cannot be combined with tune.scheduler: pbt"),
    (["scaling.num_workers=2"], "scaling.num_workers: tune.scheduler: pbt runs one-worker trials"),
    (["tune.pbt.perturbation_interval=0"], "tune.pbt.perturbation_interval: must be at least 1"),
    (["tune.pbt.perturbation_interval=8"], "tune.pbt.perturbation_interval: "),  # = train.epochs
    (["tune.pbt.quantile_fraction=0.6"], "tune.pbt.quantile_fraction: "),
    (["tune.pbt.resample_probability=-0.1"], "tune.pbt.resample_probability: "),
    (["tune.pbt.perturbation_factors=[]"], "tune.pbt.perturbation_factors: "),
    (["tune.pbt.burn_in_period=-1"], "tune.pbt.burn_in_period: "),
    (["tune.num_samples=1", "tune.max_concurrent_trials=1"], "tune.num_samples: pbt needs a population"),
    (["tune.max_concurrent_trials=2"], "tune.max_concurrent_trials: pbt trains its whole population"),
    (["tune.pbt.every=2"], "tune.pbt.every: unknown key"),
])
def test_bad_pbt_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        _pbt(*overrides)
    assert str(info.value).startswith(key), str(info.value)


def test_a_synchronous_population_may_be_larger_than_the_trials_run_at_once():
    assert _pbt("tune.max_concurrent_trials=2", "tune.pbt.synch=true").tune.pbt.synch is True


def test_mutable_dimensions_default_and_explicit_and_refused():
    cfg = _pbt(space={"train.batch_size": {"type": "choice", "values": [16, 32], "mutable": True},
                      "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2, "mutable": False}})
    assert mutable_keys(cfg) == ["train.weight_decay", "model.params.dropout", "train.batch_size"]
    cfg = _pbt(space={"train.epochs": {"type": "choice", "values": [4, 8], "mutable": True}})
    with pytest.raises(ConfigError, match=r"^tune.space.train.epochs.mutable: train.epochs cannot change"):
        validate_space(cfg)
    cfg = load_config(CONFIGS / "tune_mlp.yaml", ["tune.scheduler=pbt", "tune.max_concurrent_trials=8"],
                      base={"tune": {"space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2,
                                                            "mutable": False}}}})
    cfg.tune.space = OmegaConf.create({"train.batch_size": {"type": "choice", "values": [16, 32]}})
    with pytest.raises(ConfigError, match=r"^tune.space: tune.scheduler: pbt needs a mutable dimension"):
        validate_space(cfg)


def test_perturbed_values_stay_within_their_dimension():
    from trainyard.tune.pbt import hyperparam_mutations

    cfg = _pbt()
    mutations, bounds = hyperparam_mutations(cfg, mutable_keys(cfg))
    assert bounds["model.params.dropout"] == (0.05, 0.3)
    from trainyard.tune.pbt import ClipToSpace

    clipped = ClipToSpace(bounds)({"model.params.dropout": 0.36, "train.lr": 1e-6, "train.batch_size": 16})
    assert clipped == {"model.params.dropout": 0.3, "train.lr": 0.00001, "train.batch_size": 16}


# --------------------------------------------------------------------------------------
# The loop takes up the new values of a copied checkpoint
# --------------------------------------------------------------------------------------


def _restored(cfg, checkpoint):
    session = LocalSession(checkpoint.parent, start_from=checkpoint)
    return setup(resolve(cfg), session)


def test_a_copied_checkpoint_trains_on_with_the_new_lr_weight_decay_and_dropout(tmp_path):
    # The donor trained two epochs with dropout 0, so its MLP has no Dropout layer; the
    # new values add one, which renumbers the layers after it.
    donor_cfg = _cfg("train.epochs=4", "train.lr=0.003", "train.weight_decay=0.01", "model.params.dropout=0.0")
    donor = _loop(donor_cfg, tmp_path / "donor")
    copied = donor.checkpoints[1]
    saved = torch.load(copied / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["lr"] == 0.003  # what loading the optimizer brings back

    new_cfg = _cfg("train.epochs=4", "train.lr=0.0007", "train.weight_decay=0.002", "model.params.dropout=0.25")
    t = _restored(new_cfg, copied)
    assert t.start_epoch == 2
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.0007]
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.002]
    assert t.optimizer.state_dict()["state"]  # Adam's moments came with the checkpoint
    dropouts = [m.p for m in t.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.25}
    # The donor's weights, loaded by position into the renumbered layers.
    from safetensors.torch import load_file

    weights = load_file(str(copied / "model.safetensors"))
    ours = t.model.state_dict()
    assert set(ours) != set(weights) and len(ours) == len(weights)
    pairs = zip(sorted(ours, key=_natural), sorted(weights, key=_natural))
    assert all(torch.equal(ours[a], weights[b]) for a, b in pairs)

    # And the loop trains on with them: the reported rate is the new one.
    resumed = _loop(new_cfg, tmp_path / "exploited", start_from=copied)
    assert [r["epoch"] for r in resumed.reports] == [2, 3]
    assert all(r["lr"] == 0.0007 for r in resumed.reports)


def _natural(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def test_with_a_schedule_the_new_lr_is_the_base_at_the_restored_step(tmp_path):
    common = ["train.epochs=4", "train.scheduler=cosine", "train.warmup_ratio=0.25"]
    straight = _loop(_cfg(*common, "train.lr=0.01"), tmp_path / "straight")
    copied = straight.checkpoints[1]
    resumed = _loop(_cfg(*common, "train.lr=0.002"), tmp_path / "resumed", start_from=copied)
    for a, b in zip(straight.reports[2:], resumed.reports, strict=True):
        assert b["lr"] == pytest.approx(a["lr"] * 0.2)
    # The first step after the restore already uses the scheduled rate at that step.
    t = _restored(_cfg(*common, "train.lr=0.002"), copied)
    steps = t.scheduler.last_epoch
    assert steps > 0 and t.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.002 * t.scheduler.lr_lambdas[0](steps))
    for kind in ("onecycle", "step"):
        run = _loop(_cfg("train.epochs=3", f"train.scheduler={kind}", "train.lr=0.01"), tmp_path / kind)
        again = _restored(_cfg("train.epochs=3", f"train.scheduler={kind}", "train.lr=0.03"), run.checkpoints[0])
        again_lr = again.optimizer.param_groups[0]["lr"]
        assert again_lr == pytest.approx(run.reports[0]["lr"] * 3), kind


def test_weights_that_do_not_fit_the_new_params_fail_saying_so(tmp_path):
    run = _loop(_cfg("train.epochs=1", "model.params.hidden=[16]"), tmp_path / "a")
    with pytest.raises(RuntimeError, match="do not fit the model built from this trial's params"):
        _restored(_cfg("train.epochs=2", "model.params.hidden=[8]"), run.checkpoints[0])


# --------------------------------------------------------------------------------------
# A real PBT search
# --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_a_pbt_search_records_its_exploits_and_the_exploited_trials_train_with_the_new_values(tmp_path):
    from trainyard.tune.driver import run_tuning
    from trainyard.tune.records import read_exploits, read_history

    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tune_pbt.yaml"))
    raw.update(name="pbt", storage_path=str(tmp_path / "runs"))
    raw["tune"].update(registry=str(tmp_path / "winners"), num_samples=2, max_concurrent_trials=2)
    # synch: the trials wait for each other at every perturbation, so however their actors
    # start on a busy machine, the weaker one copies the stronger after each epoch.
    raw["tune"]["pbt"].update(perturbation_interval=1, synch=True)
    cfg = load_config(base=raw, overrides=["train.epochs=2", "scaling.cpus_per_worker=0.5"])
    outcome = run_tuning(cfg)

    exploits = read_exploits(outcome.run_dir)
    assert exploits, "no trial copied another"
    assert outcome.exploits == exploits
    assert json.loads((tmp_path / "runs" / "pbt" / "trainyard_trials.json").read_text())["exploits"] == exploits
    ids = {t["trial_id"] for t in outcome.trials}
    history = read_history(outcome.run_dir)
    for e in exploits:
        assert {e["trial"], e["from_trial"]} <= ids and e["trial"] != e["from_trial"]
        assert set(e["new"]) == set(e["old"]) == {"train.lr", "train.weight_decay", "model.params.dropout",
                                                  "train.batch_size"}
        # Not perturbed (mutable: false), but the copied checkpoint's own: recorded as changed.
        assert e["new"]["train.batch_size"] == e["donor"]["train.batch_size"]
        assert e["epoch"] >= 1 and e["from_epoch"] >= 1
        # Perturbed (times 1.2 or 0.8) or drawn afresh: never the copied trial's own rate,
        # which the copied optimizer state holds.
        assert e["new"]["train.lr"] != e["donor"]["train.lr"]
        assert 0.05 <= e["new"]["model.params.dropout"] <= 0.3
    # The first result an exploited trial reports under its new values goes on from the
    # copied epoch, and the rate in effect (read back from the optimizer, which the copied
    # checkpoint restored with the donor's rate) is the new one.
    checked = 0
    for e in exploits:
        after = [r for r in history[e["trial"]] if r["time"] > e["time"]
                 and {k: r["config"][k] for k in e["new"]} == e["new"]]
        if e["from_epoch"] < cfg.train.epochs:
            restored = after[0]
            assert restored["training_iteration"] == e["from_epoch"] + 1
            assert restored["lr"] == pytest.approx(e["new"]["train.lr"])
            assert restored["lr"] != pytest.approx(e["donor"]["train.lr"])
            checked += 1
    assert checked, "no exploited trial reported an epoch after its exploit"
    for rows in history.values():  # and in every result, the rate is the trial's own
        assert all(r["lr"] == pytest.approx(r["config"]["train.lr"]) for r in rows)
    assert outcome.winners and outcome.stopped_by is None
