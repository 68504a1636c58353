"""Deploying serve configs on Ray Serve: one application per model, and the root."""

from __future__ import annotations

from typing import Any

from trainyard.errors import TrainyardError
from trainyard.runtime.cluster import check_capacity, init_ray
from trainyard.serve.config import ROOT_APP, ROOT_CPUS, application_specs

def check_serve_fits(cfg: Any) -> None:
    """Fail at once when the cluster can never hold the replicas (Serve would wait forever)."""
    need = {"CPU": ROOT_CPUS, "GPU": 0.0}
    for m in cfg.models:
        replicas = m.min_replicas if m.max_replicas else m.num_replicas
        need["CPU"] += replicas * m.num_cpus
        need["GPU"] += replicas * m.num_gpus
    check_capacity(need, "the replicas", "Lower num_replicas/min_replicas or num_cpus/num_gpus per "
                   "replica (fractions are allowed)", error=TrainyardError)


def deploy(cfg: Any, address: str | None = None) -> dict[str, str]:
    """Serve each model of a serve config as its own application; return name -> URL.

    Deploying a name that is already served replaces it with Serve's rolling update, so
    requests in flight are answered by the old replicas.
    """
    from ray import serve

    from trainyard.serve.app import model_app, root_app

    application_specs(cfg)  # errors in the winners surface before Ray starts
    init_ray(address, ingress=None if cfg.ingress == "auto" else cfg.ingress)
    check_serve_fits(cfg)
    serve.start(http_options={"host": cfg.host, "port": int(cfg.port)})
    existing = [a for a in serve.status().applications if a != ROOT_APP]
    specs = application_specs(cfg, existing)
    endpoints = {}
    for spec in specs:
        args = dict(spec["args"])
        if spec["name"] == ROOT_APP:
            app = root_app(args)
        else:
            args["options"] = {**args["options"], "api_key": cfg.api_key}  # in memory only
            app = model_app(args)
            endpoints[spec["name"]] = f"http://{cfg.host}:{cfg.port}{spec['route_prefix']}"
        serve.run(app, name=spec["name"], route_prefix=spec["route_prefix"], blocking=False)
    return endpoints

