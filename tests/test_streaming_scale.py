"""Data larger than a worker's memory (issue 10): about 1.3 GB of Parquet streamed through a
real two-node Ray cluster on this machine, each node's object store capped at 150 MB.

The job trains and finishes; each worker's peak RSS stays far below the data's size; the
two workers run on the two nodes (placement spread)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np

from tests.conftest import CONFIGS
from tests.helpers_cluster import local_cluster

FEATURES = 255
ROWS_PER_FILE = 100_000
FILES = 13  # 13 x 100,000 rows x 256 float32 columns: about 1.3 GB in memory

# Runs the CLI and writes its own peak RSS (the driver's) where the test reads it.
DRIVER = """
import resource, sys
from trainyard.cli import main
try:
    main(sys.argv[2:])
finally:
    open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))
"""


def _write_table(folder, rng) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "train").mkdir(parents=True)
    weights = rng.normal(size=FEATURES).astype(np.float32)
    total = 0
    for i in range(FILES + 1):
        x = rng.standard_normal((ROWS_PER_FILE if i < FILES else 5_000, FEATURES), dtype=np.float32)
        label = (x @ weights > 0).astype(np.int64)
        columns = np.ascontiguousarray(x.T)  # one contiguous row per column: no copy per column
        table = pa.table({**{f"f{j}": columns[j] for j in range(FEATURES)}, "label": label})
        if i < FILES:
            # Plain encoding: random floats gain nothing from a dictionary, which took 2.9 s a
            # file here to write (and 150 MB, not 100, to read back).
            pq.write_table(table, folder / "train" / f"part-{i:02d}.parquet", compression="none",
                           use_dictionary=False, write_statistics=False)
            total += x.nbytes + label.nbytes
        else:
            pq.write_table(table, folder / "val.parquet")
    return total


def test_a_table_larger_than_a_workers_memory_streams_through_two_nodes(tmp_path):
    data = tmp_path / "table"
    data_mb = _write_table(data, np.random.default_rng(0)) / 2**20
    with local_cluster(nodes=2, cpus=2, object_store_bytes=150 * 2**20, prefix="tymem") as cluster:
        rss_file = tmp_path / "driver_rss_mb"
        runs = tmp_path / "runs"
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, str(rss_file), "train", str(CONFIGS / "mlp_breast_cancer.yaml"),
             "name=big", f"storage_path={runs}", "data.name=files", f"data.params.uri={data / 'train'}",
             f"data.params.val_uri={data / 'val.parquet'}", "data.params.format=parquet",
             "model.params.hidden=[32]", "train.epochs=1", "train.batch_size=4096", "train.lr=0.01",
             "train.metrics=[accuracy]", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
             "scaling.placement=spread", "data.stream.fit_sample=5000", "--address", cluster.address],
            env=cluster.env, capture_output=True, text=True, timeout=1200, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        nodes = cluster.alive_nodes()
        # Where Ray Data's read tasks ran (the cluster's task records, by node).
        tasks = cluster.get("/api/v0/tasks?limit=10000&detail=true")["data"]["result"]["result"]
    reads = Counter(t["node_id"] for t in tasks if str(t.get("name", "")).startswith("ReadParquet")
                    and t.get("state") == "FINISHED")
    row = json.loads((runs / "big" / "metrics.jsonl").read_text().splitlines()[-1])
    workers = json.loads((runs / "big" / "workers.json").read_text())
    driver_mb = int(rss_file.read_text())
    print(f"data {data_mb:.0f} MB; worker peak RSS {row['rss_peak_mb']} MB; driver peak RSS {driver_mb} MB; "
          f"{row['train_samples_per_s']:.0f} samples/s; val_accuracy {row['val_accuracy']:.3f}; "
          f"read tasks by node {sorted(reads.values())}")
    assert data_mb > 1200
    # Each worker (rank 0 measured) holds a bounded window of the stream, not the table:
    # its peak (Python, torch and Ray included; a bare worker is about 400 MB here) stays
    # well below the data's size. The driver's peak is printed, not asserted: alone it was
    # 504 MB, but 1,362 MB once in a full CI run (not yet understood).
    assert row["rss_peak_mb"] < 0.7 * data_mb, row
    assert {w["node_id"] for w in workers} == nodes  # one worker on each node
    # Each node reads files: the reads are not funnelled through one node (or the driver's).
    assert set(reads) == nodes and min(reads.values()) >= 3, reads
    assert row["val_accuracy"] > 0.8  # it learnt: the label is a linear function of the features
