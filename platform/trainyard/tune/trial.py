"""One Tune trial: the job with the trial's values, trained and reported per epoch.

A one-worker trial runs the training loop in the trial's own process (no nested trainer and
its start-up); a multi-worker trial runs a nested Ray Train ``TorchTrainer`` (DDP) whose
reports reach Tune through ``TuneReportCallback``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainyard.runtime.resources import worker_resources
from trainyard.train.loop import run_loop
from trainyard.tune.space import apply_values


class TuneTrialSession:
    """The loop's view of a one-worker Tune trial: it trains in the trial's own process,
    without the start-up of a nested trainer."""

    rank, world = 0, 1

    def device(self):
        import ray
        import torch

        return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")

    def prepare_model(self, model, device):
        return model.to(device)

    def get_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)


def trial_fn(values: dict, job: dict | None = None) -> None:
    """One Tune trial: the job with this trial's values, trained and reported per epoch."""
    cfg = apply_values(OmegaConf.create(job), values)
    loop_config = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if cfg.scaling.num_workers == 1:
        run_loop(loop_config, TuneTrialSession())
        return
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainyard.train.driver import make_trainer

    context = ray.tune.get_context()
    trainer = make_trainer(cfg, loop_config, context.get_trial_id(),
                           str(Path(context.get_trial_dir()).parent / "_train"),
                           callbacks=[TuneReportCallback()])
    trainer.fit()


def trial_resources(cfg: DictConfig) -> dict:
    """What one trial holds. A multi-worker trial's workers come from its nested trainer."""
    _, per_worker = worker_resources(cfg)
    if cfg.scaling.num_workers == 1:
        return {k.lower() if k in ("CPU", "GPU") else k: v for k, v in per_worker.items()}
    # The trial itself only waits on its nested trainer: a token of memory (Ray
    # refuses an empty request) keeps all CPUs and GPUs for the trainer's workers.
    return {"cpu": 0, "memory": 1}

