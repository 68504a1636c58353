"""The ``trainyard`` command line."""

from __future__ import annotations

import time

START = time.perf_counter()  # the start-up figure counts from here

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
