"""The ``trainyard`` command line."""

from __future__ import annotations

import time

START = time.perf_counter()  # the start-up figure counts from here

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from trainyard.errors import ConfigError, TrainyardError  # noqa: E402
from trainyard.runtime.ingress import INGRESS_MODES  # noqa: E402


def _console(stderr: bool = False):
    """Fitted to a terminal; where the stream is a pipe or a file, every id, name and
    value whole and no live redrawing (trainyard.ui.console)."""
    from trainyard.ui.console import make_console

    return make_console(stderr=stderr)


def _print_json(data) -> None:
    """One JSON document on stdout, for scripts (``--json``): strict JSON, a NaN metric
    as null (trainyard.jsontext)."""
    from trainyard import jsontext

    click.echo(jsontext.dumps(data, indent=2, default=str))


def _fail(message: str, code: int = 1) -> None:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
    sys.exit(code)


def _warn_plugin_problems(console) -> None:
    from trainyard.plugins import get_registry

    for problem in get_registry().problems:
        console.print(f"[yellow]warning:[/] {problem} (not loaded)")


def _warn_key_on_command_line(ctx, param: str = "api_key") -> None:
    """A key typed as an option shows in `ps` and in the shell's history."""
    from click.core import ParameterSource

    if ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE:
        click.echo(click.style("warning: ", fg="yellow", bold=True) + "--api-key shows the key to "
                   "other users (ps) and in your shell history; prefer TRAINYARD_API_KEY or "
                   "--api-key-file FILE", err=True)


def _serve_until_interrupted(console, embedded: bool = True) -> None:
    """Serve until Ctrl-C or SIGTERM (what systemd, Kubernetes or a CI runner sends), then
    drain, stop Serve and the embedded Ray, say so in one line, and exit 0."""
    from trainyard.serve.deploy import serve_until_stopped

    console.print("serving until Ctrl-C or SIGTERM")
    name = serve_until_stopped(embedded)
    what = "Serve and the embedded Ray stopped" if embedded else "the cluster's Serve keeps serving"
    console.print(f"{name}: requests in flight answered; {what}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """trainyard's own warnings as one line, like its errors (Python's default prints the
    warning's source file, line number and the line of code); others as Python shows them."""
    if category.__module__.startswith("trainyard."):
        click.echo(click.style("warning: ", fg="yellow", bold=True) + str(message), err=True)
    else:
        _PYTHON_SHOW_WARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOW_WARNING = warnings.showwarning


#: "SIGTERM" once one came (see _stop_on_sigterm_as_on_ctrl_c).
_TERMINATED: list[str] = []


class Interrupted(TrainyardError):
    """Ctrl-C (or SIGTERM) stopped a command that can be started again to go on."""

    exit_code = 130


def _stop_on_sigterm_as_on_ctrl_c():
    """SIGTERM (what systemd, Kubernetes, a CI runner or ``timeout`` sends) stops a command
    as Ctrl-C does: a search saves its state and says how to resume it, a training run
    keeps its checkpoints, and the last line says so; not a native stack dump and an abort
    (Ray's crash handler, see ``init_ray``). Appends "SIGTERM" to ``_TERMINATED`` when it
    comes. Returns the handler it replaced (False off the main thread: nothing installed)."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def handler(signum, frame):
        _TERMINATED.append("SIGTERM")
        on_ctrl_c = signal.getsignal(signal.SIGINT)
        if callable(on_ctrl_c):  # Tune's while it runs (which notes the signal), or Python's
            return on_ctrl_c(signum, frame)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


class TrainyardGroup(click.Group):
    """Turns trainyard's own errors into one readable line instead of a traceback."""

    def invoke(self, ctx):
        warnings.showwarning = _show_warning
        _TERMINATED.clear()
        previous = _stop_on_sigterm_as_on_ctrl_c()
        try:
            return super().invoke(ctx)
        except TrainyardError as exc:  # an interrupted search's 130 is 143 after SIGTERM
            _fail(str(exc), 143 if _TERMINATED and exc.exit_code == 130 else exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted (SIGTERM)" if _TERMINATED else "interrupted", 143 if _TERMINATED else 130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # `trainyard jobs list | head`: the reader had what it wanted
            # Python's own advice: point stdout at devnull so the exit flush does not fail too.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)  # 128 + SIGPIPE, what a shell tool ends with there
        except Exception as exc:
            if os.environ.get("TRAINYARD_DEBUG"):
                raise
            if type(exc).__module__.startswith("omegaconf."):  # a value read late: ${oc.env:UNSET}
                from trainyard.config import _describe

                _fail(str(_describe(exc)), ConfigError.exit_code)
            _fail(f"unexpected {type(exc).__name__}: {exc} (run again with TRAINYARD_DEBUG=1 "
                  "for the traceback, and please report it)")
        finally:
            if previous is not False:  # None: a handler not set from Python, i.e. the default
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@click.group(cls=TrainyardGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trainyard")
def main() -> None:
    """trainyard: train, tune and serve PyTorch models on Ray, extended through plugins.

    A job is a YAML file (see configs/); any key can be overridden as key=value.
    Models, datasets and metrics come from plugins: `trainyard plugins` lists them.
    """


def _check_data_loads(job) -> None:
    """``--dry-run``: load an in-memory dataset here, as each worker would, so that a missing
    file or a bad column is one line now, not after Ray and the workers start."""
    from trainyard.errors import reason_line
    from trainyard.train.data import load_dataset

    try:
        load_dataset(job)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"data ({job.dataset.name}): {reason_line(exc)}") from None


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to run on (e.g. ray://head:10001 or auto); "
                   "default: start an embedded local Ray.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="Log to MLflow at URI (e.g. http://127.0.0.1:5000); same as "
                   "tracking.backend=mlflow tracking.uri=URI.")
@click.option("--dry-run", is_flag=True, help="Validate the config (and load an in-memory dataset, to check "
              "it) and print the config resolved; run nothing.")
def train(config, overrides, address, dry_run, tracking_uri):
    """Train the job in CONFIG, with optional key=value OVERRIDES.

    \b
    Examples:
      trainyard train configs/mlp_breast_cancer.yaml
      trainyard train configs/cnn_digits.yaml train.epochs=3 scaling.num_workers=2

    The run folder (storage_path/name) gets the resolved config, metrics.jsonl and a
    checkpoint per epoch. Starting a run again with the same name resumes it.
    """
    from trainyard.config import load_config, resolve, to_yaml

    from trainyard import tracking

    console = _console()
    cfg = load_config(config, [*overrides, *tracking.cli_overrides(tracking_uri)], new_job=True)
    _warn_plugin_problems(console)
    job = resolve(cfg)
    if dry_run:
        if not job.dataset.streaming:  # in-memory data is loaded whole anyway: check it here
            _check_data_loads(job)
        console.print(to_yaml(cfg), end="")
        return
    from trainyard.runtime.storage import storage_root

    storage_root(cfg.storage_path)  # a bucket is checked before Ray starts
    import threading

    from trainyard.runtime.cluster import init_ray

    # Import torch and Ray Train while Ray starts: the two overlap on a small machine.
    importer = threading.Thread(target=__import__, args=("trainyard.train.driver",), daemon=True)
    importer.start()
    init_ray(address)
    importer.join()
    from trainyard.ui.training import TrainingView
    from trainyard.train.driver import run_training

    view = TrainingView(console, cfg, START)
    try:
        with view:
            result = run_training(cfg, address=address, on_event=view.handle)
    except KeyboardInterrupt:
        by = " (SIGTERM)" if _TERMINATED else ""
        raise Interrupted(f"interrupted{by}: run {cfg.name!r} keeps the checkpoints it wrote; the same command "
                          "resumes it from the latest") from None
    view.summary(result)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.argument("overrides", nargs=-1)
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to run on; default: start an embedded local Ray.")
@click.option("--resume", default=None, metavar="RUN",
              help="Continue an interrupted search (its folder, its name under storage_path, or "
                   "its URI in a bucket: s3://bucket/runs/NAME, from any machine); finished "
                   "trials are not run again.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the outcome as one JSON object on stdout (progress and the tables go "
                   "to stderr). Keys: run_dir, metric, mode, registry_dir; trials (every trial, "
                   "best first: rank (null without a value), trial_id, state, params, iterations, "
                   "best, final, error, checkpoint); winners (rank, run, trial_id, metric, mode, "
                   "value, params, path, version, replaced); stopped_by (time_budget or null), "
                   "stop_message; exploits (PBT); registered (MLflow versions). Printed before a "
                   "search with no winner exits 1.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="Log to MLflow at URI (e.g. http://127.0.0.1:5000); same as "
                   "tracking.backend=mlflow tracking.uri=URI.")
def tune(config, overrides, address, resume, as_json, tracking_uri):
    """Search hyperparameters for the job in CONFIG (its tune section).

    \b
    Examples:
      trainyard tune configs/tune_mlp.yaml
      trainyard tune configs/tune_cnn.yaml tune.num_samples=16 tune.scheduler=none
      trainyard tune --resume runs/tune_mlp
      trainyard tune --resume s3://bucket/runs/tune_mlp

    Shows a live table of trials (where stdout is not a terminal: one line per trial event)
    and, at the end, the top trials. The best trials' checkpoints, configs and metrics are
    exported to the winners registry (tune.registry/<name>/v<N>/rank_<k>/, made current
    last), which `trainyard deploy` reads.
    """
    from trainyard.config import load_config

    console = _console(stderr=as_json)
    if config is None and resume is None:
        raise click.UsageError("give a CONFIG, or --resume RUN")
    from trainyard import tracking

    if resume and config and "=" in config and not Path(config).exists():
        overrides, config = (config, *overrides), None  # `tune --resume RUN storage_path=...`
    if tracking_uri and config is None:
        raise click.UsageError("--tracking-uri: a resumed search keeps its own config's tracking")
    ignored = [o for o in overrides if o.partition("=")[0].strip() != "storage_path"] if resume else []
    if ignored:  # storage_path= may say where the run named RUN is
        raise click.UsageError(f"--resume: a resumed search runs with the config it was started with "
                               f"(RUN/trainyard_tune.yaml), so {' '.join(ignored)} would change nothing; "
                               "start a new search (another name=) to change it")
    cfg = load_config(config, [*overrides, *tracking.cli_overrides(tracking_uri)], new_job=True) if config else None
    storage = [o.partition("=")[2].strip() for o in overrides if resume and not config]
    if storage and "/" not in resume:  # RUN named under the storage path given
        from trainyard.runtime.storage import join

        resume = join(storage[-1], resume)  # a local one is expanded where RUN is looked up
    _warn_plugin_problems(console)
    from rich.markup import escape

    from trainyard.tune.driver import run_tuning
    from trainyard.ui.tune_table import summary_json, summary_table

    outcome = run_tuning(cfg, address=address, resume=resume, console=console)
    console.print()
    console.print(summary_table(outcome))
    if outcome.stop_message:
        console.print(escape(outcome.stop_message))
    failed = [t for t in outcome.trials if t["state"] == "ERROR"]
    for trial in failed:
        console.print(f"[red]trial {escape(trial['trial_id'])} failed:[/] {escape(str(trial['error']))}")
    if as_json:
        _print_json(summary_json(outcome))
    if not outcome.winners:
        raise TrainyardError(no_winner_reason(outcome))
    for w in outcome.winners:
        console.print(f"winner #{w['rank']}: {w['metric']} {w['value']:.4f} {w['params']} -> {w['path']}")
        replaced = w.get("replaced")
        if replaced:
            worse = ", which scored better" if replaced.get("better") else ""
            console.print(f"  replaces v{replaced['version']} trial {replaced['trial_id']} "
                          f"({replaced['metric']} {replaced['value']:.4f}{worse})")
    for r in outcome.registered:
        console.print(f"registered in MLflow: models:/{r['name']}/{r['version']} (winner #{r['rank']})")
    console.print(f"run folder: {outcome.run_dir}  (report: trainyard report {outcome.run_dir})")


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("-o", "--output", default=None,
              help="HTML file to write (default: RUN/report.html; for a run in a bucket, "
                   "NAME-report.html here).")
def report(run, output):
    """Write one self-contained HTML report of the tuning run RUN: its folder, or its URI in
    a bucket (s3://bucket/runs/NAME)."""
    from trainyard.runtime.storage import is_uri
    from trainyard.ui.report import write_report

    if not is_uri(run):
        click.echo(f"wrote {write_report(run, output)}")
        return
    import tempfile

    name = run.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, name)  # the report names the run by its folder
        folder.mkdir()
        _fetch_records(run, folder)
        click.echo(f"wrote {write_report(folder, output or f'{name}-report.html')}")


def _fetch_records(run: str, folder: Path) -> None:
    """A search's records (the files directly in its folder in a bucket) into ``folder``."""
    from trainyard.runtime.storage import check_uri, join, list_names, read_text
    from trainyard.tune.records import BUDGET_MARK, EXPLOITS, HISTORY

    check_uri(run, "RUN")
    names = [n for n in list_names(run) if n.startswith("trainyard_") or n in (BUDGET_MARK, EXPLOITS, HISTORY)]
    if "trainyard_trials.json" not in names:
        raise TrainyardError(f"{run} is not a finished trainyard tuning run (no trainyard_trials.json there)")
    for name in names:
        text = read_text(join(run, name))
        if text is not None:
            (folder / name).write_text(text)


_INGRESS_HELP = ("HTTP ingress of an embedded Ray: haproxy (Serve's HAProxy ingress, several times "
                 "the request rate), proxy (Serve's Python proxy), auto (haproxy where Serve finds "
                 "its binary). Default: TRAINYARD_SERVE_INGRESS, else auto. Ignored with --address.")
_JOBS_ADDRESS_HELP = ("Ray's Jobs API on the head node, e.g. http://HEAD:8265 (default: "
                      "TRAINYARD_JOBS_ADDRESS or RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265). "
                      "The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--address", default=None, metavar="URL", help=_JOBS_ADDRESS_HELP)
@click.option("--mode", type=click.Choice(["auto", "train", "tune"]), default="auto", show_default=True,
              help="auto: tune when the config has a tune section, else train.")
@click.option("--deploy", is_flag=True, help="After the search, deploy its winner with Ray Serve on the cluster.")
@click.option("--serve-port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="Serve's HTTP port on the cluster, with --deploy.")
@click.option("--pip", "pip", multiple=True, metavar="REQ",
              help="Extra pip requirement installed for the job (runtime_env pip); repeatable.")
@click.option("--job-id", default=None, help="Submission id (default: Ray chooses one).")
@click.option("--follow", is_flag=True, help="Print the job's log until it ends; exit 1 unless it succeeds.")
@click.option("--dry-run", is_flag=True, help="Validate and show what would be sent; send nothing.")
@click.option("--insecure", is_flag=True,
              help="With --deploy: serve the winner on the cluster without an API key (by default "
                   "the head's TRAINYARD_API_KEY is required, as cluster.yaml sets it).")
@click.option("--resume", is_flag=True,
              help="Resume the search of this config's name= on the cluster (one stopped, or whose "
                   "driver died), from its storage_path; finished trials are not run again.")
def submit(config, overrides, address, mode, deploy, serve_port, pip, job_id, follow, dry_run, insecure, resume):
    """Submit the train or tune job in CONFIG to a Ray cluster through the Jobs API.

    The config is loaded, overridden and validated here first. The job carries the resolved
    config, trainyard itself and the third-party plugin packages the config uses. Its
    storage_path (and tune.registry) must be a URI or a folder every node shares.

    \b
    Examples:
      trainyard submit configs/cnn_digits.yaml storage_path=s3://bucket/runs \\
          scaling.num_workers=4 --address http://HEAD:8265
      trainyard submit configs/tune_mlp.yaml storage_path=/mnt/shared/runs \\
          tune.registry=/mnt/shared/winners --deploy --follow
    """
    import shutil as _shutil

    from trainyard.config import load_config
    from trainyard.jobs import JobsClient, jobs_address, stage
    from trainyard.names import name_problem

    if job_id is not None and name_problem(job_id):
        raise click.BadParameter(name_problem(job_id), param_hint="--job-id")

    console = _console()
    cfg = load_config(config, list(overrides))
    _warn_plugin_problems(console)
    if insecure and not deploy:
        raise click.UsageError("--insecure only applies with --deploy")
    staged = stage(cfg, mode=mode, deploy=deploy, serve_port=serve_port, pip=pip, insecure=insecure, resume=resume)
    try:
        shipped = ", ".join(f"{s.distribution} {s.version}" for s in staged.shipped)
        if dry_run:
            console.print(f"would submit a {staged.mode} job to {jobs_address(address)}")
            console.print(f"entrypoint: {staged.entrypoint}")
            console.print(f"carries: job.yaml, {shipped}")
            return
        client = JobsClient(address)
        submission = client.submit(staged.entrypoint, staged.runtime_env, job_id, staged.metadata)
    finally:
        _shutil.rmtree(staged.folder, ignore_errors=True)
    console.print(f"[green]submitted[/] {staged.mode} job {submission} ({cfg.name}) to {client.address}")
    console.print(f"carries: {shipped}")
    flag = f" --address {client.address}"
    console.print(f"follow:  trainyard jobs logs {submission} --follow{flag}")
    console.print(f"status:  trainyard jobs status {submission}{flag}")
    if follow:
        _follow(client, submission)


#: How Ray's Jobs API ends a failed job's message: the tail of its log, already followed.
_LOGS_IN_MESSAGE = ", last available logs"


def _job_message(message: str) -> tuple[str, str]:
    """A job's message without the log tail Ray appends to a failure's, and the tail's last
    line (the job's own last word, its error); ("", "") for none."""
    head, _, tail = (message or "").partition(_LOGS_IN_MESSAGE)
    lines = [line.strip() for line in tail.splitlines()[1:] if line.strip()]
    return head.strip(), (lines[-1] if lines else "")


def no_winner_reason(outcome) -> str:
    """Why a search exported no winner: no trial finished, or those that did gave no finite
    value of the search's metric (a NaN from a metric plugin)."""
    import math

    ran = [t for t in outcome.trials if t["state"] == "TERMINATED"]
    if ran and not any(isinstance(t["best"], (int, float)) and math.isfinite(t["best"]) for t in ran):
        return (f"{len(ran)} trial(s) finished, but none gave a finite {outcome.metric} (every value was NaN "
                "or missing: see that metric's plugin, or the data), so there is no winner to export")
    return "no trial finished, so there is no winner to export"


def _follow(client, job_id: str) -> None:
    try:
        for chunk in client.follow_logs(job_id):
            click.echo(chunk, nl=False)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped following; job {job_id} keeps running on the cluster (`trainyard jobs "
                             f"stop {job_id} --address {client.address}` stops it)") from None
    info = client.info(job_id)
    message, _ = _job_message(info.message)  # the log, Ray's tail included, was just printed
    click.echo(f"job {job_id}: {info.status}" + (f" ({message})" if message else ""))
    if str(info.status) != "SUCCEEDED":
        sys.exit(1)


@main.group()
def jobs():
    """Follow jobs on a Ray cluster: list, status, logs, stop."""


def _when(ms) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _status(status) -> str:
    return str(getattr(status, "value", status))


def jobs_json(address: str, found: list) -> dict:
    """``trainyard jobs list --json``: {"address", "jobs": [...]}, newest first; each job has
    submission_id, status, trainyard_mode and trainyard_job (null for a job trainyard did not
    submit), entrypoint (whole), message, start_time and end_time (ms since the epoch, or
    null), metadata."""
    jobs = []
    for j in found:
        meta = dict(j.metadata or {})
        jobs.append({"submission_id": j.submission_id, "status": _status(j.status),
                     "trainyard_mode": meta.get("trainyard_mode"), "trainyard_job": meta.get("trainyard_job"),
                     "entrypoint": j.entrypoint, "message": j.message or "",
                     "start_time": j.start_time or None, "end_time": j.end_time or None,
                     "metadata": meta})
    return {"address": address, "jobs": jobs}


@jobs.command("list")
@click.option("--address", default=None, metavar="URL", help=_JOBS_ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout: address, and jobs (newest first), each with "
                   "submission_id, status, trainyard_mode, trainyard_job, entrypoint, message, "
                   "start_time, end_time (ms since the epoch, or null) and metadata.")
def jobs_list(address, as_json):
    """List the cluster's submitted jobs, newest first."""
    from rich.table import Table
    from rich.text import Text

    from trainyard.jobs import JobsClient

    client = JobsClient(address)
    found = [j for j in client.list() if j.submission_id]
    found.sort(key=lambda j: j.start_time or 0, reverse=True)
    if as_json:
        _print_json(jobs_json(client.address, found))
        return
    console = _console()
    table = Table(title=f"jobs at {client.address}")
    for column in ("job", "status", "trainyard", "started", "ended", "entrypoint"):
        table.add_column(column)
    for j in found:
        meta = j.metadata or {}
        what = f"{meta['trainyard_mode']} {meta.get('trainyard_job', '')}" if "trainyard_mode" in meta else "-"
        entrypoint = j.entrypoint
        if console.is_terminal and len(entrypoint) >= 60:  # a log gets it whole
            entrypoint = entrypoint[:57] + "..."
        table.add_row(Text(j.submission_id), _status(j.status), Text(what), _when(j.start_time),
                      _when(j.end_time), Text(entrypoint))
    console.print(table)
    if not found:
        click.echo("no submitted jobs")


@jobs.command("status")
@click.argument("job_id")
@click.option("--address", default=None, metavar="URL", help=_JOBS_ADDRESS_HELP)
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit 1 unless it succeeded.")
@click.option("--timeout", default=None, type=click.FloatRange(0), help="With --wait: give up after this many seconds.")
def jobs_status(job_id, address, wait, timeout):
    """Show the status of JOB_ID."""
    from trainyard.jobs import TERMINAL, JobsClient

    client = JobsClient(address)
    info = client.wait(job_id, timeout) if wait else client.info(job_id)
    click.echo(f"job {job_id}: {info.status}")
    message, last = _job_message(info.message)
    if message:
        click.echo(f"message: {message}")
    if last:
        click.echo(f"last log line: {last}  (`trainyard jobs logs {job_id}` prints the whole log)")
    click.echo(f"started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    click.echo(f"entrypoint: {info.entrypoint}")
    if wait and (str(info.status) not in TERMINAL or str(info.status) != "SUCCEEDED"):
        sys.exit(1)


@jobs.command("logs")
@click.argument("job_id")
@click.option("--address", default=None, metavar="URL", help=_JOBS_ADDRESS_HELP)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends; exit 1 unless it succeeds.")
def jobs_logs(job_id, address, follow):
    """Print the log of JOB_ID."""
    from trainyard.jobs import JobsClient

    client = JobsClient(address)
    if follow:
        _follow(client, job_id)
    else:
        click.echo(client.logs(job_id), nl=False)


@jobs.command("stop")
@click.argument("job_id")
@click.option("--address", default=None, metavar="URL", help=_JOBS_ADDRESS_HELP)
def jobs_stop(job_id, address):
    """Stop JOB_ID: its driver, workers and trials end; the checkpoints it wrote stay."""
    from trainyard.jobs import JobsClient

    client = JobsClient(address)
    info = client.info(job_id)
    if str(info.status) in ("SUCCEEDED", "FAILED", "STOPPED"):
        click.echo(f"job {job_id} already ended: {info.status}")
        return
    client.stop(job_id)
    click.echo(f"stopping job {job_id}")


#: deploy's options that a --config file's values give way to when typed: option -> key
#: (top level) or (key, ...) of every model.
_SERVE_OPTIONS = {"host": "host", "port": "port", "max_body_bytes": "max_body_bytes",
                  "version": ("version",), "replicas": ("num_replicas", "min_replicas"),
                  "max_replicas": ("max_replicas",), "num_cpus": ("num_cpus",), "num_gpus": ("num_gpus",),
                  "max_batch_size": ("max_batch_size",), "batch_wait_ms": ("batch_wait_ms",),
                  "max_ongoing": ("max_ongoing_requests",), "retry_after": ("retry_after_s",)}


def _serve_values(ctx, typed_only: bool) -> tuple[dict, dict]:
    """deploy's options as serve config values: (top-level keys, every model's keys); with
    ``typed_only``, only the options typed on the command line."""
    from click.core import ParameterSource

    top, model = {}, {}
    for option, keys in _SERVE_OPTIONS.items():
        if typed_only and ctx.get_parameter_source(option) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[option]
        if isinstance(keys, str):
            top[keys] = value
        else:
            model.update({key: value for key in keys})
    return top, model


def _serve_config_with_options(ctx, config_file: str):
    """The serve config in ``config_file``, with the options typed beside --config in place of
    its values (a model option: every model's), checked again."""
    from omegaconf import OmegaConf

    from trainyard.serve.config import load_serve_config

    cfg = load_serve_config(config_file)
    top, model = _serve_values(ctx, typed_only=True)
    if not top and not model:
        return cfg
    raw = {**OmegaConf.to_container(cfg), **top}
    raw["models"] = [{**m, **model} for m in raw["models"]]
    return load_serve_config(base=raw)


@main.command()
@click.argument("winners", nargs=-1)
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="Serve config YAML (server options and a models list; see configs/serve.yaml). "
                   "Options typed beside it replace its values (a model option: every model's).")
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
@click.option("--batch-wait-ms", default=0.0, show_default=True, type=click.FloatRange(0),
              help="How long a forward pass with room for more requests waits for them (0: none).")
@click.option("--max-body-bytes", default=1_000_000, show_default=True, type=click.IntRange(1))
@click.option("--max-ongoing", "max_ongoing", default=0, show_default=True, type=click.IntRange(0),
              help="Requests a replica works on at once (0: max(64, 2 x max batch size)).")
@click.option("--max-queued", "max_queued", default=None, type=click.IntRange(-1),
              help="Load shedding: requests that may wait beyond those; past it, 503 with "
              "Retry-After at once (-1: no limit). Default 64; with --config, overrides every model's.")
@click.option("--retry-after", "retry_after", default=1.0, show_default=True,
              type=click.FloatRange(0, 3600), help="Retry-After of a shed request, in seconds.")
@click.option("--api-key", default="", help="Require this key (Authorization: Bearer KEY). It shows "
              "in ps and shell history: prefer TRAINYARD_API_KEY (used when set) or --api-key-file.")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False),
              help="Require the key in this file (absolute path; with --address, a file on every "
                   "node). Replicas read it themselves.")
@click.option("--insecure", is_flag=True,
              help="Allow serving on a host other than 127.0.0.1/::1/localhost with no API key "
                   "(every route open).")
@click.option("--config-out", default=None, type=click.Path(dir_okay=False),
              help="Write a Ray Serve config file for `serve deploy` instead of deploying.")
@click.option("--detach", is_flag=True, help="Return once deployed instead of serving until Ctrl-C (with "
              "--address: the cluster keeps serving; an embedded Ray would stop with the command).")
@click.option("--ingress", type=click.Choice(INGRESS_MODES), default=None,
              help=_INGRESS_HELP)
@click.pass_context
def deploy(ctx, winners, config_file, names, version, address, host, port, replicas, max_replicas,
           num_cpus, num_gpus, max_batch_size, batch_wait_ms, max_body_bytes, max_ongoing, max_queued,
           retry_after, api_key, api_key_file, insecure, config_out, detach, ingress):
    """Serve WINNERS over HTTP with Ray Serve (Open Inference Protocol + plain JSON).

    A WINNER is a winners folder (winners/<run>), a tuning run (runs/<run>), a training run
    or one of its checkpoints. Several WINNERS are served side by side.

    Inference routes need an API key when TRAINYARD_API_KEY is set, or with --api-key-file
    or --api-key; a replica that cannot find its key refuses to start. Serving on a host
    other than loopback without a key is refused unless --insecure.

    \b
    Examples:
      trainyard deploy winners/tune_mlp
      trainyard deploy --config configs/serve.yaml
      TRAINYARD_API_KEY=... trainyard deploy winners/tune_mlp --host 0.0.0.0
      trainyard deploy winners/tune_mlp --config-out serve_config.yaml   # then: serve deploy
    """
    from trainyard.serve.deploy import deploy as deploy_models, url_host
    from trainyard.serve.config import load_serve_config, write_serve_config

    if config_file and winners:
        raise click.UsageError("give WINNERS or --config, not both")
    if not config_file and not winners:
        raise click.UsageError("give at least one WINNER, or --config FILE")
    if names and len(names) != len(winners):
        raise click.UsageError("give one --name per WINNER, or none")
    ray_module = sys.modules.get("ray")  # a Ray this process holds already outlives the command
    held = ray_module is not None and ray_module.is_initialized()
    if detach and not (address or os.environ.get("RAY_ADDRESS") or held) and not config_out:
        raise click.UsageError("--detach needs --address: a cluster keeps serving after this command "
                               "exits; the embedded Ray stops with it")
    if config_file:
        cfg = _serve_config_with_options(ctx, config_file)
    else:
        top, model = _serve_values(ctx, typed_only=False)
        models = [{"winner": w, "name": names[i] if names else "", **model} for i, w in enumerate(winners)]
        cfg = load_serve_config(base={**top, "models": models})
    if max_queued is not None:
        if max_queued == 0:
            raise click.BadParameter("must be at least 1, or -1 for no limit", param_hint="--max-queued")
        for m in cfg.models:
            m.max_queued_requests = max_queued
    from click.core import ParameterSource

    if ctx.get_parameter_source("api_key") == ParameterSource.COMMANDLINE:
        if not api_key.strip():  # an unset "$KEY": it would serve with no key
            raise click.BadParameter("empty; give the key, or leave the option out", param_hint="--api-key")
        if api_key_file:
            raise click.UsageError("give --api-key or --api-key-file, not both")
    _warn_key_on_command_line(ctx)
    if api_key:
        cfg.api_key = api_key
    if api_key_file:
        cfg.api_key_file = api_key_file
    if insecure:
        cfg.insecure = True
    if ingress:
        cfg.ingress = ingress
    console = _console()
    if config_out:
        existed = Path(config_out).exists()
        path = write_serve_config(cfg, config_out)
        console.print(f"{'replaced' if existed else 'wrote'} {path}; on a cluster: serve deploy {path}")
        if cfg.host != "0.0.0.0":
            console.print(f"the file serves on 0.0.0.0 (Serve's proxy on every node), not on {cfg.host}")
        if cfg.api_key and not cfg.api_key_file:
            console.print(f"its replicas read the key from {cfg.api_key_env} on their nodes (the key "
                          "is not in the file): set it there")
        return
    endpoints = deploy_models(cfg, address)
    for name, url in endpoints.items():
        console.print(f"[green]serving[/] {name} at {url}  (OIP: {url}/infer, JSON: {url}/predict)")
    first = next(iter(endpoints.values()))
    console.print(f"health: http://{url_host(cfg.host)}:{cfg.port}/v2/health/ready   docs: {first}/docs")
    if not detach:
        _serve_until_interrupted(console, embedded=not address)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--exit-after-first", is_flag=True, help="Stop once the first request is answered.")
@click.option("--ingress", type=click.Choice(INGRESS_MODES), default=None,
              help=_INGRESS_HELP)
@click.option("--tracking-uri", default=None, metavar="URI",
              help="Log to MLflow at URI (e.g. http://127.0.0.1:5000); same as "
                   "tracking.backend=mlflow tracking.uri=URI.")
def up(config, overrides, port, exit_after_first, ingress, tracking_uri):
    """The whole path on an embedded local Ray: tune CONFIG, deploy the winner, answer a
    sample request, and keep serving.

    \b
    Example:
      trainyard up configs/tune_mlp.yaml
    """
    import json as _json
    import shlex

    from trainyard.config import load_config
    from trainyard.pipeline import request_body, tune_and_serve
    from trainyard.ui.tune_table import summary_table

    from trainyard import tracking

    console = _console()
    cfg = load_config(config, [*overrides, *tracking.cli_overrides(tracking_uri)], new_job=True)
    _warn_plugin_problems(console)
    up = tune_and_serve(cfg, port=port, ingress=ingress, console=console,
                        on_tuned=lambda outcome: console.print(summary_table(outcome)))
    first = time.perf_counter() - START
    winner, endpoint, answer, sample = up.winner, up.endpoint, up.answer, up.sample
    console.print(f"[green]serving[/] {cfg.name} (winner {winner['trial_id']}, {winner['metric']} "
                  f"{winner['value']:.4f}) at {endpoint}")
    console.print(f"sample request answered: {answer.get('label', answer.get('value'))} "
                  f"{_json.dumps(answer.get('scores', {}))}")
    console.print(f"time to first answered request (command start): {first:.1f} s")
    body = shlex.quote(request_body(sample))
    key = " -H \"Authorization: Bearer $TRAINYARD_API_KEY\"" if os.environ.get("TRAINYARD_API_KEY") else ""
    console.print(f"try: curl -s {endpoint}/predict -H 'Content-Type: application/json'{key} -d {body}",
                  soft_wrap=True, markup=False)
    if not exit_after_first:
        _serve_until_interrupted(console)


@main.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Where trainyard serves.")
@click.option("--api-key", envvar="TRAINYARD_API_KEY", default=None,
              help="Default: TRAINYARD_API_KEY (prefer it: an option shows in ps and shell history).")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False),
              help="Read the API key from this file.")
@click.pass_context
def predict(ctx, model, inputs, url, api_key, api_key_file):
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
    from rich.text import Text

    from trainyard.client import Client

    _warn_key_on_command_line(ctx)
    if api_key_file:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                api_key = f.read().strip()
        except OSError as exc:
            raise click.BadParameter(f"{api_key_file}: {exc.strerror or exc}", param_hint="--api-key-file") from None
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
    console = _console()
    table = Table(title=f"{model} at {url}")
    for column in ("input", "answer", "scores"):
        table.add_column(column)
    for value, answer in zip(values, answers):
        shown = value if isinstance(value, str) else _json.dumps(value)
        if console.is_terminal and not isinstance(value, str) and len(shown) > 40:  # a log gets it whole
            shown = shown[:40]
        scores = ", ".join(f"{k} {v:.3f}" for k, v in answer.get("scores", {}).items())
        table.add_row(Text(str(shown)), Text(str(answer.get("label", answer.get("value")))), scores)
    console.print(table)


def plugins_json(registry) -> dict:
    """``trainyard plugins --json``: {"plugins": [...], "problems": [...]}."""
    return {
        "plugins": [{"name": info.name, "version": info.version, "builtin": info.builtin,
                     "distribution": info.distribution, "module": info.module, "location": info.location,
                     "models": list(info.provides["model"]), "datasets": list(info.provides["dataset"]),
                     "metrics": list(info.provides["metric"])} for info in registry.plugins],
        "problems": [{"plugin": getattr(p, "plugin", ""), "message": getattr(p, "message", str(p))}
                     for p in registry.problems],
    }


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout: plugins (each with name, version, builtin, "
                   "distribution, module, location, models, datasets, metrics) and problems "
                   "(plugins that failed to load: plugin, message).")
@click.pass_context
def plugins(ctx, as_json):
    """List installed plugins with their versions, origins and what they provide."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from trainyard.plugins import get_registry

    registry = get_registry()
    if as_json:
        _print_json(plugins_json(registry))
        return
    console = _console()
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


@plugins.command("check")
@click.argument("name")
@click.argument("params", nargs=-1)
def plugins_check(name, params):
    """Check that the plugin NAME keeps the plugin contract (for plugin authors).

    Each model is built on a tiny batch and run forward, backward and through a checkpoint
    round trip; each dataset is loaded; each metric is run on synthetic outputs. Exits 1
    if any check fails. PARAMS give entries their params, as model.NAME.KEY=VALUE or
    dataset.NAME.KEY=VALUE (a dataset that needs one, such as a path, is otherwise skipped).

    \b
    Examples:
      trainyard plugins check mlp
      trainyard plugins check tabular dataset.table.path=data.csv dataset.table.label=y
    """
    from trainyard.conformance import (
        check_plugin,
        parse_param_overrides,
        results_table,
        summary_line,
    )

    model_params, dataset_params = parse_param_overrides(params)
    results = check_plugin(name, model_params=model_params, dataset_params=dataset_params)
    console = _console()
    console.print(results_table(name, results))
    failures = [r for r in results if r.failed]
    from rich.markup import escape

    for failure in failures:
        console.print(f"[red]FAILED[/] {escape(str(failure))}", soft_wrap=True)
    console.print(("[bold red]" if failures else "[bold green]") + summary_line(name, results) + "[/]",
                  soft_wrap=True)
    if failures:
        sys.exit(1)


@main.command("export")
@click.argument("checkpoint")
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torchscript", "mlflow"]),
              help="onnx: model.onnx; torchscript: model.pt; each with preprocessing.json. "
                   "mlflow: an MLflow pyfunc model with the plugin's pre- and post-processing.")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Folder to write (must not exist, or be empty). Default: <run>-<format> "
                   "(<run>-rank_N-<format> for a winner past the first).")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(0),
              help="Largest absolute difference allowed between the exported model's outputs "
                   "and the checkpoint's.")
def export(checkpoint, fmt, output, tolerance):
    """Export CHECKPOINT as an ONNX, TorchScript or MLflow pyfunc model.

    CHECKPOINT is anything `trainyard deploy` takes: a winners folder, a tuning run, a
    training run or a checkpoint. The exported model is loaded back and run on examples
    of the checkpoint's kind of input; the largest absolute difference from the
    checkpoint's outputs is printed, and one above --tolerance fails the export.
    ONNX and TorchScript hold the network alone: preprocessing.json beside the file says
    how to make its inputs from raw data. Needs the export extra: pip install 'trainyard[export]'.

    \b
    Examples:
      trainyard export winners/tune_mlp --format onnx -o mlp_onnx
      trainyard export runs/bert_sentiment --format torchscript
      trainyard export runs/cnn_digits/checkpoint_000007 --format mlflow -o cnn_mlflow
    """
    from trainyard.export import export_checkpoint

    result = export_checkpoint(checkpoint, fmt, output, tolerance)
    click.echo(f"exported {result.checkpoint} to {fmt}: {result.artifact}")
    if result.description is not None:
        click.echo(f"inputs, outputs and preprocessing: {result.description}")
    click.echo(f"round-trip check on {result.examples} examples: max abs diff "
               f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:g})")


if __name__ == "__main__":  # pragma: no cover
    main()
