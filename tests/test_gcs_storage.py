"""Google Cloud Storage (gs://): a training run that streams a table from a bucket and
checkpoints to one, and the one-line refusals of a gs:// URI that cannot work, against a
real GCS-protocol server on loopback (tests/gcsserver.py), through pyarrow's GCS client
as a user's run uses it."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import CONFIGS, ROW
from tests.ports import free_port
from trainyard.config import load_config
from trainyard.errors import ConfigError



def _write_table(gcs_server, bucket_uri: str) -> str:
    """breast_cancer as two Parquet files in the bucket; returns their glob."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.rename(columns={"target": "label"})
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    fs, bucket = gcs_server.filesystem(), bucket_uri.removeprefix("gs://")
    for i in range(2):
        part = frame.iloc[i * len(frame) // 2:(i + 1) * len(frame) // 2]
        with fs.open_output_stream(f"{bucket}/table/part-{i}.parquet") as f:
            pq.write_table(pa.Table.from_pandas(part, preserve_index=False), f)
    return f"{bucket_uri}/table/*.parquet"


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_streams_a_table_from_a_bucket_checkpoints_and_exports_winners_to_it(gcs_bucket, gcs_server):
    from trainyard.checkpoint import load_predictor
    from trainyard.train.driver import run_training
    from trainyard.winners import export_winners, resolve_checkpoint, versions

    table = _write_table(gcs_server, gcs_bucket)
    storage = f"{gcs_bucket}/runs"
    cfg = load_config(CONFIGS / "mlp_breast_cancer.yaml",
                      [f"storage_path={storage}", "name=gsrun", "scaling.num_workers=1", "train.epochs=2",
                       "train.metrics=[accuracy]"],
                      base={"data": {"name": "files", "params": {"uri": table, "format": "parquet"}}})
    result = run_training(cfg)
    assert result.best is not None and result.best["val_accuracy"] > 0.85, result.best
    assert str(result.checkpoint).startswith(f"{storage}/gsrun/checkpoint_")
    keys = gcs_server.keys(storage)
    assert {"gsrun/config.yaml", "gsrun/metrics.jsonl"} <= set(keys), keys
    assert any(k.endswith("/model.safetensors") for k in keys) and any(k.endswith("/manifest.json") for k in keys)

    # The run in the bucket resolves to its latest checkpoint (GCS lists no folder for it:
    # nothing wrote a marker object), which loads and predicts (the files dataset names the
    # classes by their label values).
    latest = resolve_checkpoint(f"{storage}/gsrun")
    assert latest == str(result.checkpoint)
    assert load_predictor(latest).predict([ROW])[0]["label"] in ("0", "1")

    # Exported twice to a winners registry in the bucket: two versions, the second current.
    registry = f"{gcs_bucket}/winners"
    search = load_config(CONFIGS / "tune_mlp.yaml", [f"storage_path={storage}", f"tune.registry={registry}",
                                                     "name=gssearch", "tune.top_k=1"])
    trial = {"state": "TERMINATED", "best": result.best["val_accuracy"], "checkpoint": latest,
             "trial_id": "t0", "params": {"train.lr": 0.01}}
    for _ in range(2):
        winners = export_winners([trial], search, "val_accuracy", "max")
    assert versions(f"{registry}/gssearch") == [1, 2]
    assert winners[0]["path"] == f"{registry}/gssearch/v2/rank_1"
    assert resolve_checkpoint(f"{registry}/gssearch") == winners[0]["path"]
    assert load_predictor(winners[0]["path"]).predict([ROW])[0]["label"] in ("0", "1")


def _within(seconds: float, fn):
    """``fn()``'s exception (or None), failing the test if it takes over ``seconds``: a
    GCS client without credentials, or with an endpoint that is down, otherwise waits for
    minutes."""
    outcome: list = []

    def call():
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    return outcome[0], time.monotonic() - started


def test_a_gs_uri_that_cannot_work_is_one_line_before_anything_starts(gcs_bucket, gcs_server, monkeypatch,
                                                                       tmp_path):
    """Run alone, this test never starts Ray: every refusal comes from the check."""
    import ray

    from trainyard.runtime.storage import GCS_CHECK_RETRY_S, check_uri, gcs_credentials_source
    from trainyard.train.stream import prepare_stream

    ray_before = ray.is_initialized()
    check_uri(f"{gcs_bucket}/ok", "storage_path", write=True)  # the server's own environment works

    missing = "gs://no-such-bucket-here/runs"
    error, _ = _within(60, lambda: check_uri(missing, "storage_path", write=True))
    assert isinstance(error, ConfigError)
    assert str(error) == (f"storage_path: '{missing}': the bucket 'no-such-bucket-here' does not exist at "
                          f"{gcs_server.endpoint} (CLOUD_STORAGE_EMULATOR_ENDPOINT); create it first")

    with monkeypatch.context() as env:  # a key file that is not there
        env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "gone.json"))
        error, _ = _within(30, lambda: check_uri(f"{gcs_bucket}/a", "storage_path"))
        assert str(error) == (f"storage_path: '{gcs_bucket}/a': GOOGLE_APPLICATION_CREDENTIALS names "
                              f"{tmp_path / 'gone.json'}, which is not a file")

    with monkeypatch.context() as env:  # an endpoint where nothing listens
        down = f"http://127.0.0.1:{free_port()}"
        env.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", down)
        error, took = _within(GCS_CHECK_RETRY_S + 50, lambda: check_uri(f"{gcs_bucket}/c", "tune.registry"))
        assert isinstance(error, ConfigError) and "\n" not in str(error)
        assert str(error).startswith(f"tune.registry: '{gcs_bucket}/c': cannot reach the storage endpoint "
                                     f"{down} (CLOUD_STORAGE_EMULATOR_ENDPOINT): UNAVAILABLE"), str(error)

    table = _write_table(gcs_server, gcs_bucket)
    with monkeypatch.context() as env:  # no credentials anywhere: the files dataset says so
        env.delenv("GOOGLE_APPLICATION_CREDENTIALS")
        env.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
        if gcs_credentials_source() is not None:
            pytest.skip(f"this machine has Google credentials of its own: {gcs_credentials_source()}")
        cfg = load_config(CONFIGS / "mlp_breast_cancer.yaml", [f"storage_path={tmp_path}"],
                          base={"data": {"name": "files", "params": {"uri": table, "format": "parquet"}}})
        from trainyard.config import resolve

        error, _ = _within(30, lambda: prepare_stream(resolve(cfg)))
        assert isinstance(error, ConfigError), repr(error)
        assert str(error).startswith(f"data (files): {table}: no Google Cloud credentials found "
                                     "(set GOOGLE_APPLICATION_CREDENTIALS"), str(error)
    assert ray.is_initialized() == ray_before
