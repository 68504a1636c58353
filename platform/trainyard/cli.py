"""The ``trainyard`` command line."""

from __future__ import annotations

import time

START = time.perf_counter()  # the start-up figure counts from here

import os  # noqa: E402
import sys  # noqa: E402

import click  # noqa: E402

from trainyard.errors import TrainyardError  # noqa: E402


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _fail(message: str, code: int = 1) -> None:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
    sys.exit(code)


def _warn_plugin_problems(console) -> None:
    from trainyard.plugins import get_registry

    for problem in get_registry().problems:
        console.print(f"[yellow]warning:[/] {problem} (not loaded)")


def _serve_until_interrupted(console) -> None:
    """Keep the embedded Ray (and what it serves) alive until Ctrl-C."""
    console.print("serving until Ctrl-C")
    while True:
        time.sleep(3600)


class TrainyardGroup(click.Group):
    """Turns trainyard's own errors into one readable line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TrainyardError as exc:
            _fail(str(exc), 2 if type(exc).__name__ == "ConfigError" else 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:
            if os.environ.get("TRAINYARD_DEBUG"):
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (run again with TRAINYARD_DEBUG=1 "
                  "for the traceback, and please report it)")


@click.group(cls=TrainyardGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trainyard")
def main() -> None:
    """trainyard: train, tune and serve PyTorch models on Ray, extended through plugins.

    A job is a YAML file (see configs/); any key can be overridden as key=value.
    Models, datasets and metrics come from plugins: `trainyard plugins` lists them.
    """


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to run on (e.g. ray://head:10001 or auto); "
                   "default: start an embedded local Ray.")
@click.option("--dry-run", is_flag=True, help="Validate the config and print it resolved; run nothing.")
def train(config, overrides, address, dry_run):
    """Train the job in CONFIG, with optional key=value OVERRIDES.

    \b
    Examples:
      trainyard train configs/mlp_breast_cancer.yaml
      trainyard train configs/cnn_digits.yaml train.epochs=3 scaling.num_workers=2

    The run folder (storage_path/name) gets the resolved config, metrics.jsonl and a
    checkpoint per epoch. Starting a run again with the same name resumes it.
    """
    from trainyard.config import load_config, resolve, to_yaml

    console = _console()
    cfg = load_config(config, list(overrides))
    _warn_plugin_problems(console)
    resolve(cfg)
    if dry_run:
        console.print(to_yaml(cfg), end="")
        return
    import threading

    from trainyard.raycluster import init_ray

    # Import torch and Ray Train while Ray starts: the two overlap on a small machine.
    importer = threading.Thread(target=__import__, args=("trainyard.training",), daemon=True)
    importer.start()
    init_ray(address)
    importer.join()
    from trainyard.progress import TrainingView
    from trainyard.training import run_training

    view = TrainingView(console, cfg, START)
    with view:
        result = run_training(cfg, address=address, on_event=view.handle)
    view.summary(result)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.argument("overrides", nargs=-1)
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to run on; default: start an embedded local Ray.")
@click.option("--resume", default=None, metavar="RUN",
              help="Continue an interrupted search (its folder, or its name under storage_path); "
                   "finished trials are not run again.")
def tune(config, overrides, address, resume):
    """Search hyperparameters for the job in CONFIG (its tune section).

    \b
    Examples:
      trainyard tune configs/tune_mlp.yaml
      trainyard tune configs/tune_cnn.yaml tune.num_samples=16 tune.scheduler=none
      trainyard tune --resume runs/tune_mlp

    Shows a live table of trials and, at the end, the top trials. The best trials'
    checkpoints, configs and metrics are exported to the winners registry
    (tune.registry/<name>/rank_<k>/), which `trainyard deploy` reads.
    """
    from trainyard.config import load_config

    console = _console()
    if config is None and resume is None:
        raise click.UsageError("give a CONFIG, or --resume RUN")
    cfg = load_config(config, list(overrides)) if config else None
    _warn_plugin_problems(console)
    from trainyard.tuning import run_tuning, summary_table

    outcome = run_tuning(cfg, address=address, resume=resume, console=console)
    console.print()
    console.print(summary_table(outcome))
    failed = [t for t in outcome.trials if t["state"] == "ERROR"]
    for trial in failed:
        console.print(f"[red]trial {trial['trial_id']} failed:[/] {trial['error']}")
    if not outcome.winners:
        raise TrainyardError("no trial finished, so there is no winner to export")
    for w in outcome.winners:
        console.print(f"winner #{w['rank']}: {w['metric']} {w['value']:.4f} {w['params']} -> {w['path']}")
    console.print(f"run folder: {outcome.run_dir}  (report: trainyard report {outcome.run_dir})")


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("-o", "--output", default=None, help="HTML file to write (default: RUN/report.html).")
def report(run, output):
    """Write one self-contained HTML report of the tuning run RUN."""
    from trainyard.report import write_report

    path = write_report(run, output)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("winners", nargs=-1)
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="Serve config YAML (server options and a models list; see configs/serve.yaml).")
@click.option("--name", "names", multiple=True, help="Name to serve each WINNER under (default: its run name).")
@click.option("--version", default="1", show_default=True, help="Version to serve the models as.")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster; default: embedded local Ray.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1))
@click.option("--max-replicas", default=0, show_default=True, type=click.IntRange(0),
              help="Autoscale between --replicas and this many replicas (0: fixed).")
@click.option("--num-cpus", default=0.25, show_default=True, type=click.FloatRange(0), help="CPUs per replica.")
@click.option("--num-gpus", default=0.0, show_default=True, type=click.FloatRange(0), help="GPUs per replica.")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0))
@click.option("--max-body-bytes", default=1_000_000, show_default=True, type=click.IntRange(1))
@click.option("--api-key", default="", help="Require this key (Authorization: Bearer KEY); "
              "default: TRAINYARD_API_KEY if set.")
@click.option("--config-out", default=None, type=click.Path(dir_okay=False),
              help="Write a Ray Serve config file for `serve deploy` instead of deploying.")
@click.option("--detach", is_flag=True, help="Return once deployed instead of serving until Ctrl-C.")
def deploy(winners, config_file, names, version, address, host, port, replicas, max_replicas,
           num_cpus, num_gpus, max_batch_size, batch_wait_ms, max_body_bytes, api_key,
           config_out, detach):
    """Serve WINNERS over HTTP with Ray Serve (Open Inference Protocol + plain JSON).

    A WINNER is a winners folder (winners/<run>), a tuning run (runs/<run>), a training run
    or one of its checkpoints. Several WINNERS are served side by side.

    \b
    Examples:
      trainyard deploy winners/tune_mlp
      trainyard deploy --config configs/serve.yaml
      trainyard deploy winners/tune_mlp --config-out serve_config.yaml   # then: serve deploy
    """
    from trainyard.serving import deploy as deploy_models
    from trainyard.serving import load_serve_config, write_serve_config

    if config_file and winners:
        raise click.UsageError("give WINNERS or --config, not both")
    if not config_file and not winners:
        raise click.UsageError("give at least one WINNER, or --config FILE")
    if names and len(names) != len(winners):
        raise click.UsageError("give one --name per WINNER, or none")
    if config_file:
        cfg = load_serve_config(config_file)
    else:
        models = [{"winner": w, "name": names[i] if names else "", "version": version,
                   "num_replicas": replicas, "min_replicas": replicas, "max_replicas": max_replicas,
                   "num_cpus": num_cpus, "num_gpus": num_gpus, "max_batch_size": max_batch_size,
                   "batch_wait_ms": batch_wait_ms} for i, w in enumerate(winners)]
        cfg = load_serve_config(base={"host": host, "port": port, "api_key": api_key,
                                      "max_body_bytes": max_body_bytes, "models": models})
    console = _console()
    if config_out:
        path = write_serve_config(cfg, config_out)
        console.print(f"wrote {path}; on a cluster: serve deploy {path}")
        return
    endpoints = deploy_models(cfg, address)
    for name, url in endpoints.items():
        console.print(f"[green]serving[/] {name} at {url}  (OIP: {url}/infer, JSON: {url}/predict)")
    first = next(iter(endpoints.values()))
    console.print(f"health: http://{cfg.host}:{cfg.port}/v2/health/ready   docs: {first}/docs")
    if not detach:
        _serve_until_interrupted(console)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--exit-after-first", is_flag=True, help="Stop once the first request is answered.")
def up(config, overrides, port, exit_after_first):
    """The whole path on an embedded local Ray: tune CONFIG, deploy the winner, answer a
    sample request, and keep serving.

    \b
    Example:
      trainyard up configs/tune_mlp.yaml
    """
    import json as _json

    from trainyard.client import Client
    from trainyard.config import load_config
    from trainyard.serving import deploy as deploy_models
    from trainyard.serving import load_serve_config
    from trainyard.tuning import run_tuning, sample_input, summary_table

    console = _console()
    cfg = load_config(config, list(overrides))
    if cfg.tune is None:
        raise TrainyardError(f"{config}: has no tune section (try configs/tune_mlp.yaml)")
    _warn_plugin_problems(console)
    outcome = run_tuning(cfg, console=console)
    console.print(summary_table(outcome))
    if not outcome.winners:
        raise TrainyardError("no trial finished, so there is no winner to deploy")
    winner = outcome.winners[0]
    serve_cfg = load_serve_config(base={"port": port, "models": [{"winner": winner["path"], "name": cfg.name}]})
    endpoint = deploy_models(serve_cfg)[cfg.name]
    sample = sample_input(winner["path"])
    answer = Client(f"http://127.0.0.1:{port}").predict(cfg.name, [sample])[0]
    first = time.perf_counter() - START
    console.print(f"[green]serving[/] {cfg.name} (winner {winner['trial_id']}, {winner['metric']} "
                  f"{winner['value']:.4f}) at {endpoint}")
    console.print(f"sample request answered: {answer.get('label', answer.get('value'))} "
                  f"{_json.dumps(answer.get('scores', {}))}")
    console.print(f"time to first answered request (command start): {first:.1f} s")
    body = _json.dumps({"inputs": [sample]})
    console.print(f"try: curl -s {endpoint}/predict -H 'Content-Type: application/json' -d '{body}'",
                  soft_wrap=True)
    if not exit_after_first:
        _serve_until_interrupted(console)


@main.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Where trainyard serves.")
@click.option("--api-key", envvar="TRAINYARD_API_KEY", default=None, help="Default: TRAINYARD_API_KEY.")
def predict(model, inputs, url, api_key):
    """Ask the served MODEL about INPUTS and print labels and scores.

    Each INPUT is a JSON value (a feature row such as '[1.5, 2, ...]', an image array) or,
    if it is not JSON, a text string; '@FILE' reads a JSON list of inputs from FILE.

    \b
    Examples:
      trainyard predict bert_sentiment "The food was wonderful." "Awful service."
      trainyard predict mlp @rows.json
    """
    import json as _json

    from rich.table import Table

    from trainyard.client import Client

    values: list = []
    for item in inputs:
        if item.startswith("@"):
            try:
                loaded = _json.loads(open(item[1:]).read())
            except (OSError, ValueError) as exc:
                raise click.BadParameter(f"{item}: {exc}") from None
            if not isinstance(loaded, list):
                raise click.BadParameter(f"{item}: must hold a JSON list of inputs")
            values.extend(loaded)
            continue
        try:
            values.append(_json.loads(item))
        except ValueError:
            values.append(item)
    answers = Client(url, api_key).predict(model, values)
    table = Table(title=f"{model} at {url}")
    for column in ("input", "answer", "scores"):
        table.add_column(column)
    for value, answer in zip(values, answers):
        shown = value if isinstance(value, str) else _json.dumps(value)[:40]
        scores = ", ".join(f"{k} {v:.3f}" for k, v in answer.get("scores", {}).items())
        table.add_row(str(shown), str(answer.get("label", answer.get("value"))), scores)
    _console().print(table)


@main.group(invoke_without_command=True)
@click.pass_context
def plugins(ctx):
    """List installed plugins with their versions, origins and what they provide."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from trainyard.plugins import get_registry

    console = _console()
    registry = get_registry()
    table = Table(title="trainyard plugins", show_lines=False)
    for column in ("plugin", "version", "from", "models", "datasets", "metrics"):
        table.add_column(column)
    for info in registry.plugins:
        origin = "built-in" if info.builtin else info.distribution
        table.add_row(
            info.name,
            info.version,
            f"{origin}\n[dim]{info.module}[/]",
            ", ".join(info.provides["model"]),
            ", ".join(info.provides["dataset"]),
            ", ".join(info.provides["metric"]),
        )
    console.print(table)
    for problem in registry.problems:
        console.print(f"[red]failed:[/] {problem}")


if __name__ == "__main__":  # pragma: no cover
    main()
