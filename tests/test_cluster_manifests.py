"""cluster/: the Ray cluster launcher config, the KubeRay RayJob and the runtime env they share.

No cloud or Kubernetes here, so these are checked statically: they parse, have the fields their
tools require, agree with each other (image / Ray version, runtime env), and the job's entry point
is a valid `storymm train` command for the Ray backend whose GPU demand fits the cluster.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from storymm.cli import build_parser
from storymm.config import load_config
from storymm.training.ray_backend import worker_resources

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _load(name: str) -> dict:
    data = yaml.safe_load((CLUSTER / name).read_text())
    assert isinstance(data, dict), name
    return data


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return _load("runtime_env.yaml")


@pytest.fixture(scope="module")
def launcher() -> dict:
    return _load("aws-gpu.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load("rayjob-gate.yaml")


def _train_args(command: str):
    argv = shlex.split(command)
    assert argv[:2] == ["python", "jobs/train.py"], argv
    args = build_parser().parse_args(["train", *argv[2:]])
    assert args.backend == "ray"
    return args


def test_runtime_env_is_valid_for_ray(runtime_env):
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    assert set(runtime_env) <= {"excludes", "env_vars", "working_dir", "pip", "py_modules", "config"}
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())  # Ray requires strings
    assert ".venv" in runtime_env["excludes"] and ".git" in runtime_env["excludes"]
    assert int(env["env_vars"]["STORYMM_RAY_MAX_FAILURES"]) >= 1
    # credentials never live in the repository
    assert not any(key.startswith("AWS_") for key in runtime_env["env_vars"])


def test_launcher_config_for_gpu_nodes(launcher):
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "auth",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in launcher, key
    provider = launcher["provider"]
    assert provider["type"] == "aws" and provider["region"]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    for name, node in types.items():
        assert "node_config" in node and "resources" in node, name
        assert node["node_config"].get("InstanceType") and node["node_config"].get("ImageId"), name
    workers = {name: node for name, node in types.items() if name != launcher["head_node_type"]}
    gpu_types = [node for node in workers.values() if node["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU worker type"
    for node in workers.values():
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= launcher["max_workers"]
    assert types[launcher["head_node_type"]]["resources"].get("CPU", None) == 0  # no training on the head
    head = " ".join(launcher["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head and "--autoscaling-config" in head
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in launcher["worker_start_ray_commands"])
    # the repository is mounted and installed on every node
    mount = next(target for target, source in launcher["file_mounts"].items() if source == ".")
    assert any("pip install" in c and mount in c for c in launcher["setup_commands"])
    assert "gpu" in launcher["docker"]["image"]
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "aws_access_key" not in text.lower() and "AWS_SECRET_ACCESS_KEY" not in text


def test_rayjob_for_gate_training(rayjob, runtime_env):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    for key in ("entrypoint", "runtimeEnvYAML", "rayClusterSpec", "shutdownAfterJobFinishes"):
        assert key in spec, key

    args = _train_args(spec["entrypoint"])
    assert args.stage == "sequence" and args.config == "configs/gate.yaml"
    assert args.data.startswith("s3://") and args.run.startswith("s3://")
    assert args.init_from and all(u.startswith("s3://") for u in args.init_from)
    config = load_config(REPO / args.config)
    assert config.model.fusion == "gate"

    # the runtime env is cluster/runtime_env.yaml plus the image's working dir
    job_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert job_env.pop("working_dir") == "/app"
    assert job_env == runtime_env

    cluster = spec["rayClusterSpec"]
    version = cluster["rayVersion"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head
    assert head["rayStartParams"].get("num-cpus") == "0"
    images = [c["image"] for c in head["template"]["spec"]["containers"]]
    gpus, pod_cpus = 0, []
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        images += [c["image"] for c in containers]
        per_pod = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers)
        gpus += per_pod * group["replicas"]
        if per_pod:
            pod_cpus.append(sum(float(c["resources"]["limits"]["cpu"]) for c in containers))
    images += [c["image"] for c in spec["submitterPodTemplate"]["spec"]["containers"]]
    assert all(version in image for image in images), (version, images)
    # the job's demand fits what the cluster provides
    assert args.workers * args.gpus_per_worker <= gpus and args.gpus_per_worker > 0
    # and a GPU worker's CPUs (--cpus-per-worker, default GPU_WORKER_CPUS) fit in a GPU pod
    cpus = worker_resources(args.gpus_per_worker, args.cpus_per_worker)["CPU"]
    assert pod_cpus and all(cpus <= per_pod for per_pod in pod_cpus), (cpus, pod_cpus)
    # credentials come from a secret, never inline
    for container in head["template"]["spec"]["containers"]:
        assert all("value" not in e for e in container.get("env", []) if e["name"].startswith("AWS_"))
        assert container["envFrom"][0]["secretRef"]["name"]


def test_documented_commands_are_valid(launcher):
    """The `ray job submit ... -- python jobs/train.py ...` in the launcher's header parses."""
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    lines = [line.lstrip("# ").rstrip("\\").strip() for line in text.splitlines() if line.startswith("#")]
    joined = " ".join(lines)
    start = joined.index("python jobs/train.py")
    command = joined[start : joined.index("ray down")]
    args = _train_args(command)
    assert args.workers >= 1 and args.gpus_per_worker == 1
    assert (REPO / "cluster" / "runtime_env.yaml").exists() and "--runtime-env cluster/runtime_env.yaml" in joined
