"""The search space of a tune section: validated against the job schema and the plugins'
param schemas before anything starts, applied to a trial's config, and handed to Tune."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainyard.config import load_config, resolve, with_values
from trainyard.errors import ConfigError

def _dimension_samples(key: str, dim: Any) -> list:
    """The values a dimension can take at its edges, to check against the schema."""
    kind = dim.type
    where = f"tune.space.{key}"
    if kind in ("choice", "grid"):
        if dim["values"] is None or len(dim["values"]) == 0:
            raise ConfigError(f"{where}.values: {kind} needs a non-empty list of values")
        return list(OmegaConf.to_container(dim["values"]) if isinstance(dim["values"], DictConfig) else dim["values"])
    for bound in ("low", "high"):
        if getattr(dim, bound) is None:
            raise ConfigError(f"{where}.{bound}: {kind} needs low and high")
        if not math.isfinite(getattr(dim, bound)):
            raise ConfigError(f"{where}.{bound}: must be a finite number (got {getattr(dim, bound)})")
    if dim.low >= dim.high:
        raise ConfigError(f"{where}: low ({dim.low:g}) must be below high ({dim.high:g})")
    if kind == "loguniform" and dim.low <= 0:
        raise ConfigError(f"{where}.low: loguniform needs a positive low (got {dim.low:g})")
    if kind == "randint":
        if dim.low != int(dim.low) or dim.high != int(dim.high):
            raise ConfigError(f"{where}: randint needs integer low and high")
        return [int(dim.low), int(dim.high) - 1]
    return [dim.low, dim.high]


#: Keys that are the search's, not a trial's: where it runs and stores, and how it searches.
NOT_SEARCHED = ("name", "storage_path", "tracking", "tune", "scaling", "checkpoint",
                "train.metrics", "train.monitor")
NOT_SEARCHED_PREFIXES = ("tune.", "tracking.", "scaling.", "checkpoint.")


def validate_space(cfg: DictConfig) -> dict[str, list]:
    """Check every dimension against the job schema and the plugins' param schemas."""
    space = cfg.tune.space
    if not space:
        raise ConfigError("tune.space: empty; give at least one dimension, e.g. train.lr")
    samples: dict[str, list] = {}
    for key, dim in space.items():
        if key in NOT_SEARCHED or key.startswith(NOT_SEARCHED_PREFIXES):
            raise ConfigError(f"tune.space.{key}: {key} is the search's own setting, the same for every "
                              "trial; it cannot be searched")
        values = _dimension_samples(key, dim)
        current = OmegaConf.select(cfg, key, default="__missing__")
        if current == "__missing__" and not key.startswith(("model.params.", "data.params.")):
            raise ConfigError(f"tune.space.{key}: {key} is not a config key")
        if isinstance(current, int) and not isinstance(current, bool) and dim.type in ("uniform", "loguniform"):
            raise ConfigError(
                f"tune.space.{key}: {key} is an integer; use randint, choice or grid, not {dim.type}"
            )
        for value in values:
            try:
                resolve(apply_values(cfg, {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: value {value!r} is invalid: {exc}") from None
        samples[key] = values
    mutable_keys(cfg)
    return samples


#: Keys an exploit may change mid-trial: the loop applies them to the restored optimizer
#: (lr, weight_decay, momentum), reads them each epoch, or builds the model and data from
#: them when the trial starts again (plugin params: the weights must still fit the model).
MUTABLE_KEYS = ("train.lr", "train.weight_decay", "train.momentum", "train.grad_clip",
                "train.batch_size", "train.grad_accum_steps")
MUTABLE_PREFIXES = ("model.params.", "data.params.")
#: Mutable unless a dimension says ``mutable: false``.
MUTABLE_BY_DEFAULT = ("train.lr", "train.weight_decay", "train.momentum")


def is_mutable(key: str, dim: Any) -> bool:
    """Whether PBT may change ``key`` mid-trial: the dimension's ``mutable``, else the
    default (lr, weight decay, momentum and dropout-like plugin params)."""
    flag = dim.get("mutable") if hasattr(dim, "get") else getattr(dim, "mutable", None)
    if flag is not None:
        return bool(flag)
    if key in MUTABLE_BY_DEFAULT:
        return True
    return key.startswith("model.params.") and "dropout" in key.rsplit(".", 1)[-1]


def mutable_keys(cfg: DictConfig) -> list[str]:
    """The space's keys PBT may change, checked: each must be one a trial can take up
    mid-run, and under ``tune.scheduler: pbt`` there must be one at least."""
    keys = []
    for key, dim in cfg.tune.space.items():
        if not is_mutable(key, dim):
            continue
        if key not in MUTABLE_KEYS and not key.startswith(MUTABLE_PREFIXES):
            raise ConfigError(
                f"tune.space.{key}.mutable: {key} cannot change in the middle of a trial; mutable "
                f"keys are {', '.join(MUTABLE_KEYS)} and model.params.* / data.params.*"
            )
        keys.append(key)
    if cfg.tune.scheduler == "pbt" and not keys:
        raise ConfigError(
            "tune.space: tune.scheduler: pbt needs a mutable dimension (train.lr, train.weight_decay, "
            "train.momentum and dropout params are by default; mark others with mutable: true)"
        )
    return keys


def apply_values(cfg: DictConfig | dict, values: dict[str, Any]) -> DictConfig:
    """The job config (or its plain dict) with the trial's values in place, re-validated.
    A Tune trial calls this once as it starts: the search's config is checked once per
    process (kept for the next trial) and only the trial's values are merged into it and
    checked (the whole config through OmegaConf per trial cost a one-epoch trial of the MLP
    about a tenth of its time here)."""
    # Read only (the trial's values go into their own tree): no copy of a plain dict.
    whole = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    base = {k: v for k, v in whole.items() if k != "tune"}
    tree: dict = {}
    for key, value in values.items():
        _set_path(tree, key, value)
    return with_values(_checked_base(base), tree)


#: The last search config apply_values checked in this process: [(its repr, config)].
_LAST_BASE: list = []


def _checked_base(base: dict) -> DictConfig:
    """``base`` loaded and checked; the same config again (a Tune trial process runs many
    trials of one search) comes from the last call. It is only ever merged from (a copy)."""
    key = repr(base)
    if _LAST_BASE and _LAST_BASE[0][0] == key:
        return _LAST_BASE[0][1]
    checked = load_config(base=base)
    _LAST_BASE[:] = [(key, checked)]
    return checked


def _set_path(tree: dict, key: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for the key ``a.b.c``, adding mappings that are missing
    (a plugin param the config leaves at its default)."""
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def param_space(cfg: DictConfig) -> dict:
    return {key: domain(dim) for key, dim in cfg.tune.space.items()}


def domain(dim: Any) -> Any:
    """Tune's sampling domain for one dimension (a grid: Tune's grid_search)."""
    from ray import tune

    values = OmegaConf.to_container(dim["values"]) if dim["values"] is not None else None
    if dim.type == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.type == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.type == "randint":
        return tune.randint(int(dim.low), int(dim.high))
    if dim.type == "choice":
        return tune.choice(values)
    return tune.grid_search(values)
