"""What a person watching a training run sees: a bar per epoch on a terminal (elsewhere, one
line per epoch), metrics, a summary."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainyard.ui.console import is_live


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class TrainingView:
    """Renders the progress events rank 0 sends, as they arrive. The live bar is drawn only
    on a terminal; in a log, each epoch is the one line its end prints."""

    def __init__(self, console: Console, cfg: Any, started: float):
        self.console = console
        self.cfg = cfg
        self.started = started
        self.first_step_s: float | None = None
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            refresh_per_second=4,
        )
        self.task = None
        self.live = is_live(console)

    def __enter__(self):
        c = self.cfg
        self.console.print(
            f"[bold]{c.name}[/]: model [cyan]{c.model.name}[/] on [cyan]{c.data.name}[/], "
            f"{c.train.epochs} epochs, {c.scaling.num_workers} worker(s), "
            f"batch {c.train.batch_size}, lr {c.train.lr:g}"
        )
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.progress.stop()

    def handle(self, event: dict) -> None:
        kind = event["type"]
        epochs = self.cfg.train.epochs
        if kind == "epoch_start":
            if event.get("resumed"):
                self.console.print(f"resumed from checkpoint: continuing at epoch {event['epoch'] + 1}")
            if not self.live:
                return
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(
                "train", total=event["batches"], epoch=event["epoch"] + 1, epochs=epochs, loss="-"
            )
        elif kind == "step":
            if self.first_step_s is None:
                self.first_step_s = time.perf_counter() - self.started
            if self.task is not None:
                self.progress.update(self.task, completed=event["step"], loss=f"{event['loss']:.4f}")
        elif kind == "epoch_end":
            m = event["metrics"]
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k.startswith("val_"))
            self.console.print(f"epoch {event['epoch'] + 1}/{epochs}  train_loss {_fmt(m['train_loss'])}  {shown}")
        elif kind == "worker":
            self.console.print(f"rank {event['rank']} on {event['host']} (node {event['node_id'][:8]}, {event['device']})")
        elif kind == "early_stop":
            self.console.print(
                f"stopped early after epoch {event['epoch'] + 1}: {event['monitor']} did not improve "
                f"on {_fmt(event['best'])} for {event['patience']} epoch(s) (train.patience)"
            )
        elif kind == "done_before":
            self.console.print(
                f"run {self.cfg.name!r} already finished {event['epoch'] + 1} epochs; "
                "raise train.epochs to continue it, or pick a new name"
            )

    def summary(self, result: Any) -> None:
        if result.history:
            keys = [k for k in result.history[0] if k.startswith("val_")]
            table = Table(title=f"{self.cfg.name}: summary")
            for column in ["epoch", "train_loss", *keys]:
                table.add_column(column, justify="right")
            for row in result.history:
                style = "bold green" if row is result.best else None
                table.add_row(str(row["epoch"] + 1), _fmt(row["train_loss"]),
                              *[_fmt(row[k]) for k in keys], style=style)
            self.console.print(table)
        if result.best is not None:
            self.console.print(
                f"best {result.monitor} {_fmt(result.best[result.monitor])} at epoch {result.best['epoch'] + 1}"
            )
        if self.first_step_s is not None:
            self.console.print(f"start-up (command start to first training step): {self.first_step_s:.1f} s")
        self.console.print(f"run folder: {result.run_dir}")
        if result.checkpoint is not None:
            self.console.print(f"latest checkpoint: {result.checkpoint}")
        if getattr(result, "tracked", None):
            self.console.print(f"tracked: {result.tracked}", markup=False, highlight=False)
