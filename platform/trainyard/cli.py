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
@click.argument("winners", nargs=-1, required=True)
@click.option("--name", "names", multiple=True, help="Name to serve each WINNER under (default: its run name).")
@click.option("--version", default="1", show_default=True, help="Version to serve the models as.")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster; default: embedded local Ray.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1))
@click.option("--num-cpus", default=0.25, show_default=True, type=click.FloatRange(0), help="CPUs per replica.")
@click.option("--num-gpus", default=0.0, show_default=True, type=click.FloatRange(0), help="GPUs per replica.")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0))
@click.option("--max-body-bytes", default=1_000_000, show_default=True, type=click.IntRange(1))
@click.option("--api-key", envvar="TRAINYARD_API_KEY", default="", help="Require this key "
              "(Authorization: Bearer KEY); also read from TRAINYARD_API_KEY.")
@click.option("--detach", is_flag=True, help="Return once deployed (on a cluster) instead of serving "
              "until Ctrl-C.")
def deploy(winners, names, version, address, host, port, replicas, num_cpus, num_gpus,
           max_batch_size, batch_wait_ms, max_body_bytes, api_key, detach):
    """Serve WINNERS over HTTP with Ray Serve (Open Inference Protocol + plain JSON).

    A WINNER is a winners folder (winners/<run>), a tuning run (runs/<run>), a training run
    or one of its checkpoints.

    \b
    Example:
      trainyard deploy winners/tune_mlp
      curl -s localhost:8000/v2/models/tune_mlp/predict -H 'Content-Type: application/json' \\
           -d '{"inputs": [[17.99, 10.38, ...]]}'
    """
    from trainyard.serving import ServeOptions
    from trainyard.serving import deploy as deploy_models

    options = ServeOptions(num_replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus,
                           max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000,
                           max_body_bytes=max_body_bytes, api_key=api_key)
    endpoints = deploy_models(list(winners), list(names), version, options, address, host, port)
    console = _console()
    for name, url in endpoints.items():
        console.print(f"[green]serving[/] {name} at {url}  (OIP: {url}/infer, JSON: {url}/predict)")
    console.print(f"health: http://{host}:{port}/v2/health/ready   docs: {next(iter(endpoints.values()))}/docs")
    if detach:
        return
    console.print("serving until Ctrl-C")
    while True:
        time.sleep(3600)


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
