"""Serving checkpoints with real Ray Serve over real HTTP on loopback."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import CONFIGS, remove_applications
from tests.ports import free_port
from trainyard.checkpoint import write_checkpoint
from trainyard.config import load_config, resolve
from trainyard.train.data import prepare_data, split_validation

pytestmark = pytest.mark.usefixtures("ray_cluster")

MODELS = {"mlp": "mlp_breast_cancer", "cnn": "cnn_digits", "bert": "bert_sentiment"}


def make_checkpoint(folder, config_name, name):
    """A small, really-built checkpoint of the built-in model (one step of training)."""
    import torch

    cfg = load_config(CONFIGS / f"{config_name}.yaml", [f"name={name}"])
    job = resolve(cfg)
    data = prepare_data(job)
    torch.manual_seed(0)
    model = job.model.build(job.model_params, data.info, data.processor)
    write_checkpoint(folder, job=job, model=model, processor=data.processor, info=data.info,
                     epoch=0, metrics={}, plugin=job.model.name)
    raw = job.dataset.load(job.data_params, 0)
    val = raw.val if raw.val is not None else split_validation(raw, 0.2, 0)[1]
    return folder, val.inputs[:4], data.info


def serve_config(port, models, version="1", **server):
    from trainyard.serve.config import load_serve_config

    return load_serve_config(base={"port": port, **server, "models": [
        {"winner": w, "name": n, "version": version, "num_cpus": 0.1} for w, n in models]})


def test_a_port_taken_once_ray_runs_is_named_and_serve_is_not_left_holding_it(ray_cluster, tmp_path):
    """With Ray already up, the port is found taken only when Serve's ingress fails to bind
    (seen in CI: another process took a port between a probe and HAProxy). The deploy says
    so in one line, and no Serve stays behind holding that port for every later deploy to
    be refused against (the next test's deploy, to another port, is the proof)."""
    import socket
    import time

    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from trainyard.errors import TrainyardError
    from trainyard.serve.deploy import deploy

    serve.shutdown()  # whatever an earlier module left
    folder, _, _ = make_checkpoint(tmp_path / "ckpt", "mlp_breast_cancer", "taken")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(TrainyardError) as caught:
            deploy(serve_config(port, [(str(folder), "taken")]))
    assert str(caught.value) == (f"port {port} on 127.0.0.1 is already in use (another server "
                                 "listens there); stop it, or serve on another --port")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray_cluster.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("Serve's controller outlived the failed start")


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_port):
    from trainyard.serve.deploy import deploy

    root = tmp_path_factory.mktemp("serve")
    port = serve_port
    samples = {}
    targets = []
    for name, config_name in MODELS.items():
        folder, inputs, info = make_checkpoint(root / name, config_name, name)
        targets.append(str(folder))
        samples[name] = (inputs, info)
    endpoints = deploy(serve_config(port, list(zip(targets, MODELS)), max_body_bytes=200_000))
    secured, _, _ = make_checkpoint(root / "secured", "mlp_breast_cancer", "secured")
    deploy(serve_config(port, [(str(secured), "secured")], api_key="s3cret"))
    yield {"base": f"http://127.0.0.1:{port}", "endpoints": endpoints, "samples": samples,
           "root": root, "port": port}
    remove_applications()


def call(url, body=None, ctype="application/json", headers=None, method=None):
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def oip_body(name, inputs):
    if name == "bert":
        return {"inputs": [{"name": "text", "shape": [len(inputs)], "datatype": "BYTES", "data": list(inputs)}]}
    array = np.asarray(inputs, dtype=np.float32)
    return {"id": "r1", "inputs": [{"name": "input-0", "shape": list(array.shape), "datatype": "FP32",
                                    "data": array.reshape(-1).tolist()}]}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_builtin_model_answers_the_open_inference_protocol(served, name):
    inputs, info = served["samples"][name]
    status, body = call(served["endpoints"][name] + "/infer", oip_body(name, inputs))
    assert status == 200, body
    assert body["model_name"] == name and body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["shape"] == [4] and set(outputs["label"]["data"]) <= set(info.classes)
    probs = np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert probs.shape == (4, len(info.classes)) and np.allclose(probs.sum(1), 1, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_builtin_model_answers_the_plain_json_route_with_labels_and_scores(served, name):
    inputs, info = served["samples"][name]
    raw = list(inputs) if name == "bert" else np.asarray(inputs).tolist()
    status, body = call(served["endpoints"][name] + "/predict", {"inputs": raw})
    assert status == 200, body
    assert len(body["predictions"]) == 4
    assert all(p["label"] in info.classes and set(p["scores"]) == set(info.classes)
               for p in body["predictions"])


def test_health_metadata_and_versions(served):
    base, url = served["base"], served["endpoints"]["mlp"]
    assert call(base + "/v2/health/live")[1] == {"live": True}
    assert call(base + "/v2/health/ready")[1] == {"ready": True}
    status, meta = call(url)
    assert status == 200 and meta["name"] == "mlp" and meta["inputs"][0]["shape"] == [-1, 30]
    assert call(url + "/versions/1")[0] == 200
    assert call(url + "/ready")[1]["ready"] is True
    status, body = call(url + "/versions/7/infer", oip_body("mlp", served["samples"]["mlp"][0]))
    assert status == 404 and "no version '7'" in body["error"]
    status, body = call(base + "/v2/models/resnet/infer", {"inputs": []})
    assert status == 404 and "no model named 'resnet'" in body["error"]
    # HEAD wherever GET answers (load balancers' health checks): its status, no body.
    for head in (base + "/v2/health/ready", url, url + "/ready"):
        with urllib.request.urlopen(urllib.request.Request(head, method="HEAD"), timeout=60) as response:
            assert response.status == 200 and response.read() == b"", head
    # A served model's route with its '/' sent encoded does not reach the model.
    status, body = call(base + "/v2/models/mlp%2Fready")
    assert status == 404 and body["error"] == ("no route '/v2/models/mlp/ready' for model 'mlp' (a '/' "
                                               "encoded as %2F does not separate the parts of a path)")
    # ... nor past the model's name, where HAProxy hands it to the model's replica.
    status, body = call(url + "/versions/1%2Finfer", oip_body("mlp", served["samples"]["mlp"][0]))
    assert status == 404 and body["error"] == ("no route '/v2/models/mlp/versions/1/infer' for model 'mlp' "
                                               "(a '/' encoded as %2F does not separate the parts of a path)")
    assert {m["name"] for m in call(base + "/v2/models")[1]["models"]} >= set(MODELS)


def test_a_later_deploy_starts_its_models_together_names_one_that_fails_and_leaves_the_root_running(
        served, tmp_path):
    """A deploy of two more models: their replicas start at once (Serve's run_many). One whose
    weights do not fit its model fails in its replica: deploy names it in one line once both
    have settled, and removes it; the other serves. The root application reads the served
    models from Serve: the deploy leaves its replica running (no restart per deploy), and a
    model deleted by hand leaves the list."""
    import shutil

    import ray
    from ray import serve

    from trainyard.errors import TrainyardError
    from trainyard.serve.deploy import deploy

    def root_replicas():  # Serve names each replica's actor after its app, deployment and id
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if "trainyard#Root#" in a["name"])

    def listed():
        status, body = call(served["base"] + "/v2/models")
        assert status == 200, body
        return [m["name"] for m in body["models"]]

    before = root_replicas()
    assert len(before) == 1 and "later" not in listed()
    broken = tmp_path / "broken"
    shutil.copytree(served["root"] / "mlp", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["model_params"]["hidden"] = [16]  # the weights are [64, 32]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainyardError) as failed:
        deploy(serve_config(served["port"], [(str(served["root"] / "mlp"), "later"), (str(broken), "broken")]))
    message = str(failed.value)
    assert message.startswith("model 'broken' did not start: ") and "do not fit the model" in message, message
    assert "\n" not in message
    assert "broken" not in serve.status().applications  # nothing half-deployed is left
    assert call(served["base"] + "/v2/models/later/ready")[1]["ready"] is True
    assert listed() == sorted([*MODELS, "later", "secured"])
    assert root_replicas() == before
    serve.delete("later")
    assert "later" not in listed()
    status, body = call(served["base"] + "/v2/models/later/ready")
    assert status == 404 and body["error"] == ("no model named 'later' is served (served: "
                                               f"{', '.join(sorted([*MODELS, 'secured']))})"), body
    assert root_replicas() == before


def _tensor(**overrides):
    tensor = {"name": "input-0", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}
    tensor.update(overrides)
    return {"inputs": [tensor]}


BAD_REQUESTS = {
    "malformed JSON": (b'{"inputs": [', "application/json", 400, "malformed JSON"),
    "wrong content type": (json.dumps(_tensor()).encode(), "text/plain", 415, "content type"),
    "another charset": (json.dumps(_tensor()).encode(), "application/json; charset=latin-1", 415,
                        "charset must be utf-8 (JSON is UTF-8 text), got latin-1"),
    "a byte order mark": (b"\xef\xbb\xbf" + json.dumps(_tensor()).encode(), None, 400, "byte order mark"),
    "unknown output": ({**_tensor(), "outputs": [{"name": "logits"}]}, None, 400, "no output named 'logits'"),
    "missing field": ({"inputs": [{"name": "x", "shape": [1, 30], "data": [0.5] * 30}]}, None, 400, "missing field(s): datatype"),
    "extra field": ({**_tensor(), "colour": "red"}, None, 400, "unknown field(s): colour"),
    "wrong shape": (_tensor(shape=[1, 29], data=[0.5] * 29), None, 400, "expected [N, 30]"),
    "wrong datatype": (_tensor(datatype="BYTES"), None, 400, "not a numeric OIP datatype"),
    "wrong length": (_tensor(data=[0.5] * 10), None, 400, "do not fill shape"),
    "NaN": (json.dumps(_tensor()).replace("0.5", "NaN", 1).encode(), None, 400, "NaN"),
    "Infinity": (json.dumps(_tensor()).replace("0.5", "Infinity", 1).encode(), None, 400, "Infinity"),
    "empty batch": (_tensor(shape=[0, 30], data=[]), None, 400, "empty"),
    "not an object": ([1, 2, 3], None, 400, "JSON object"),
    "oversized body": (json.dumps(_tensor(data=[0.5] * 30 + [0.0] * 40000)).encode(), None, 413, "over the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_model_keeps_serving(served, case):
    body, ctype, status, text = BAD_REQUESTS[case]
    got, answer = call(served["endpoints"]["mlp"] + "/infer", body, ctype=ctype or "application/json")
    assert got == status, answer
    assert text in answer["error"]
    ok, _ = call(served["endpoints"]["mlp"] + "/infer", _tensor())
    assert ok == 200


def test_a_compressed_body_is_refused_naming_its_encoding(served):
    import gzip

    body = gzip.compress(json.dumps(_tensor()).encode())
    got, answer = call(served["endpoints"]["mlp"] + "/infer", body, headers={"Content-Encoding": "gzip"})
    assert got == 415 and answer["error"] == "Content-Encoding 'gzip' is not accepted; send the body as it is"


def test_bad_plain_json_requests_get_a_4xx(served):
    url = served["endpoints"]["bert"] + "/predict"
    assert call(url, {"inputs": [1, 2]})[0] == 400
    assert call(url, {"inputs": []})[0] == 400
    assert call(url, {"inputs": ["ok"], "extra": 1})[0] == 400


def test_api_key_is_required_where_configured_and_health_stays_open(served):
    url = served["endpoints"]["mlp"].replace("/mlp", "/secured") + "/infer"
    status, body = call(url, _tensor())
    assert status == 401 and "missing API key" in body["error"]
    status, body = call(url, _tensor(), headers={"Authorization": "Bearer nope"})
    assert status == 403 and "s3cret" not in json.dumps(body)
    assert call(url, _tensor(), headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert call(url, _tensor(), headers={"X-API-Key": "s3cret"})[0] == 200
    assert call(served["base"] + "/v2/health/ready")[0] == 200


def test_redeploying_a_served_model_drops_no_request(served):
    from trainyard.serve.deploy import deploy

    url = served["endpoints"]["mlp"] + "/infer"
    failures, answered, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                status, body = call(url, _tensor())
            except Exception as exc:  # a non-JSON error body or a dropped connection fails too
                failures.append(("no JSON answer", repr(exc)[:300]))
                continue
            (answered if status == 200 else failures).append((status, body))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deploy(serve_config(served["port"], [(str(served["root"] / "mlp"), "mlp")], version="2",
                            max_body_bytes=200_000))
        for _ in range(50):
            if call(served["endpoints"]["mlp"])[1]["versions"] == ["2"]:
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert len(answered) > 5
    assert call(served["endpoints"]["mlp"])[1]["versions"] == ["2"]


def test_config_out_writes_a_serve_config_that_serve_accepts(served, tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from trainyard.serve.config import write_serve_config

    cfg = serve_config(8000, [(str(served["root"] / "cnn"), "digits"), (str(served["root"] / "bert"), "")],
                       api_key="s3cret")  # the file serves on 0.0.0.0: without a key it is refused
    cfg.models[0].max_replicas = 4
    path = write_serve_config(cfg, tmp_path / "serve.yaml")
    document = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(document) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(document)
    names = [app.name for app in schema.applications]
    assert names == ["digits", "bert", "trainyard"]
    digits = document["applications"][0]
    assert digits["route_prefix"] == "/v2/models/digits"
    assert digits["args"]["deployment"]["autoscaling_config"]["max_replicas"] == 4
    assert "s3cret" not in path.read_text()
    # Each model's deployment options (in its args, where ServeDeploySchema does not look)
    # fit Serve's own deployment schema too.
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema

    for app in document["applications"][:2]:
        deployment = app["args"]["deployment"]
        DeploymentSchema.model_validate({"name": "model", **deployment})
        if "autoscaling_config" in deployment:
            AutoscalingConfig.model_validate(deployment["autoscaling_config"])


def test_options_typed_beside_config_replace_its_values(served, tmp_path):
    """--port, --replicas, ... beside --config were dropped without a word."""
    import yaml
    from click.testing import CliRunner

    from trainyard.cli import main

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"port": 8000, "api_key": "k" * 16, "models": [
        {"winner": str(served["root"] / "mlp"), "name": "a", "num_replicas": 1},
        {"winner": str(served["root"] / "mlp"), "name": "b", "num_replicas": 1, "max_batch_size": 8}]}))
    out = tmp_path / "out.yaml"
    result = CliRunner().invoke(main, ["deploy", "--config", str(config), "--port", "18777", "--replicas", "2",
                                       "--config-out", str(out)])
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(out.read_text())
    assert document["http_options"]["port"] == 18777
    deployments = [app["args"]["deployment"] for app in document["applications"][:2]]
    assert [d["num_replicas"] for d in deployments] == [2, 2]
    batches = [app["args"]["options"]["max_batch_size"] for app in document["applications"][:2]]
    assert batches == [32, 8]  # options not typed keep the file's values
    bad = CliRunner().invoke(main, ["deploy", "--config", str(config), "--version", "a/b", "--config-out",
                                    str(tmp_path / "bad.yaml")])
    assert bad.exit_code != 0 and "models[0].version" in bad.output
    nowhere = CliRunner().invoke(main, ["deploy", "--config", str(config), "--config-out",
                                        str(tmp_path / "missing" / "out.yaml")])
    assert nowhere.exit_code == 1 and "the folder" in nowhere.output and "does not exist" in nowhere.output
    assert "unexpected" not in nowhere.output


def test_detach_without_a_cluster_and_haproxy_off_loopback_are_refused(served):
    from trainyard.errors import TrainyardError
    from trainyard.serve.deploy import ingress_for_host, url_host

    import subprocess
    import sys

    # A process of its own: this one holds the session's Ray, which would outlive the command.
    result = subprocess.run([sys.executable, "-m", "trainyard.cli", "deploy", str(served["root"] / "mlp"),
                             "--detach"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--detach needs --address" in result.stderr, result.stderr
    # HAProxy reaches the replicas at 127.0.0.1: another host gets Serve's own proxy.
    assert ingress_for_host("127.0.0.1", "auto") is None and ingress_for_host("0.0.0.0", "haproxy") == "haproxy"
    assert ingress_for_host("::1", "auto") == "proxy" and ingress_for_host("127.0.0.2", "proxy") == "proxy"
    with pytest.raises(TrainyardError, match=r"host 10.0.0.5: the haproxy ingress serves on 127.0.0.1 or "
                                             r"0.0.0.0 only"):
        ingress_for_host("10.0.0.5", "haproxy")
    assert url_host("::1") == "[::1]" and url_host("10.0.0.5") == "10.0.0.5"


def test_config_out_refuses_what_serve_would_refuse_naming_the_field(served, tmp_path, monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from trainyard.errors import TrainyardError
    from trainyard.serve.config import write_serve_config

    monkeypatch.delenv("TRAINYARD_API_KEY", raising=False)
    models = [(str(served["root"] / "mlp"), "mlp")]
    with pytest.raises(TrainyardError, match="refusing to serve on 0.0.0.0 without an API key"):
        write_serve_config(serve_config(8000, models), tmp_path / "open.yaml")
    open_file = write_serve_config(serve_config(8000, models, insecure=True), tmp_path / "open.yaml")
    ServeDeploySchema.model_validate(yaml.safe_load(open_file.read_text()))
    assert "No API key" in open_file.read_text()

    bad = serve_config(8000, models, api_key_env="MY_KEY")
    monkeypatch.setenv("MY_KEY", "k")
    bad.models[0].max_replicas = 3
    bad.models[0].target_ongoing_requests = 0.0  # Serve's autoscaler needs a positive target
    bad.models[0].num_cpus = -1.0  # past load_serve_config's own check
    with pytest.raises(TrainyardError, match="Ray Serve's schema") as caught:
        write_serve_config(bad, tmp_path / "bad.yaml")
    message = str(caught.value)
    assert "applications[0].args.deployment.autoscaling_config.target_ongoing_requests: " \
           "Input should be greater than 0 (application 'mlp'; serve config key " \
           "models[0].target_ongoing_requests)" in message
    assert "ray_actor_options.num_cpus" in message and "models[0].num_cpus" in message
    assert not (tmp_path / "bad.yaml").exists()  # nothing serve deploy would refuse is written


def test_serve_config_errors_name_the_key(tmp_path):
    from trainyard.errors import ConfigError
    from trainyard.serve.config import load_serve_config

    with pytest.raises(ConfigError, match=r"models\[0\]\.max_batch_size"):
        load_serve_config(base={"models": [{"winner": "x", "max_batch_size": 0}]})
    with pytest.raises(ConfigError, match="models.0.replicas|replicas"):
        load_serve_config(base={"models": [{"winner": "x", "replicas": 2}]})
    with pytest.raises(ConfigError, match="models: give at least one"):
        load_serve_config(base={"port": 8000})
    # A key inside a model is named with its model (OmegaConf names it alone).
    with pytest.raises(ConfigError, match=r"^models\[1\]\.num_replicas: wrong type"):
        load_serve_config(base={"models": [{"winner": "x"}, {"winner": "y", "num_replicas": "lots"}]})
    with pytest.raises(ConfigError, match=r"^models\[0\]\.max_body_bytes: unknown key .*\(a server option: it "
                                          r"goes at the top level"):
        load_serve_config(base={"models": [{"winner": "x", "max_body_bytes": 5}]})
    with pytest.raises(ConfigError, match=r"^models\[0\]: must be a mapping with a winner .*got 'winners/x'"):
        load_serve_config(base={"models": ["winners/x"]})
    # A file that is not YAML, or not a mapping, says so (finding the model must not hide it).
    (tmp_path / "broken.yaml").write_text("models: [\n - winner: x\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML: [^\n]*line 2"):
        load_serve_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match=r"list.yaml: the top level must be a mapping of keys"):
        load_serve_config(tmp_path / "list.yaml")
    for key in ("max_body_bytes", "max_items"):  # 0 answered every request 413
        with pytest.raises(ConfigError, match=f"^{key}: must be at least 1"):
            load_serve_config(base={key: 0, "models": [{"winner": "x"}]})


def test_main_job_command_tunes_deploys_and_answers_its_first_request(tmp_path):
    import subprocess
    import sys

    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "up", str(CONFIGS / "tune_mlp.yaml"),
         "tune.num_samples=2", "train.epochs=2", f"storage_path={tmp_path / 'runs'}",
         f"tune.registry={tmp_path / 'winners'}", "--port", str(port), "--exit-after-first"],
        capture_output=True, text=True, timeout=400,
        env={**__import__("os").environ, "COLUMNS": "200", "TRAINYARD_API_KEY": "up-key-" + "7" * 16},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "sample request answered: " in out.stdout  # with the key, as any client
    assert f"curl -s http://127.0.0.1:{port}/v2/models/tune_mlp/predict" in out.stdout
    # The curl line works as printed (a key is in force) and does not show the key.
    assert '-H "Authorization: Bearer $TRAINYARD_API_KEY"' in out.stdout and "7" * 16 not in out.stdout
    assert "time to first answered request" in out.stdout
    assert (tmp_path / "winners" / "tune_mlp" / "rank_1" / "manifest.json").exists()


def test_python_client_and_predict_command_answer_from_a_served_model(served):
    import subprocess
    import sys

    from trainyard.client import Client

    client = Client(served["base"])
    assert client.ready() and "bert" in client.models()
    answers = client.predict("bert", ["The food was wonderful.", "Awful service."])
    assert len(answers) == 2 and all(a["label"] in ("negative", "positive") for a in answers)
    out = subprocess.run([sys.executable, "-m", "trainyard.cli", "predict", "bert", "Lovely film.",
                          "--url", served["base"]], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "Lovely film." in out.stdout and ("positive" in out.stdout or "negative" in out.stdout)
    bad = subprocess.run([sys.executable, "-m", "trainyard.cli", "predict", "nope", "x",
                          "--url", served["base"]], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no model named 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_tritons_own_http_client_works_unchanged_against_the_v2_routes(served):
    """tritonclient (NVIDIA's Open Inference Protocol client, written by nobody here), used
    as its documentation shows: no Content-Type, no redirects followed, binary tensor data
    by default."""
    import tritonclient.http as triton

    inputs, info = served["samples"]["mlp"]
    x = np.asarray(inputs, dtype=np.float32)
    client = triton.InferenceServerClient(served["base"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata("mlp")
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", meta["versions"][0])
    assert not client.is_model_ready("mlp", "99")
    assert meta["inputs"][0] == {"name": "input-0", "datatype": "FP32", "shape": [-1, 30]}
    for binary in (True, False):
        tensor = triton.InferInput("input-0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("mlp", [tensor], request_id="r7")
        probs = result.as_numpy("probabilities")
        assert probs.shape == (4, len(info.classes)) and np.allclose(probs.sum(1), 1, atol=1e-4)
        assert {label.decode() if isinstance(label, bytes) else label
                for label in result.as_numpy("label")} <= set(info.classes)
        assert result.get_response()["id"] == "r7"
    only = client.infer("mlp", [tensor], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["probabilities"]
    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.asarray(["Lovely film.", "Awful service."], dtype=object))
    labels = client.infer("bert", [text]).as_numpy("label")
    assert len(labels) == 2
    with pytest.raises(Exception, match="no model named 'resnet'"):
        client.get_model_metadata("resnet")


@pytest.mark.parametrize("name", ["mlp", "bert"])
def test_tritons_client_gets_binary_outputs_equal_to_the_json_routes(served, name):
    """Binary outputs (the binary tensor data extension), as tritonclient asks for them by
    default and per output, read back by its own ``as_numpy``: the same labels (BYTES) and
    probabilities (FP32) as the JSON route gives."""
    import tritonclient.http as triton

    inputs, info = served["samples"][name]
    status, reference = call(served["endpoints"][name] + "/infer", oip_body(name, inputs))
    assert status == 200, reference
    expected = {o["name"]: o for o in reference["outputs"]}
    expected_probs = np.asarray(expected["probabilities"]["data"], dtype=np.float32).reshape(4, len(info.classes))

    if name == "bert":
        tensor = triton.InferInput("text", [len(inputs)], "BYTES")
        tensor.set_data_from_numpy(np.asarray(list(inputs), dtype=object))
    else:
        x = np.asarray(inputs, dtype=np.float32)
        tensor = triton.InferInput("input-0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
    client = triton.InferenceServerClient(served["base"].removeprefix("http://"))
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    asks = {
        "default (every output binary)": None,
        "both binary": [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("probabilities")],
        "both JSON": [triton.InferRequestedOutput("label", binary_data=False),
                      triton.InferRequestedOutput("probabilities", binary_data=False)],
        "mixed": [triton.InferRequestedOutput("probabilities", binary_data=True),
                  triton.InferRequestedOutput("label", binary_data=False)],
    }
    for ask, outputs in asks.items():
        result = client.infer(name, [tensor], outputs=outputs, request_id="b1")
        response = result.get_response()
        binary = {o["name"] for o in response["outputs"] if "binary_data_size" in (o.get("parameters") or {})}
        assert binary == ({"label", "probabilities"} if outputs is None or ask == "both binary"
                          else {"probabilities"} if ask == "mixed" else set()), ask
        assert all(("data" in o) == (o["name"] not in binary) for o in response["outputs"]), ask
        assert response["id"] == "b1"
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        assert labels == expected["label"]["data"], ask
        probs = result.as_numpy("probabilities")
        assert probs.dtype == np.float32 and probs.shape == (4, len(info.classes)), ask
        assert np.allclose(probs, expected_probs, atol=1e-6), ask

    # On the wire: the JSON header's length in its header, then the raw data.
    body = {**oip_body(name, inputs), "parameters": {"binary_data_output": True}}
    request = urllib.request.Request(served["endpoints"][name] + "/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        raw, length = response.read(), int(response.headers["Inference-Header-Content-Length"])
        assert response.headers["Content-Type"] == "application/octet-stream"
    header = json.loads(raw[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert len(raw) == length + sum(sizes) and sizes[1] == 4 * 4 * len(info.classes)
    assert np.allclose(np.frombuffer(raw[length + sizes[0]:], dtype="<f4").reshape(4, -1), expected_probs, atol=1e-6)
    first = int.from_bytes(raw[length:length + 4], "little")
    assert raw[length + 4:length + 4 + first].decode() == expected["label"]["data"][0]
    status, answer = call(served["endpoints"][name] + "/infer",
                          {**oip_body(name, inputs), "outputs": [{"name": "label", "parameters": {"classification": 2}}]})
    assert status == 400 and "classification is not supported" in answer["error"]


def test_binary_tensor_data_requests_are_parsed_and_checked():
    from trainyard.serve.protocol import RequestError, parse_binary_request

    header = json.dumps({"inputs": [
        {"name": "input-0", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        {"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}).encode()
    raw = header + np.asarray([1.5, -2], dtype="<f4").tobytes() + (2).to_bytes(4, "little") + b"hi"
    body = parse_binary_request(raw, str(len(header)), json.loads)
    assert body["inputs"][0]["data"].tolist() == [1.5, -2.0] and "parameters" not in body["inputs"][0]
    assert body["inputs"][1]["data"] == ["hi"]
    cases = [(raw + b"x", len(header), "1 bytes after"), (raw[:-6] + (3).to_bytes(4, "little") + b"hi", len(header), "cut short"),
             (raw[:-3], len(header), "binary_data_size: 6 does not fit"), (raw, 10**6, "does not fit")]
    for bad, length, text in cases:
        with pytest.raises(RequestError, match=text):
            parse_binary_request(bad, str(length), json.loads)


def test_ingress_mode_settings_for_an_embedded_ray(monkeypatch):
    from trainyard.errors import TrainyardError
    from trainyard.runtime.ingress import haproxy_binary, ingress_env

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    assert ingress_env("proxy") == {}
    monkeypatch.setenv("TRAINYARD_SERVE_INGRESS", "proxy")
    assert ingress_env() == {}
    monkeypatch.setenv("TRAINYARD_SERVE_INGRESS", "fast")
    with pytest.raises(TrainyardError, match="must be one of auto, haproxy, proxy"):
        ingress_env()
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/nonexistent/haproxy")
    assert haproxy_binary() is None and ingress_env("auto") == {}
    with pytest.raises(TrainyardError, match="no HAProxy binary"):
        ingress_env("haproxy")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/bin/true")
    env = ingress_env("auto")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"].isdigit()  # a free port, not the fixed 8404
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # the user's own choice wins
    assert ingress_env("haproxy") == {}


def test_replicas_the_cluster_can_never_hold_are_refused_at_once(served):
    import time

    from ray import serve

    from trainyard.errors import TrainyardError
    from trainyard.serve.deploy import deploy
    from trainyard.serve.config import load_serve_config

    model = {"winner": str(served["root"] / "secured"), "name": "too_big", "num_replicas": 2, "num_cpus": 63.975}
    started = time.monotonic()
    with pytest.raises(TrainyardError, match=r"cannot hold the replicas \(CPU: needs 128, the cluster has"):
        deploy(load_serve_config(base={"port": served["port"], "models": [model]}))
    assert time.monotonic() - started < 30
    assert "too_big" not in serve.status().applications  # nothing was deployed


def test_a_deploy_asking_another_port_or_host_than_the_running_serve_is_refused_naming_both(served):
    """Serve keeps the host and port it started with (Ray ignores new ones with a warning):
    such a deploy printed a URL nothing listened on, or served a model asked for loopback on
    every interface with no key. It is refused, naming where Serve listens."""
    from ray import serve

    from trainyard.errors import TrainyardError
    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy

    model = {"winner": str(served["root"] / "mlp"), "name": "elsewhere", "num_cpus": 0.1}
    for host, port in (("127.0.0.1", served["port"] + 1), ("0.0.0.0", served["port"])):
        with pytest.raises(TrainyardError) as refused:
            deploy(load_serve_config(base={"host": host, "port": port, "insecure": True, "models": [model]}))
        assert str(refused.value) == (
            f"Serve already runs on this cluster, on 127.0.0.1:{served['port']} (set when it started; it cannot "
            f"move to {host}:{port}); deploy with --host 127.0.0.1 --port {served['port']}, or stop it first "
            "(serve shutdown)")
    assert "elsewhere" not in serve.status().applications
