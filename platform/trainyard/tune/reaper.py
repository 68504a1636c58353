"""Removing the placement groups that stopped multi-worker trials leave behind."""

from __future__ import annotations

import threading
import time

class PlacementGroupReaper:
    """Removes placement groups nobody uses, while a search of multi-worker trials runs.

    A trial that the scheduler stops early is ended by Tune together with its nested
    trainer; the trainer's worker placement group is scoped to the job, not to the trial,
    so it would keep its CPUs and GPUs and the next multi-worker trial would wait for
    them forever. A group with no actor in any of its bundles for ``idle_s`` is removed.
    """

    def __init__(self, idle_s: float = 10.0, every_s: float = 2.0):
        self.idle_s, self.every_s = idle_s, every_s
        self.stop_event = threading.Event()
        self.idle_since: dict[str, float] = {}
        self.removed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            try:
                self.sweep()
            except Exception:  # a sweep that fails is retried on the next tick
                continue

    def sweep(self) -> None:
        import ray
        from ray.util import placement_group_table
        from ray.util.placement_group import PlacementGroup

        available = ray.available_resources()
        total = ray.cluster_resources()
        now = time.monotonic()
        for pg_id, info in placement_group_table().items():
            key = f"bundle_group_{pg_id}"
            if info.get("state") != "CREATED" or key not in total:
                self.idle_since.pop(pg_id, None)
                continue
            if available.get(key, 0.0) < total[key]:  # some actor holds a bundle
                self.idle_since.pop(pg_id, None)
                continue
            first = self.idle_since.setdefault(pg_id, now)
            if now - first >= self.idle_s:
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                self.idle_since.pop(pg_id, None)
                self.removed += 1

