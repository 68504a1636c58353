"""cluster.yaml, the Ray cluster launcher config for GPU training, checked without a cluster.

Ray's own validation is the one `ray up` runs before it talks to the cloud provider
(``ray.autoscaler._private.commands._bootstrap_config``): ``prepare_config`` (merge with the
provider's defaults.yaml, merge the set-up commands, check the docker section, fill in each
node type's bounds) then ``validate_config`` (ray/autoscaler/ray-schema.json through
jsonschema, then the head-type and min_workers checks). The provider's own
``bootstrap_config`` (boto3: key pair, security group, IAM role, subnets) needs AWS
credentials and the network, so it is left out.

The rest checks what the schema cannot: the head is no training target, the GPU worker types
match their instance types, the images match the Ray that trainyard pins, set-up installs
trainyard, every node mounts the shared storage, and the ports are open where they should be.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
SHARED_MOUNT = "/mnt/cluster_storage"

#: AWS instance types: (vCPUs, NVIDIA GPUs). A type not listed here fails the test until added.
INSTANCE_TYPES = {
    "m5.xlarge": (4, 0), "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0),
    "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0),
    "g4dn.xlarge": (4, 1), "g4dn.2xlarge": (8, 1), "g4dn.12xlarge": (48, 4),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1),
    "g5.12xlarge": (48, 4), "g5.24xlarge": (96, 4), "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g6.12xlarge": (48, 4), "g6.48xlarge": (192, 8),
    "p3.2xlarge": (8, 1), "p3.8xlarge": (32, 4), "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}


def raw_config() -> dict:
    """cluster.yaml as `ray up` reads it."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """Ray's validation of a cluster config, as `ray up` runs it; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(config))  # the file as written
    prepared = prepare_config(copy.deepcopy(config))  # merged with the provider's defaults
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict:
    return raw_config()


@pytest.fixture(scope="module")
def prepared(config) -> dict:
    return ray_validate(config)


def node_env(config: dict) -> dict[str, str]:
    """The variables the set-up commands export to every node (~/.trainyard_env)."""
    env = {}
    for command in config["setup_commands"]:
        match = re.fullmatch(r"echo 'export (\w+)=(\S+)' >>? ~/\.trainyard_env", command.strip())
        if match:
            env[match.group(1)] = match.group(2)
    return env


def worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# --------------------------------------------------------------------------------------
# Ray's own validation
# --------------------------------------------------------------------------------------


def test_ray_validates_the_config(prepared):
    assert prepared["provider"]["type"] == "aws"
    # prepare_config keeps our node types (a legacy config would have been rewritten).
    assert set(prepared["available_node_types"]) == set(raw_config()["available_node_types"])


def _misspelled_top_level_key(c):
    c["max_worker"] = c.pop("max_workers")


def _fractional_gpu_count(c):
    c["available_node_types"]["gpu-1x"]["resources"]["GPU"] = 0.5


def _misspelled_node_type_key(c):
    c["available_node_types"]["gpu-4x"]["min_worker"] = c["available_node_types"]["gpu-4x"].pop("min_workers")


def _commands_not_a_list(c):
    c["worker_setup_commands"] = "pip install -e ~/trainyard"


def _unknown_head_type(c):
    c["head_node_type"] = "ray.head.default"


def _mins_over_global_max(c):
    c["available_node_types"]["gpu-1x"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("break_it, error", [
    (_misspelled_top_level_key, jsonschema.ValidationError),
    (_fractional_gpu_count, jsonschema.ValidationError),
    (_misspelled_node_type_key, jsonschema.ValidationError),
    (_commands_not_a_list, jsonschema.ValidationError),
    (_unknown_head_type, ValueError),
    (_mins_over_global_max, ValueError),
], ids=lambda v: getattr(v, "__name__", "").lstrip("_"))
def test_ray_rejects_a_broken_copy(break_it, error):
    """The same validator refuses a copy with one deliberate mistake: the check is real."""
    broken = raw_config()
    break_it(broken)
    with pytest.raises(error):
        ray_validate(broken)


# --------------------------------------------------------------------------------------
# Node types and autoscaling bounds
# --------------------------------------------------------------------------------------


def test_head_is_no_training_target(config):
    head = config["available_node_types"][config["head_node_type"]]
    _, gpus = INSTANCE_TYPES[head["node_config"]["InstanceType"]]
    assert gpus == 0, "the head should be a CPU instance"
    # Explicit zeros: Ray would otherwise advertise the instance's CPUs, and trials, DDP
    # workers and replicas (all ask for CPU) could land on the head.
    assert head["resources"].get("GPU") == 0
    assert head["resources"].get("CPU") == 0
    assert head.get("max_workers", 0) == 0 and head.get("min_workers", 0) == 0


def test_gpu_worker_types_match_their_instances(config):
    gpus_by_type = {}
    for name, node in worker_types(config).items():
        instance = node["node_config"]["InstanceType"]
        assert instance in INSTANCE_TYPES, f"{name}: add {instance} to INSTANCE_TYPES"
        cpus, gpus = INSTANCE_TYPES[instance]
        assert node["resources"].get("GPU") == gpus, f"{name}: {instance} has {gpus} GPU(s)"
        assert 1 <= node["resources"].get("CPU", 0) <= cpus, f"{name}: {instance} has {cpus} vCPUs"
        gpus_by_type[name] = gpus
    assert 1 in gpus_by_type.values(), "a single-GPU worker type"
    assert any(g > 1 for g in gpus_by_type.values()), "a multi-GPU worker type"


def test_autoscaling_bounds(config, prepared):
    workers = worker_types(config)
    for name, node in workers.items():
        assert "min_workers" in node and "max_workers" in node, f"{name}: explicit bounds"
        assert 0 <= node["min_workers"] <= node["max_workers"], name
        assert node["max_workers"] >= 1, f"{name} could never start"
    # Ray requires the global max_workers to hold every type's min_workers; it is also at
    # least the sum of the types' max_workers, so no type's own bound is silently cut.
    assert config["max_workers"] >= sum(n["min_workers"] for n in workers.values())
    assert config["max_workers"] >= sum(n["max_workers"] for n in workers.values())
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def test_images_match_the_ray_trainyard_pins(config):
    import ray

    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    assert ray.__version__ == pinned
    docker = config["docker"]
    head_image, worker_image = docker["head_image"], docker["worker_image"]
    tags = []
    for image in (head_image, worker_image):
        match = re.fullmatch(r"rayproject/ray:([\d.]+)-(py3\d+)-(cpu|gpu|cu\d+)", image)
        assert match, f"{image}: not a rayproject/ray release tag"
        tags.append(match.groups())
    assert {t[0] for t in tags} == {pinned}, "every node runs the Ray trainyard pins"
    assert tags[0][1] == tags[1][1], "the same Python on every node"
    assert tags[1][2] != "cpu", "GPU workers need a CUDA image"


# --------------------------------------------------------------------------------------
# Set-up, storage, ports
# --------------------------------------------------------------------------------------


def _index(commands: list[str], pattern: str) -> int:
    found = [i for i, c in enumerate(commands) if re.search(pattern, c)]
    assert found, f"no set-up command matches {pattern!r}"
    return found[0]


def test_setup_installs_trainyard_on_every_node(config, prepared):
    assert config["file_mounts"]["~/trainyard"] == "."
    for kind in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[kind]  # the common setup_commands first, as Ray runs them
        torch = _index(commands, r"pip install .*\btorch==")
        trainyard = _index(commands, r"pip install .*~/trainyard\s*$")
        assert torch < trainyard, f"{kind}: torch before trainyard, so its pin decides the build"
    head, worker = prepared["head_setup_commands"], prepared["worker_setup_commands"]
    assert "whl/cpu" in head[_index(head, r"\btorch==")], "the head takes the CPU build"
    assert "whl/cpu" not in worker[_index(worker, r"\btorch==")], "GPU workers take CUDA torch"
    # Ray's default head set-up (boto3 for the autoscaler) is replaced by ours: keep boto3.
    _index(head, r"pip install .*boto3")


def test_every_node_mounts_the_shared_storage(config, prepared):
    mount = " ".join(config["initialization_commands"])
    assert re.search(rf"mount -t nfs4 .*:/ {SHARED_MOUNT}", mount), "EFS mounted on each host"
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in config["docker"]["run_options"], \
        "and visible inside the container"
    env = node_env(config)
    storage, registry = env["TRAINYARD_STORAGE_PATH"], env["TRAINYARD_REGISTRY"]
    assert storage.startswith((SHARED_MOUNT + "/", "s3://")), storage
    # `trainyard deploy` reads winners through local paths, so the registry is on the mount.
    assert registry.startswith(SHARED_MOUNT + "/"), registry
    assert env["TRAINYARD_ALLOW_AUTOSCALE"] == "1"


def test_documented_overrides_are_valid_job_config():
    """What docs/cluster.md passes to `trainyard submit` is a valid, cluster-ready job."""
    from trainyard.config import load_config, resolve

    env = node_env(raw_config())
    cfg = load_config(ROOT / "configs" / "tune_cnn.yaml", [
        f"storage_path={env['TRAINYARD_STORAGE_PATH']}",
        f"tune.registry={env['TRAINYARD_REGISTRY']}",
        "scaling.use_gpu=true",
    ])
    resolve(cfg)
    for value in (cfg.storage_path, cfg.tune.registry):  # relative paths: node-local, refused
        assert "://" in value or Path(value).is_absolute(), value
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"storage_path={env['TRAINYARD_STORAGE_PATH']}" in docs
    assert f"tune.registry={env['TRAINYARD_REGISTRY']}" in docs


def test_token_auth_on_every_node(config):
    assert node_env(config)["RAY_AUTH_MODE"] == "token"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[kind] if "ray start" in c)
        assert "source ~/.trainyard_env" in start, f"{kind}: ray start sees RAY_AUTH_MODE"


def test_dashboard_and_serve_ports(config):
    from trainyard.serve.config import ServeConfig

    start = " ".join(c for c in config["head_start_ray_commands"] if "ray start" in c)
    for flag in ("--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265",
                 "--ray-client-server-port=10001"):
        assert flag in start.split(), flag
    rules = {r["FromPort"]: r for r in config["provider"]["security_group"]["IpPermissions"]}
    serve_port = ServeConfig().port  # what `trainyard deploy` serves on by default
    assert serve_port == 8000
    assert set(rules) == {8265, serve_port}, "only the dashboard and Serve are opened"
    for port, rule in rules.items():
        assert rule["ToPort"] == port and rule["IpProtocol"] == "tcp"
        cidrs = [r["CidrIp"] for r in rule["IpRanges"]]
        assert cidrs and "0.0.0.0/0" not in cidrs, f"port {port}: open to a CIDR, not the world"


# --------------------------------------------------------------------------------------
# Secrets and permissions
# --------------------------------------------------------------------------------------

KEY_FILE = "~/.trainyard/api_key"


def test_every_node_sets_the_api_key_from_the_operators_secret(config, prepared):
    from trainyard.serve.config import ServeConfig

    # The secret is a file on the operator's machine, copied to every node like Ray's token;
    # no key is in cluster.yaml.
    assert config["file_mounts"][KEY_FILE] == KEY_FILE
    variable = ServeConfig().api_key_env  # what `trainyard deploy` and the replicas read
    assert variable == "TRAINYARD_API_KEY"
    export = f"""echo 'export {variable}="$(cat {KEY_FILE})"' >> ~/.trainyard_env"""
    assert variable not in node_env(config), "no literal key value"
    assert not re.search(rf"{variable}=(?!\"\$\(cat )", CLUSTER_YAML.read_text())
    for kind in ("head_setup_commands", "worker_setup_commands"):  # the common commands, merged
        commands = prepared[kind]
        check = _index(commands, rf"test -s {re.escape(KEY_FILE)}")
        assert "exit 1" in commands[check], "set-up stops when the secret is missing or empty"
        assert f"chmod 600 {KEY_FILE}" in commands[check]
        assert commands.index(export) > check, f"{kind}: exports {variable} from the secret"
    # ray start sources ~/.trainyard_env, so the raylet, and each replica it starts, has it.
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "source ~/.trainyard_env" in next(c for c in config[kind] if "ray start" in c)


def test_the_shared_folder_is_not_world_writable(config):
    mount = " ".join(config["initialization_commands"])
    modes = re.findall(rf"chmod (?:-R )?([0-7]{{3,4}}) {SHARED_MOUNT}\b", mount)
    assert modes, "the shared folder's mode is set"
    for mode in modes:
        others = int(mode[-1])
        assert others == 0, f"chmod {mode}: the shared folder is open to other users"
    assert not re.search(rf"chmod \S*[oa]\+\w*w\w* {SHARED_MOUNT}", mount)
    assert re.search(rf"chown \d+:\d+ {SHARED_MOUNT}\b", mount), "owned by the nodes' user"
