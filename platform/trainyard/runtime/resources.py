"""The Ray resources a job's workers ask for, and whether the cluster can ever hold them."""

from __future__ import annotations

from typing import Any

from trainyard.runtime.cluster import check_capacity


def use_gpu(cfg: Any) -> bool:
    """``scaling.use_gpu``: auto means "if the cluster has any GPU"."""
    import ray

    setting = cfg.scaling.use_gpu
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return setting == "true"


def worker_resources(cfg: Any) -> tuple[bool, dict]:
    """Whether workers use GPUs, and the Ray resources each worker asks for."""
    gpu = use_gpu(cfg)
    resources = {"CPU": float(cfg.scaling.cpus_per_worker), **dict(cfg.scaling.resources_per_worker)}
    if gpu:
        resources["GPU"] = float(cfg.scaling.gpus_per_worker)
    return gpu, resources


def check_workers_fit(cfg: Any) -> None:
    """Fail at once, naming what is missing, when no placement can ever fit the workers."""
    _, resources = worker_resources(cfg)
    n = cfg.scaling.num_workers
    check_capacity({k: v * n for k, v in resources.items()}, f"{n} worker(s) with {resources} each",
                   "Lower scaling.num_workers or the per-worker resources (fractions such as "
                   "scaling.gpus_per_worker=0.25 are allowed)")
