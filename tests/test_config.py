"""Config validation, before Ray starts: every bad key, type or pairing is rejected with
its full path; and the CLI turns those errors into one line, not a traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from trainyard.config import load_config, parse_overrides, resolve, typed_params
from trainyard.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "configs" / "serve.yaml"
# Job configs; serve.yaml is a serve config, checked below with its own schema.
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p != SERVE_CONFIG)
MLP = ROOT / "configs" / "mlp_breast_cancer.yaml"
TRAINYARD = Path(sys.executable).with_name("trainyard")
if not TRAINYARD.exists():  # the entry-point script pip installed next to this Python
    TRAINYARD = Path(shutil.which("trainyard") or TRAINYARD)


def config_error(*overrides: str, path=MLP, base=None, resolved=True) -> str:
    """The ConfigError message for a config, failing the test if there is none."""
    with pytest.raises(ConfigError) as err:
        cfg = load_config(path, list(overrides), base=base)
        if resolved:
            resolve(cfg)
    return str(err.value)


def minimal(**sections) -> dict:
    base = {"name": "job", "model": {"name": "mlp"}, "data": {"name": "breast_cancer"}}
    base.update(sections)
    return base


# --------------------------------------------------------------------------------------
# The shipped configs
# --------------------------------------------------------------------------------------


def test_shipped_serve_config_loads_with_its_schema():
    from trainyard.serve.config import load_serve_config

    cfg = load_serve_config(SERVE_CONFIG)
    assert [m.name for m in cfg.models] == ["mlp", "cnn"]
    assert cfg.models[1].max_replicas == 2


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_resolves(path):
    raw = OmegaConf.load(path)
    job = resolve(load_config(path))
    assert job.config.name == raw.name == path.stem
    assert job.model.name == raw.model.name
    assert job.dataset.name == raw.data.name
    assert [m.name for m in job.metrics] == list(raw.train.metrics)
    assert job.task == "classification"
    assert job.monitor == raw.train.metrics[0]
    for key, value in OmegaConf.to_object(raw.model.params).items():
        assert getattr(job.model_params, key) == value


def test_overrides_take_precedence_over_the_file_and_are_typed():
    cfg = load_config(MLP, ["train.epochs=3", "train.lr=0.5", "scaling.use_gpu=false"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.5
    assert cfg.scaling.use_gpu == "false"
    assert cfg.train.batch_size == 32  # from the file
    assert cfg.train.optimizer == "adamw"  # from the schema


def test_empty_metrics_resolve_to_the_task_defaults():
    job = resolve(load_config(MLP, ["train.metrics=[]"]))
    assert job.config.train.metrics == ["loss", "accuracy", "f1"]
    assert job.monitor == "loss" and job.monitor_mode == "min"


# --------------------------------------------------------------------------------------
# Keys, types, required values
# --------------------------------------------------------------------------------------


def test_unknown_config_key_is_rejected_with_its_path():
    message = config_error("train.epoch=3")
    assert message.startswith("train.epoch: unknown key")
    assert "epochs" in message  # the allowed keys, to spot the typo


def test_unknown_top_level_key_is_rejected_with_its_name():
    message = config_error("epochs=3")
    assert message.startswith("epochs: unknown key")
    assert "train" in message


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("trian:\n  epochs: 3\n", "trian"),
        ("train:\n  epoch: 3\n", "train.epoch"),
        ("scaling:\n  num_worker: 2\n", "scaling.num_worker"),
        ("checkpoint:\n  max_failure: 1\n", "checkpoint.max_failure"),
    ],
)
def test_unknown_key_in_a_yaml_file_is_rejected_with_its_path(tmp_path, yaml_text, key):
    path = tmp_path / "job.yaml"
    path.write_text("name: job\nmodel:\n  name: mlp\ndata:\n  name: breast_cancer\n" + yaml_text)
    assert config_error(path=path).startswith(f"{key}: unknown key")


def test_wrong_type_is_rejected_naming_the_key():
    message = config_error("train.epochs=abc")
    assert message.startswith("train.epochs: wrong type")
    assert "'abc'" in message


def test_wrong_type_in_a_nested_section_is_rejected_naming_the_key():
    assert config_error("scaling.num_workers=two").startswith("scaling.num_workers: wrong type")


def test_missing_run_name_is_rejected_naming_it():
    base = minimal()
    del base["name"]
    assert config_error(path=None, base=base) == "name: missing required value"


def test_missing_model_name_is_rejected_naming_it():
    assert config_error(path=None, base=minimal(model={})) == "model.name: missing required value"


def test_missing_config_file_is_a_config_error():
    assert "does not exist" in config_error(path=ROOT / "configs" / "no_such.yaml")


def test_config_file_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "must be a mapping" in config_error(path=path)


@pytest.mark.parametrize("item", ["foo", "=3", " =3"])
def test_malformed_override_is_rejected(item):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides([item])
    assert repr(item) in config_error(item)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.lr=-1", "train.lr"),
        ("train.optimizer=rmsprop", "train.optimizer"),
        ("train.precision=fp8", "train.precision"),
        ("train.grad_clip=0", "train.grad_clip"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("checkpoint.num_to_keep=0", "checkpoint.num_to_keep"),
        ("checkpoint.max_failures=-2", "checkpoint.max_failures"),
        ("name=a/b", "name"),
    ],
)
def test_out_of_range_value_is_rejected_naming_the_key(override, key):
    message = config_error(override, resolved=False)
    assert message.startswith(f"{key}: ")
    assert override.split("=", 1)[1].strip() in message  # the offending value is shown


def test_batch_size_smaller_than_num_workers_is_rejected():
    message = config_error("train.batch_size=2", "scaling.num_workers=4", resolved=False)
    assert message.startswith("train.batch_size:")
    assert "scaling.num_workers" in message and "(2)" in message and "(4)" in message
    load_config(MLP, ["train.batch_size=4", "scaling.num_workers=4"])  # equal is fine


# --------------------------------------------------------------------------------------
# Plugin params and plugin pairings
# --------------------------------------------------------------------------------------


def test_unknown_model_param_is_rejected_with_its_full_path():
    message = config_error("model.params.hiden=[8]")
    assert message.startswith("model.params.hiden: unknown key")
    assert "hidden" in message  # the plugin's own keys


def test_wrong_type_of_model_param_is_rejected_with_its_full_path():
    assert config_error("model.params.dropout=lots").startswith("model.params.dropout: wrong type")
    # One value where a list belongs: not OmegaConf's "AnyNode is not a ListConfig".
    assert config_error("model.params.hidden=64") == \
        "model.params.hidden: must be a list, in brackets: [...] (got a single value)"


def test_model_param_value_the_plugin_refuses_is_rejected():
    message = config_error("model.params.activation=bogus")
    assert message.startswith("model.params.activation: must be one of")
    assert "relu" in message


@pytest.mark.parametrize("override, expected", [
    ("model.params.num_heads=0", "model.params.num_heads: must be at least 1"),
    ("model.params.num_layers=0", "model.params.num_layers: must be at least 1"),
    ("model.params.vocab_size=0", "model.params.vocab_size: must be above 5"),
    ("model.params.dropout=2", "model.params.dropout: must be in [0, 1)"),
    ("model.params.hidden_size=63", "model.params.hidden_size: must be a multiple of num_heads"),
])
def test_bert_params_are_checked_before_ray_starts(override, expected):
    bert = ROOT / "configs" / "bert_sentiment.yaml"
    assert config_error(override, path=bert).startswith(expected)


def test_params_for_a_dataset_that_takes_none_are_rejected():
    message = config_error("data.params.path=/tmp/x.csv")
    assert message.startswith("data.params: this plugin takes no params")
    assert "path" in message


def test_dataset_param_missing_a_required_value_is_rejected():
    base = minimal(data={"name": "table"})
    assert config_error(path=None, base=base).startswith("data.params.path: give the CSV")


def test_typed_params_returns_an_instance_of_the_plugin_schema():
    from trainyard.plugins import get_registry

    spec = get_registry().get("model", "mlp")
    params = typed_params(spec.params, {"hidden": [8], "dropout": 0.5}, "model.params")
    assert isinstance(params, spec.params)
    assert params.hidden == [8] and params.dropout == 0.5 and params.activation == "relu"


def test_a_bool_param_given_a_number_is_refused_not_read_as_true():
    import dataclasses

    @dataclasses.dataclass
    class Flags:
        flag: bool = False
        maybe: bool | None = None

    for value in (2, 0.5, -1):
        with pytest.raises(ConfigError, match=rf"model.params.flag: must be true or false \(got {value!r}\)"):
            typed_params(Flags, {"flag": value}, "model.params")
    assert typed_params(Flags, {"flag": True, "maybe": "false"}, "model.params") == Flags(True, False)
    assert typed_params(Flags, {"flag": 1, "maybe": 0}, "model.params") == Flags(True, False)  # as before
    with pytest.raises(ConfigError, match="model.params.maybe: must be true or false"):
        typed_params(Flags, {"maybe": 7}, "model.params")


def test_model_that_cannot_take_the_datasets_inputs_is_rejected():
    message = config_error(path=None, base=minimal(model={"name": "cnn"}))
    assert message.startswith("model.name:")
    assert "'cnn' takes image inputs" in message and "'breast_cancer' gives features" in message


def test_metric_for_the_wrong_task_is_rejected_naming_its_position():
    message = config_error("train.metrics=[loss,mse]")
    assert message.startswith("train.metrics[1]:")
    assert "'mse' is for regression" in message and "classification" in message


def test_classification_metric_on_a_regression_dataset_is_rejected(tmp_path):
    base = minimal(
        data={"name": "table", "params": {"path": str(tmp_path / "t.csv"), "task": "regression"}},
        train={"metrics": ["mae", "accuracy"]},
    )
    message = config_error(path=None, base=base)
    assert message.startswith("train.metrics[1]:") and "'accuracy' is for classification" in message


def test_monitor_must_be_one_of_the_metrics():
    message = config_error("train.monitor=recall")
    assert message.startswith("train.monitor:") and "'recall'" in message


def test_unknown_model_name_lists_the_known_models():
    message = config_error("model.name=transformer")
    assert message.startswith("model.name: no model named 'transformer'")
    for name in ("bert", "cnn", "mlp"):
        assert name in message


def test_unknown_dataset_and_metric_names_list_the_known_ones():
    data = config_error("data.name=imagenet")
    assert data.startswith("data.name:") and "breast_cancer" in data and "digits" in data
    metric = config_error("train.metrics=[auc]")
    assert metric.startswith("train.metrics[0]:") and "accuracy" in metric


def test_config_validation_does_not_import_ray():
    code = (
        "import sys\n"
        "from trainyard.config import load_config, resolve\n"
        f"resolve(load_config({str(MLP)!r}))\n"
        "assert 'ray' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def trainyard(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [str(TRAINYARD), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_rejects_an_unknown_key_in_one_line_without_a_traceback():
    result = trainyard("train", "configs/mlp_breast_cancer.yaml", "train.epoch=3")
    assert result.returncode != 0
    assert "train.epoch" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_rejects_an_unresolvable_config_without_a_traceback():
    result = trainyard("train", "configs/cnn_digits.yaml", "data.name=breast_cancer")
    assert result.returncode != 0
    assert "model.name" in result.stderr and "Traceback" not in result.stderr


def test_cli_help_exits_zero():
    top = trainyard("--help")
    assert top.returncode == 0 and "train" in top.stdout and "plugins" in top.stdout
    train = trainyard("train", "--help")
    assert train.returncode == 0 and "--dry-run" in train.stdout and "OVERRIDES" in train.stdout


def test_cli_dry_run_prints_the_resolved_config():
    result = trainyard(
        "train", "configs/mlp_breast_cancer.yaml", "--dry-run", "train.epochs=3", "train.metrics=[]"
    )
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.name == "mlp_breast_cancer"
    assert printed.train.epochs == 3
    assert printed.train.optimizer == "adamw"  # schema defaults filled in
    assert list(printed.train.metrics) == ["loss", "accuracy", "f1"]  # resolved defaults
    assert load_config(base=printed) == printed  # what it prints is itself a valid config


def test_cli_dry_run_loads_in_memory_data_and_names_what_is_wrong(tmp_path):
    """Before, every data error came only after Ray and the workers had started."""
    from click.testing import CliRunner

    from trainyard.cli import main

    (tmp_path / "one.csv").write_text("a,b,species\n1,2,cat\n3,4,cat\n")
    (tmp_path / "ok.csv").write_text("a,b,species\n1,2,cat\n3,4,dog\n5,6,cat\n7,8,dog\n")
    runner = CliRunner()
    for name, expected in (("nope.csv", "nope.csv' does not exist"), ("one.csv", "holds fewer than two classes")):
        result = runner.invoke(main, ["train", str(MLP), "--dry-run", "data.name=table",
                                      f"data.params.path={tmp_path / name}", "data.params.label=species"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: data (table): ") and expected in result.output
    result = runner.invoke(main, ["train", str(MLP), "--dry-run", "data.name=table",
                                  f"data.params.path={tmp_path / 'ok.csv'}", "data.params.label=species"])
    assert result.exit_code == 0 and OmegaConf.create(result.output).data.params.label == "species"


def test_cli_plugins_lists_each_plugin_with_its_version_and_what_it_provides():
    result = trainyard("plugins")
    assert result.returncode == 0, result.stderr
    cells = [
        [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]] for line in result.stdout.splitlines()
    ]
    rows = {c[0]: c for c in cells if len(c) == 6 and c[0] and c[0] != "plugin"}
    assert {"mlp", "cnn", "bert", "tabular", "images", "text", "metrics"} <= set(rows)
    assert all(row[1] == "0.1.0" for row in rows.values())
    assert rows["mlp"][3] == "mlp" and rows["bert"][3] == "bert" and rows["cnn"][3] == "cnn"
    rows = {name: " ".join(row) for name, row in rows.items()}
    for dataset in ("digits", "mnist", "fashion_mnist", "cifar10"):
        assert dataset in rows["images"]
    for dataset in ("breast_cancer", "table"):
        assert dataset in rows["tabular"]
    for metric in ("loss", "accuracy", "precision", "recall", "f1", "mse", "mae"):
        assert metric in rows["metrics"]
    assert "failed" not in result.stdout
