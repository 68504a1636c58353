"""``trainyard up``: the whole path on an embedded local Ray. Tune a job, deploy its winner
with Ray Serve, and answer a sample request over HTTP."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig

from trainyard.errors import TrainyardError


@dataclass
class Up:
    """What ``up`` brought up: the search, the served winner, and its first answer."""

    outcome: Any  # trainyard.tune.driver.TuneOutcome
    winner: dict
    endpoint: str
    sample: Any
    answer: dict


def tune_and_serve(cfg: DictConfig, port: int = 8000, ingress: str | None = None,
                   console: Any = None, on_tuned: Callable[[Any], None] | None = None) -> Up:
    """Tune ``cfg``, serve its best trial on ``port``, and ask it about one validation input.
    ``on_tuned(outcome)`` is called once the search ends, before the winner is deployed."""
    from trainyard.client import Client
    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy
    from trainyard.train.data import sample_input
    from trainyard.tune.driver import run_tuning

    import ray

    from trainyard.serve.deploy import check_port_free

    if not ray.is_initialized():  # a port another server holds is said now, not after the search
        check_port_free("127.0.0.1", port)
    # The search starts the embedded Ray that Serve then shares: its ingress is fixed there.
    outcome = run_tuning(cfg, console=console, ingress=ingress)
    if on_tuned is not None:
        on_tuned(outcome)
    if not outcome.winners:
        raise TrainyardError("no trial finished, so there is no winner to deploy")
    winner = outcome.winners[0]
    serve_cfg = load_serve_config(base={"port": port, "models": [{"winner": winner["path"], "name": cfg.name}]})
    endpoint = deploy(serve_cfg)[cfg.name]
    sample = sample_input(winner["path"])
    answer = Client(f"http://127.0.0.1:{port}").predict(cfg.name, [sample])[0]
    return Up(outcome, winner, endpoint, sample, answer)


def shown_as_float32(value: Any) -> Any:
    """``value`` (a sample input: numbers, lists, dicts, strings) with each float that is
    exactly a float32, as dataset features are, replaced by the float with the fewest digits
    that reads back as the same float32: 17.99, not 17.989999771118164. Other values are
    kept as they are."""
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isfinite(value) and float(np.float32(value)) == value:
            return float(str(np.float32(value)))
        return value
    if isinstance(value, np.ndarray):
        return shown_as_float32(value.tolist())
    if isinstance(value, (list, tuple)):
        return [shown_as_float32(v) for v in value]
    if isinstance(value, dict):
        return {k: shown_as_float32(v) for k, v in value.items()}
    return value


def request_body(sample: Any) -> str:
    """The JSON body of a ``/predict`` request for one ``sample``, as ``trainyard up`` shows it."""
    return json.dumps({"inputs": [shown_as_float32(sample)]})
