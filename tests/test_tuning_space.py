"""Search spaces are checked before anything starts, naming the key (no Ray here)."""

from __future__ import annotations

import pytest

from tests.conftest import CONFIGS
from trainyard.config import load_config
from trainyard.errors import ConfigError
from trainyard.tune.space import apply_values, param_space, validate_space


def space_error(space: dict, **tune) -> str:
    base = {"tune": {"space": space, **tune}}
    with pytest.raises(ConfigError) as info:
        validate_space(load_config(CONFIGS / "tune_mlp.yaml", base=base))
    return str(info.value)


def test_shipped_tune_configs_are_valid():
    for name in ("tune_mlp", "tune_cnn"):
        samples = validate_space(load_config(CONFIGS / f"{name}.yaml"))
        assert "train.lr" in samples and "train.batch_size" in samples


def test_a_dimension_overridden_on_the_command_line_keeps_its_dotted_name():
    """tune.space.train.lr=... was split at every dot (tune > space > train > lr)."""
    cfg = load_config(CONFIGS / "tune_mlp.yaml", ["tune.space.train.lr={type: uniform, low: 0.001, high: 0.1}",
                                                  "tune.space.train.batch_size.values=[8,16]", "train.epochs=2"])
    assert (cfg.tune.space["train.lr"].type, cfg.tune.space["train.lr"].high) == ("uniform", 0.1)
    assert list(cfg.tune.space["train.batch_size"]["values"]) == [8, 16] and cfg.train.epochs == 2
    assert "train" not in cfg.tune.space
    validate_space(cfg)
    # A mapping is a whole dimension, though its key ends in a field's name (a param "type").
    typed = load_config(CONFIGS / "tune_mlp.yaml", ["tune.space.model.params.type={type: choice, values: [a, b]}"])
    assert list(typed.tune.space["model.params.type"]["values"]) == ["a", "b"]


def test_space_naming_an_unknown_key_is_rejected_with_the_key():
    message = space_error({"train.lrate": {"type": "loguniform", "low": 1e-4, "high": 1e-2}})
    assert message.startswith("tune.space.train.lrate")


def test_space_naming_an_unknown_plugin_param_is_rejected_with_the_key():
    message = space_error({"model.params.hiden": {"type": "choice", "values": [[8], [16]]}})
    assert "tune.space.model.params.hiden" in message and "model.params.hiden" in message


def test_low_above_high_is_rejected():
    message = space_error({"train.lr": {"type": "loguniform", "low": 0.1, "high": 0.001}})
    assert message.startswith("tune.space.train.lr: low (0.1) must be below high (0.001)")


def test_empty_choice_is_rejected():
    message = space_error({"train.batch_size": {"type": "choice", "values": []}})
    assert message.startswith("tune.space.train.batch_size.values")


def test_value_of_the_wrong_type_is_rejected():
    message = space_error({"train.batch_size": {"type": "choice", "values": [16, "big"]}})
    assert message.startswith("tune.space.train.batch_size: value 'big' is invalid")
    message = space_error({"train.batch_size": {"type": "uniform", "low": 8, "high": 64}})
    assert "is an integer" in message


def test_value_a_plugin_refuses_is_rejected():
    message = space_error({"model.params.dropout": {"type": "uniform", "low": 0.0, "high": 1.5}})
    assert message.startswith("tune.space.model.params.dropout: value 1.5 is invalid")


def test_unknown_dimension_type_and_search_are_rejected():
    assert "normal" in space_error({"train.lr": {"type": "normal", "low": 0.1, "high": 1}})
    with pytest.raises(ConfigError, match="tune.search"):
        load_config(CONFIGS / "tune_mlp.yaml", ["tune.search=bayes"])


def test_grid_search_needs_grid_dimensions():
    with pytest.raises(ConfigError, match="tune.search: grid needs"):
        load_config(CONFIGS / "tune_mlp.yaml", ["tune.search=grid"])


def test_loguniform_needs_a_positive_low():
    assert "positive low" in space_error({"train.lr": {"type": "loguniform", "low": 0, "high": 1}})


def test_trial_values_are_applied_and_revalidated():
    cfg = load_config(CONFIGS / "tune_mlp.yaml")
    applied = apply_values(cfg, {"train.lr": 0.05, "model.params.dropout": 0.2})
    assert applied.train.lr == 0.05 and applied.model.params.dropout == 0.2
    assert applied.tune is None
    with pytest.raises(ConfigError, match="train.batch_size"):
        apply_values(cfg, {"train.batch_size": "many"})


def test_trial_values_from_one_search_config_stay_apart():
    """A trial process checks the search's config once and merges each trial's values into
    a copy: no trial's values leak into the next, lists are replaced whole, and the value
    rules still hold."""
    from omegaconf import OmegaConf

    job = OmegaConf.to_container(load_config(CONFIGS / "tune_mlp.yaml"), resolve=True)
    first = apply_values(job, {"train.lr": 0.05, "model.params.hidden": [8]})
    second = apply_values(job, {"train.batch_size": 16})
    assert first.train.lr == 0.05 and list(first.model.params.hidden) == [8]
    assert second.train.lr == job["train"]["lr"] and second.train.batch_size == 16
    assert list(second.model.params.hidden) == job["model"]["params"]["hidden"]
    with pytest.raises(ConfigError, match="train.batch_size: must be at least 1"):
        apply_values(job, {"train.batch_size": 0})
    with pytest.raises(ConfigError, match="train.scheduler"):
        apply_values(job, {"train.scheduler": "sometimes"})
    assert apply_values(job, {}).train.batch_size == job["train"]["batch_size"]


def test_param_space_maps_each_dimension_type():
    from ray import tune

    base = {"tune": {"search": "random", "space": {
        "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
        "model.params.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
        "train.epochs": {"type": "randint", "low": 1, "high": 4},
        "train.batch_size": {"type": "grid", "values": [16, 32]},
        "model.params.hidden": {"type": "choice", "values": [[8], [16, 8]]},
    }}}
    cfg = load_config(CONFIGS / "tune_mlp.yaml", base=base)
    validate_space(cfg)
    space = param_space(cfg)
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert isinstance(space["train.epochs"], tune.search.sample.Integer)
    assert space["train.batch_size"] == {"grid_search": [16, 32]}
    assert space["model.params.hidden"].categories == [[8], [16, 8]]
