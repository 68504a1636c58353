"""Job configs: typed schemas merged with YAML files and ``key=value`` overrides.

Every key a job YAML may hold is a field below; its comment is the reference. Unknown
keys, wrong types, missing values and plugin params that do not match the plugin's own
schema are rejected here, before Ray starts, naming the key's full path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainyard.errors import ConfigError, PluginError
from trainyard.names import RULE_TEXT, name_problem

# The choices of a key are its type: OmegaConf refuses any other value, naming the key.
Optimizer = Literal["adam", "adamw", "sgd"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DimensionType = Literal["loguniform", "uniform", "randint", "choice", "grid"]
Search = Literal["random", "grid", "optuna"]
Scheduler = Literal["asha", "pbt", "none"]
Mode = Literal["", "max", "min"]
LRSchedule = Literal["none", "cosine", "linear", "step", "onecycle"]
Stopper = Literal["none", "plateau"]
Backend = Literal["auto", "nccl", "gloo"]
Placement = Literal["pack", "spread"]
Shuffle = Literal["none", "local", "full"]
#: Kept a plain string: YAML reads a bare true/false as a boolean.
USE_GPU = ("auto", "true", "false")


def choices(literal: Any) -> tuple[str, ...]:
    """The values a Literal choice type allows."""
    return get_args(literal)


@dataclass
class ModelConfig:
    #: Name of a model a plugin registers (``trainyard plugins`` lists them).
    name: str = MISSING
    #: The model plugin's own params, checked against its schema.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamConfig:
    """How a streaming dataset (the built-in ``files``, or a plugin's Ray Dataset) reaches
    the workers. In-memory datasets ignore this section."""

    #: Per epoch: none (file order), local (a buffer of shuffle_buffer rows on each
    #: worker) or full (a global shuffle of the training rows by Ray Data, every epoch).
    shuffle: Shuffle = "local"
    #: Rows in each worker's local shuffle buffer.
    shuffle_buffer: int = 10000
    #: Rows the model's processor learns its state from (scaling, vocabulary): a seeded
    #: random sample of the training split, drawn in one streaming pass.
    fit_sample: int = 10000
    #: Fetches each worker prepares ahead of the one it trains on (twice as many wait
    #: in its queue, so that the next epoch's read begins before this one's last steps).
    prefetch_batches: int = 2
    #: Rows a worker takes from its stream at a time, then splits into steps of its local
    #: batch: Ray Data's cost per batch is paid once per fetch, not once per step (rounded
    #: down to a multiple of the local batch, at most an eighth of block_mb, and never
    #: under one batch).
    fetch_rows: int = 8192
    #: A worker keeps its validation shard in memory after the first pass when every
    #: worker's shard is under this many MB (the stream is not restarted each epoch); 0
    #: never keeps it.
    val_cache_mb: int = 32
    #: Ray Data's largest block, in MB: what a worker holds of the stream at a time is a
    #: few blocks, so smaller blocks bound its memory (a whole file is one block at most
    #: 128 MB by default).
    block_mb: int = 32
    #: Keep the encoded rows in Ray's object store, read and encoded once, instead of
    #: reading the files every epoch: true, false, or auto (when the data, as the dataset
    #: estimates it, is under a quarter of the cluster's object store; a search's trials
    #: then share one read too).
    cache: str = "auto"


@dataclass
class DataConfig:
    #: Name of a dataset a plugin registers.
    name: str = MISSING
    #: The dataset plugin's own params, checked against its schema.
    params: dict[str, Any] = field(default_factory=dict)
    #: Share of the training split held out for validation when the dataset has none.
    val_fraction: float = 0.2
    stream: StreamConfig = field(default_factory=StreamConfig)


@dataclass
class TrainConfig:
    epochs: int = 10
    #: Global batch size; split evenly across the workers.
    batch_size: int = 64
    lr: float = 1e-3
    #: adam, adamw or sgd (with momentum).
    optimizer: Optimizer = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    #: auto (bf16 autocast on a GPU that supports it, else fp32), fp32, bf16 or fp16.
    #: Mixed precision only applies on GPU; CPU runs use fp32.
    precision: Precision = "auto"
    #: Clip the gradient norm to this value; null for no clipping.
    grad_clip: float | None = None
    #: Validation metrics by name; empty means the metric plugins' defaults for the task
    #: (with the built-ins, classification: loss, accuracy, f1; regression: loss, mse, mae).
    metrics: list[str] = field(default_factory=list)
    #: Metric that picks the best checkpoint; empty means the first metric.
    monitor: str = ""
    #: Threads each worker's torch uses; 0 means cpus_per_worker.
    torch_threads: int = 0
    #: Learning-rate schedule over the run's optimizer steps: none, cosine or linear decay
    #: to 0 (transformers' schedules, after the warmup), step (times lr_gamma every
    #: lr_step_epochs epochs), or onecycle (PyTorch's OneCycleLR, peaking at lr).
    scheduler: LRSchedule = "none"
    #: Warmup: the learning rate rises linearly from 0 over these optimizer steps...
    warmup_steps: int = 0
    #: ... or over this share of all the run's optimizer steps (used when warmup_steps is 0).
    warmup_ratio: float = 0.0
    lr_step_epochs: int = 1
    lr_gamma: float = 0.1
    #: Micro-batches per optimizer step: each worker's share of the global batch is split in
    #: this many forward/backward passes (gradients synced once), so batch_size keeps its
    #: meaning: num_workers x grad_accum_steps x micro-batch = batch_size.
    grad_accum_steps: int = 1
    #: Early stopping: stop when the monitored metric has not improved by more than
    #: min_delta for this many epochs; 0: never.
    patience: int = 0
    min_delta: float = 0.0


@dataclass
class ScalingConfig:
    #: Ray Train workers (DDP processes): gloo on CPU, NCCL on GPU.
    num_workers: int = 1
    #: auto (use GPUs when the cluster has them), true or false.
    use_gpu: str = "auto"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    #: Extra custom Ray resources per worker, e.g. {accelerator_type:H100: 0.01}.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    #: The DDP process group: auto (NCCL on GPUs, gloo on CPUs), nccl or gloo. gloo on
    #: GPUs lets several workers share one GPU (gpus_per_worker=0.5), which NCCL refuses.
    backend: Backend = "auto"
    #: Where the workers go: pack (as few nodes as possible, Ray Train's default) or
    #: spread (one per node as far as they go: each node reads its own share of streamed
    #: data, and one node's loss stops fewer workers).
    placement: Placement = "pack"


@dataclass
class CheckpointConfig:
    #: Checkpoints kept per run (the best by ``train.monitor`` and the latest survive).
    num_to_keep: int = 2
    #: Worker failures tolerated; each restarts from the latest checkpoint. -1: unlimited.
    max_failures: int = 0


@dataclass
class Dimension:
    """One dimension of a search space, keyed by the config key it sets."""

    #: loguniform | uniform (floats, low..high) | randint (integers, low..high-1) |
    #: choice (random among values) | grid (every value, each in its own trial)
    type: DimensionType = MISSING
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list[Any]] = None
    #: PBT (``tune.scheduler: pbt``): may an exploit change this value mid-trial? null: the
    #: default, true for train.lr, train.weight_decay, train.momentum and any model param
    #: whose name holds "dropout"; true/false to say so for any other key.
    mutable: Optional[bool] = None


@dataclass
class PBTConfig:
    """``tune.scheduler: pbt``: Ray Tune's PopulationBasedTraining over the trials."""

    #: Epochs between perturbations: every this many epochs a trial in the bottom quantile
    #: copies the checkpoint of one in the top quantile and perturbs its mutable values.
    perturbation_interval: int = 2
    #: Epochs before the first perturbation.
    burn_in_period: int = 0
    #: Share of the population in the bottom quantile (which copies) and in the top one
    #: (which is copied); above 0 and at most 0.5.
    quantile_fraction: float = 0.25
    #: Chance that a mutable value is drawn afresh from its space instead of perturbed.
    resample_probability: float = 0.25
    #: A perturbed float is multiplied by one of these (an integer is then rounded; a
    #: choice moves to a neighbouring value instead). Values stay within low..high.
    perturbation_factors: list[float] = field(default_factory=lambda: [1.2, 0.8])
    #: true: every trial pauses at each interval and the population perturbs together
    #: (lets a population larger than the cluster take turns); false: each trial on its own.
    synch: bool = False


@dataclass
class TuneConfig:
    """``trainyard tune``: the search space and how to search it."""

    #: Config key (e.g. train.lr, train.batch_size, model.params.dropout) to dimension.
    space: dict[str, Dimension] = field(default_factory=dict)
    #: Metric to optimise (a name from train.metrics); empty: train.monitor.
    metric: str = ""
    #: max or min; empty: the metric's own direction.
    mode: Mode = ""
    #: random | grid (every combination of grid dimensions) | optuna (TPE).
    search: Search = "random"
    #: asha (stop weak trials early) | pbt (population based training: weak trials copy
    #: strong ones and perturb their mutable values; see tune.pbt) | none.
    scheduler: Scheduler = "asha"
    #: Trials to sample (for grid: repetitions of the whole grid).
    num_samples: int = 8
    max_concurrent_trials: int = 2
    #: Stop starting and running trials after this many seconds, counted from the search's
    #: first step (after its start-up), in total over resumes; the winners found so far are
    #: exported and the run says the budget ended it (stopped_by). null: no limit.
    time_budget_s: Optional[float] = None
    #: plateau: also end a trial whose metric has stopped moving (Ray Tune's
    #: TrialPlateauStopper: std of the last plateau_epochs values below plateau_std), next
    #: to any scheduler; none: trials end at train.epochs or by the scheduler.
    stopper: Stopper = "none"
    plateau_epochs: int = 3
    plateau_std: float = 0.001
    #: ASHA: epochs every trial gets before it can be stopped, and the cut factor.
    grace_period: int = 1
    reduction_factor: int = 2
    #: ASHA: compare a trial only with the trials on the same learning-rate schedule
    #: (train.scheduler, where the space varies it, and the epoch its warmup ends in): the
    #: same successive halving within each. false: Ray Tune's ASHA, all trials together.
    asha_per_schedule: bool = True
    #: PBT's settings (used with scheduler: pbt).
    pbt: PBTConfig = field(default_factory=PBTConfig)
    #: How many of the best trials to export.
    top_k: int = 1
    #: Winners registry: a folder or a URI; each search's winners go to a new version,
    #: <registry>/<name>/v<N>/rank_<k>/, made current by <registry>/<name>/winners.json.
    registry: str = "winners"


# --- tracking (trainyard.tracking; docs/tracking.md) ------------------------------------
TrackingBackend = Literal["none", "mlflow"]


@dataclass
class TrackingConfig:
    """``tracking``: log runs and trials to an experiment tracker (off by default)."""

    #: none (off) | mlflow.
    backend: TrackingBackend = "none"
    #: The MLflow tracking server (http://host:5000) or any MLflow tracking URI; empty: a
    #: local store inside the run folder (<run>/mlflow.db, artifacts in <run>/mlartifacts).
    uri: str = ""
    #: MLflow experiment; empty: the job's name.
    experiment: str = ""
    #: Log each run's and trial's final checkpoint as an artifact (a search's winners are
    #: logged and registered either way).
    log_checkpoints: bool = True


#: The URI schemes of MLflow's tracking stores (a database's driver may follow a '+').
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                    "databricks-uc", "uc")


def _plugin_tracking_store(scheme: str) -> bool:
    """An MLflow plugin package registers a tracking store for ``scheme`` (azureml://, ...)."""
    from importlib.metadata import entry_points

    return any(ep.name == scheme for ep in entry_points(group="mlflow.tracking_store"))


def _check_tracking(cfg: DictConfig) -> None:
    t = cfg.tracking
    if t.backend == "none":
        if t.uri:
            raise ConfigError(f"tracking.uri: set, but tracking.backend is none; add "
                              f"tracking.backend=mlflow (got {t.uri!r})")
        return
    if t.uri and "://" not in t.uri and t.uri != "databricks":
        raise ConfigError(f"tracking.uri: must be a URI such as http://host:5000 or "
                          f"sqlite:////abs/path/mlflow.db (got {t.uri!r})")
    scheme = str(t.uri).split("://", 1)[0].split("+", 1)[0].lower() if "://" in str(t.uri) else ""
    if scheme and scheme not in TRACKING_SCHEMES and not _plugin_tracking_store(scheme):
        raise ConfigError(f"tracking.uri: MLflow has no tracking store for {scheme + '://'!r}; use one of "
                          f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} (got {t.uri!r})")
    if not t.uri and "://" in cfg.storage_path:
        raise ConfigError("tracking.uri: needed when storage_path is a URI (with no URI nor "
                          "$MLFLOW_TRACKING_URI the "
                          "tracking store lives in the run folder, which must be local)")
# --- end of tracking ---------------------------------------------------------------------


@dataclass
class JobConfig:
    #: Run name; a run started again with the same name resumes from its checkpoint.
    name: str = MISSING
    seed: int = 0
    #: Where runs live: a local folder or a URI every node reaches (s3://, gs://, ...).
    storage_path: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    #: Hyperparameter search (``trainyard tune``); ignored by ``trainyard train``.
    tune: Optional[TuneConfig] = None
    #: Experiment tracking (MLflow) of train runs and tune trials; off by default.
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class ResolvedJob:
    """A validated config with the plugin specs and typed params it names."""

    config: DictConfig
    model: Any
    dataset: Any
    metrics: list
    model_params: Any
    data_params: Any
    task: str

    @property
    def monitor(self) -> str:
        return self.config.train.monitor or self.config.train.metrics[0]

    @property
    def monitor_mode(self) -> str:
        return next(m.mode for m in self.metrics if m.name == self.monitor)

    # What every checkpoint of the job writes (its manifest's params, its job.yaml), worked
    # out once: a run writes one per epoch, and they cost a short epoch a noticeable share.
    @functools.cached_property
    def params_json(self) -> Any:
        return params_to_json(self.model_params)

    @functools.cached_property
    def config_yaml(self) -> str:
        return OmegaConf.to_yaml(self.config)


def _describe(exc: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    key = f"{prefix}{key}" if key else prefix.rstrip(".")
    message = str(exc).splitlines()[0].strip()
    if "not in" in message and "Key '" in message:
        message = f"unknown key (allowed here: {_allowed_keys(exc)})"
    elif "Missing mandatory value" in message:
        message = "missing required value"
    elif message.startswith("Incompatible value 'None' for field of type"):  # key= with no value
        message = f"must not be empty (a value of type {message.rsplit('type', 1)[1].strip(' .')})"
    elif "Value '" in message and "could not be converted" in message:
        message = "wrong type: " + message
    elif "is not a ListConfig, TupleConfig, list, or tuple" in message:  # a value for a list
        message = "must be a list, in brackets: [...] (got a single value)"
    elif message.startswith("Invalid value") and "expected one of" in message:
        allowed = message.split("expected one of", 1)[1].strip().strip("[]").replace("'", "")
        got = message.split("'", 2)[1] if message.count("'") >= 2 else "?"
        message = f"must be one of {allowed} (got {got!r})"
    return ConfigError(f"{key}: {message}" if key else message)


def _misplaced(cfg: DictConfig, layer: Any) -> str | None:
    """Why ``layer`` cannot merge onto ``cfg`` when OmegaConf does not say where (a list given
    for a section or a search dimension, a mapping for a list, a plain value for a section):
    the first key whose branch alone fails to merge, and what it was given; None if none."""
    if isinstance(layer, DictConfig):
        layer = OmegaConf.to_container(layer, resolve=False)
    if not isinstance(layer, dict):
        return None
    kinds = {list: "a list", dict: "a mapping of keys"}

    def find(branch: dict, path: tuple) -> str | None:
        for key, value in branch.items():
            here = (*path, str(key))
            nested: Any = value
            for part in reversed(here):
                nested = {part: nested}
            try:
                OmegaConf.merge(cfg, nested)
                continue
            except (TypeError, OmegaConfBaseException) as exc:
                if getattr(exc, "full_key", None):
                    continue
            target: Any = cfg
            for part in here:
                target = target.get(part) if isinstance(target, DictConfig) else None
            if isinstance(value, dict) and not isinstance(target, ListConfig):
                deeper = find(value, here)
                if deeper:
                    return deeper
            given = kinds.get(type(value), f"a plain value ({value!r})")
            return f"{'.'.join(here)}: {given} does not fit here (check the nesting against the schema)"
        return None

    return find(layer, ())


def _allowed_keys(exc: OmegaConfBaseException) -> str:
    return ", ".join(_param_names(getattr(exc, "object_type", None))) or "see the schema"


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``["train.lr=0.01", ...]`` to a config; a malformed override is a ConfigError."""
    plain, spaced = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        (spaced if key.startswith("tune.space.") else plain).append(item)
    try:
        cfg = OmegaConf.from_dotlist(plain)
        for item in spaced:  # a dimension's name is a dotted key itself: tune.space.train.lr
            key, value = item.split("=", 1)
            name = key.strip()[len("tune.space."):]
            dim, _, part = name.rpartition(".")
            parsed = OmegaConf.from_dotlist([f"value={value}"]).value
            # A mapping is a whole dimension (a plugin param may be named "type"); a plain
            # value after a field's name sets that field.
            one_field = dim and part in _DIMENSION_FIELDS and not isinstance(parsed, DictConfig)
            tree = {dim: {part: parsed}} if one_field else {name: parsed}
            cfg = OmegaConf.merge(cfg, {"tune": {"space": tree}})
        return cfg
    except Exception as exc:  # OmegaConf's own errors and YAML scanner errors alike
        raise ConfigError(f"override: {str(exc).splitlines()[0]}") from None


#: The fields of a search dimension (tune.space.<key>.<field>=value).
_DIMENSION_FIELDS = ("type", "low", "high", "values", "mutable")


@functools.lru_cache(maxsize=None)
def _structured(schema: type) -> DictConfig:
    """The schema's config of defaults, built once (a Tune trial builds its config from it
    each trial). OmegaConf.merge copies it, and nothing else gets it."""
    return OmegaConf.structured(schema)


def merge_config(schema: type, path: str | Path | None = None, overrides: list[str] | None = None,
                 base: Any = None, what: str = "config file", start: DictConfig | None = None) -> DictConfig:
    """``schema`` (a dataclass) + YAML file + ``base`` + ``key=value`` overrides, type-checked,
    every required value present. Job and serve configs both load through here. ``start``:
    an already type-checked config of ``schema`` to merge onto instead of the defaults."""
    layers: list[Any] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{what} {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        layers.append(loaded)
    if base is not None:
        layers.append(base)  # a dict or a config: OmegaConf.merge takes both
    if overrides:
        layers.append(parse_overrides(overrides))
    try:
        cfg = start if start is not None else _structured(schema)
        for layer in layers:
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except (TypeError, OmegaConfBaseException) as exc:
                clash = _misplaced(cfg, layer) if not getattr(exc, "full_key", None) else None
                if clash is None:
                    raise
                raise ConfigError(clash) from None
        # A checked start has every required value; only the layers could take one away.
        missing = sorted(OmegaConf.missing_keys(cfg)) \
            if start is None or any(OmegaConf.missing_keys(layer) for layer in layers) else []
    except OmegaConfBaseException as exc:
        raise _describe(exc) from None
    if missing:
        raise ConfigError(f"{missing[0]}: missing required value")
    return cfg


def check_rules(cfg: DictConfig, rules: list[tuple[bool, str, str]]) -> None:
    """Raise for the first ``(ok, key, message)`` rule that fails, naming the key and its value."""
    for ok, key, message in rules:
        if not ok:
            value = OmegaConf.select(cfg, key.split(" ")[0])
            raise ConfigError(f"{key}: {message} (got {value!r})")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | DictConfig | None = None,
    new_job: bool = False,
) -> DictConfig:
    """Schema + YAML file (or ``base``) + overrides, type-checked. Raises ConfigError.
    ``new_job``: a job the user starts now (not a saved config read back: a resumed search,
    a checkpoint's job), which takes an empty ``tracking.uri`` from ``$MLFLOW_TRACKING_URI``."""
    cfg = merge_config(JobConfig, path, overrides, base)
    from_env = new_job and _tracking_uri_from_env(cfg)
    try:
        _check_values(cfg)
    except ConfigError as exc:
        if from_env and str(exc).startswith("tracking.uri:"):
            raise ConfigError("tracking.uri (from $MLFLOW_TRACKING_URI):" + str(exc)[len("tracking.uri:"):]) from None
        raise
    return cfg


def _tracking_uri_from_env(cfg: DictConfig) -> bool:
    """With MLflow tracking on and no ``tracking.uri``, ``$MLFLOW_TRACKING_URI`` names the store,
    as it does for MLflow itself; it is written into the config, so the run folder says where
    the run was tracked. True when it was taken from there."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env and cfg.tracking.backend == "mlflow" and not cfg.tracking.uri:
        cfg.tracking.uri = env
        return True
    return False


def with_values(cfg: DictConfig, tree: dict) -> DictConfig:
    """A checked job config with the values of ``tree`` (nested keys) merged in, type-checked
    and checked again: only ``tree`` is converted, not the whole config. ``cfg`` is left as
    it is (the merge works on a copy)."""
    merged = merge_config(JobConfig, base=tree, start=cfg)
    _check_values(merged)
    return merged


def _check_values(cfg: DictConfig) -> None:
    t, s, c = cfg.train, cfg.scaling, cfg.checkpoint
    rules = [
        (name_problem(cfg.name) is None, "name", f"must be {RULE_TEXT}"),
        (0 <= cfg.seed < 2**32, "seed", "must be 0 to 2**32 - 1 (numpy's and torch's seed range)"),
        (t.epochs >= 1, "train.epochs", "must be at least 1"),
        (t.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (0 <= t.lr < math.inf, "train.lr", "must be a finite number, not negative"),
        (0 <= t.weight_decay < math.inf, "train.weight_decay", "must be a finite number, not negative"),
        (0 <= t.momentum < math.inf, "train.momentum", "must be a finite number, not negative"),
        (t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be positive or null"),
        (t.torch_threads >= 0, "train.torch_threads", "must not be negative"),
        (t.warmup_steps >= 0, "train.warmup_steps", "must not be negative"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be at least 0 and below 1"),
        (t.lr_step_epochs >= 1, "train.lr_step_epochs", "must be at least 1"),
        (0 < t.lr_gamma <= 1, "train.lr_gamma", "must be above 0 and at most 1"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be at least 1"),
        (t.patience >= 0, "train.patience", "must not be negative (0: no early stopping)"),
        (t.min_delta >= 0, "train.min_delta", "must not be negative"),
        (
            t.grad_accum_steps == 1 or t.batch_size >= s.num_workers * t.grad_accum_steps,
            "train.batch_size",
            f"({t.batch_size}) must be at least scaling.num_workers x train.grad_accum_steps "
            f"({s.num_workers} x {t.grad_accum_steps})",
        ),
        (s.num_workers >= 1, "scaling.num_workers", "must be at least 1"),
        (str(s.use_gpu).lower() in USE_GPU, "scaling.use_gpu", "must be auto, true or false"),
        (0 < s.cpus_per_worker < math.inf, "scaling.cpus_per_worker", "must be a positive finite number"),
        (0 < s.gpus_per_worker < math.inf, "scaling.gpus_per_worker", "must be a positive finite number"),
        (
            t.batch_size >= s.num_workers,
            "train.batch_size",
            f"({t.batch_size}) must be at least scaling.num_workers ({s.num_workers})",
        ),
        (0 < cfg.data.val_fraction < 1, "data.val_fraction", "must be between 0 and 1"),
        (cfg.data.stream.shuffle_buffer >= 1, "data.stream.shuffle_buffer", "must be at least 1"),
        (cfg.data.stream.fit_sample >= 1, "data.stream.fit_sample", "must be at least 1"),
        (cfg.data.stream.prefetch_batches >= 0, "data.stream.prefetch_batches", "must not be negative"),
        (cfg.data.stream.block_mb >= 1, "data.stream.block_mb", "must be at least 1"),
        (cfg.data.stream.fetch_rows >= 1, "data.stream.fetch_rows", "must be at least 1"),
        (cfg.data.stream.val_cache_mb >= 0, "data.stream.val_cache_mb", "must not be negative"),
        (str(cfg.data.stream.cache).lower() in USE_GPU, "data.stream.cache", "must be auto, true or false"),
        (c.num_to_keep >= 1, "checkpoint.num_to_keep", "must be at least 1"),
        (c.max_failures >= -1, "checkpoint.max_failures", "must be -1 (unlimited) or more"),
    ]
    if cfg.tune is not None:
        u = cfg.tune
        rules += [
            (u.num_samples >= 1, "tune.num_samples", "must be at least 1"),
            (u.max_concurrent_trials >= 1, "tune.max_concurrent_trials", "must be at least 1"),
            (u.time_budget_s is None or u.time_budget_s > 0, "tune.time_budget_s", "must be positive or null"),
            (u.grace_period >= 1, "tune.grace_period", "must be at least 1"),
            (u.reduction_factor >= 2, "tune.reduction_factor", "must be at least 2"),
            (u.top_k >= 1, "tune.top_k", "must be at least 1"),
            (u.plateau_epochs >= 2, "tune.plateau_epochs", "must be at least 2"),
            (u.plateau_std >= 0, "tune.plateau_std", "must not be negative"),
        ]
        kinds = {dim.type for dim in u.space.values()}
        if u.search == "grid" and kinds - {"grid"}:
            raise ConfigError("tune.search: grid needs every tune.space dimension to be of type grid")
        if u.search == "optuna" and "grid" in kinds:
            raise ConfigError("tune.search: optuna cannot search grid dimensions; use choice")
        if u.scheduler == "pbt":
            rules += _pbt_rules(cfg)
    check_rules(cfg, rules)
    _check_tracking(cfg)
    s.use_gpu = str(s.use_gpu).lower()


def _pbt_rules(cfg: DictConfig) -> list[tuple[bool, str, str]]:
    """What ``tune.scheduler: pbt`` needs of the rest of the config."""
    u, p = cfg.tune, cfg.tune.pbt
    if u.search == "optuna":
        raise ConfigError(
            "tune.search: optuna cannot be combined with tune.scheduler: pbt (PBT explores by "
            "copying and perturbing trials itself); use tune.search: random or grid")
    if cfg.scaling.num_workers != 1:
        raise ConfigError(
            f"scaling.num_workers: tune.scheduler: pbt runs one-worker trials (got "
            f"{cfg.scaling.num_workers}): a multi-worker trial's nested trainer has no checkpoint "
            "another trial could copy")
    population = u.num_samples
    for dim in u.space.values():
        if dim.type == "grid" and dim["values"]:
            population *= len(dim["values"])
    grid = "" if population == u.num_samples else " (tune.num_samples x the grid's points)"
    return [
        (population >= 2, "tune.num_samples", f"pbt needs a population of at least 2 trials{grid}"),
        (
            p.synch or u.max_concurrent_trials >= population,
            "tune.max_concurrent_trials",
            f"pbt trains its whole population ({population} trials{grid}) at once; set it to at "
            f"least {population}, or tune.pbt.synch: true to let the trials take turns",
        ),
        (
            1 <= p.perturbation_interval < cfg.train.epochs,
            "tune.pbt.perturbation_interval",
            f"must be at least 1 and below train.epochs ({cfg.train.epochs}), or no trial is ever "
            "perturbed",
        ),
        (p.burn_in_period >= 0, "tune.pbt.burn_in_period", "must not be negative"),
        (0 < p.quantile_fraction <= 0.5, "tune.pbt.quantile_fraction", "must be above 0 and at most 0.5"),
        (0 <= p.resample_probability <= 1, "tune.pbt.resample_probability", "must be between 0 and 1"),
        (
            len(p.perturbation_factors) >= 1 and all(f > 0 for f in p.perturbation_factors),
            "tune.pbt.perturbation_factors",
            "must be a non-empty list of positive factors",
        ),
    ]


def typed_params(schema: type | None, values: Any, path: str) -> Any:
    """Check plugin params against the plugin's dataclass; return an instance."""
    values = OmegaConf.to_container(values) if isinstance(values, DictConfig) else values
    if schema is None:
        if values:
            raise ConfigError(f"{path}: this plugin takes no params (got {sorted(values)})")
        return None
    _check_bools(schema, values or {}, path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values or {})
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{path}.{missing[0]}: missing required value")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _describe(exc, prefix=f"{path}.") from None
    except (TypeError, ValueError) as exc:  # a plugin's __post_init__ checks
        message = str(exc)
        field_name = message.split(" ", 1)[0].rstrip(":")
        if field_name in {f.name for f in dataclasses.fields(schema)}:
            raise ConfigError(f"{path}.{field_name}: {message[len(field_name):].lstrip(': ')}") from None
        raise ConfigError(f"{path}: {message}") from None


def _check_bools(schema: type, values: Any, path: str) -> None:
    """A bool param given a number other than 0 or 1 (OmegaConf would take ``flag=2`` as
    true, while ``--dry-run`` showed the 2)."""
    import types
    import typing

    if not isinstance(values, dict):
        return
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: OmegaConf's own checks apply
        return
    for name, hint in hints.items():
        optional_bool = typing.get_origin(hint) in (typing.Union, types.UnionType) and set(
            typing.get_args(hint)) == {bool, type(None)}
        if (hint is bool or optional_bool) and name in values:
            value = values[name]  # 0 and 1 (and the strings OmegaConf reads) stay as OmegaConf takes them
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
                raise ConfigError(f"{path}.{name}: must be true or false (got {value!r})")


def params_to_json(params: Any) -> Any:
    """Typed model params (the plugin's dataclass instance, or None) as plain JSON: every
    field, defaults included; anything JSON lacks (a Path, say) as its text, which
    :func:`typed_params` types back on load."""
    if params is None:
        return None
    data = OmegaConf.to_container(OmegaConf.structured(params), resolve=True, enum_to_str=True)
    return json.loads(json.dumps(data, default=str))


def _param_names(params: Any) -> list[str]:
    """The keys a schema takes: a dataclass's fields or a dict's keys ([] for anything else)."""
    if params is not None and dataclasses.is_dataclass(params):
        return [f.name for f in dataclasses.fields(params)]
    return [str(k) for k in params] if isinstance(params, dict) else []


def resolve(cfg: DictConfig, registry: Any = None) -> ResolvedJob:
    """Look up the plugins a config names and check they fit together."""
    if registry is None:
        from trainyard.plugins import get_registry

        registry = get_registry()

    def lookup(kind: str, name: str, key: str) -> Any:
        try:
            return registry.get(kind, name)
        except PluginError as exc:
            raise ConfigError(f"{key}: {exc}") from None

    model = lookup("model", cfg.model.name, "model.name")
    dataset = lookup("dataset", cfg.data.name, "data.name")
    model_params = typed_params(model.params, cfg.model.params, "model.params")
    data_params = typed_params(dataset.params, cfg.data.params, "data.params")
    task = dataset.task(data_params) if callable(dataset.task) else dataset.task
    inputs = dataset.inputs(data_params) if callable(dataset.inputs) else dataset.inputs
    if inputs not in model.inputs:
        raise ConfigError(
            f"model.name: model {model.name!r} takes {'/'.join(model.inputs)} inputs, but "
            f"dataset {dataset.name!r} gives {inputs} inputs"
            + (f" with these data.params, which decide its kind of inputs (its params: "
               f"{', '.join(_param_names(dataset.params))})" if callable(dataset.inputs) else "")
        )
    if not cfg.train.metrics:  # the metric plugins say which are reported by default
        cfg.train.metrics = [m.name for m in registry.metrics.values()
                             if m.default and m.task in ("any", task)]
    metrics = []
    for i, name in enumerate(cfg.train.metrics):
        metric = lookup("metric", name, f"train.metrics[{i}]")
        if metric.task not in ("any", task):
            raise ConfigError(
                f"train.metrics[{i}]: metric {name!r} is for {metric.task}, "
                f"but dataset {dataset.name!r} is {task}"
            )
        metrics.append(metric)
    if not metrics:
        raise ConfigError(f"train.metrics: no installed metric plugin reports a default metric for "
                          f"{task}; name the metrics to report in train.metrics")
    if cfg.train.monitor and cfg.train.monitor not in cfg.train.metrics:
        raise ConfigError(
            f"train.monitor: {cfg.train.monitor!r} is not one of train.metrics "
            f"({', '.join(cfg.train.metrics)})"
        )
    return ResolvedJob(cfg, model, dataset, metrics, model_params, data_params, task)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
