"""The cluster files pass Ray's own validators offline, and broken copies are rejected.

cluster/aws-gpu.yaml goes through what `ray up` runs before it calls AWS:
`ray.autoscaler._private.util.prepare_config` (prepare first: it merges the AWS provider defaults
and the per-type worker bounds) then `validate_config` (ray/autoscaler/ray-schema.json, unknown
keys, head_node_type, global max_workers against the sum of min_workers).

cluster/kuberay-rayjob.yaml: its rayClusterSpec goes through what Ray's autoscaler runs inside a
KubeRay head pod, `_derive_autoscaling_config_from_ray_cr`, which builds the same autoscaler
config and calls the same `validate_config`. The RayJob around it is checked against the field
names and rules of KubeRay's ray.io/v1 API (apis/ray/v1/{rayjob,raycluster}_types.go and
controllers/ray/utils/validation.go), written out below as a JSON schema plus the rules a schema
cannot say. The CRD itself (about 1 MB, mostly the Kubernetes pod template) is not vendored, so
pod templates are checked only for what KubeRay reads: containers with a name and an image.

Both Ray functions are private API: the image tags and the Ray pin are checked against the Ray
installed here, so a Ray upgrade that could change them also fails this file.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from orchestrator.storage import check_storage_uri

ROOT = Path(__file__).resolve().parents[1]
AWS_FILE = ROOT / "cluster" / "aws-gpu.yaml"
RAYJOB_FILE = ROOT / "cluster" / "kuberay-rayjob.yaml"
PYPROJECT = ROOT / "pyproject.toml"

IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
HEAD, CPU_WORKERS, GPU_WORKERS = "ray.head.cpu", "ray.worker.cpu", "ray.worker.gpu"
GPU_GROUP, CPU_GROUP = "gpu", "cpu"
GPU_LIMIT = "nvidia.com/gpu"
STORAGE_VAR, TRACKING_VAR = "LFM_STORAGE", "MLFLOW_TRACKING_URI"
SWEEP_COMMAND = (
    "lfm sweep sweeps/data_reduction.yaml profile=paper --cluster cluster/kuberay-rayjob.yaml"
)
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
CLUSTER_FILE_NAME = re.compile(r"cluster/[\w.-]+\.yaml")
PAPER_GPUS_PER_NODE = 8
# KubeRay's MaxRayJobNameLength: 53 (longest service suffix) less 6 for the cluster suffix.
MAX_RAYJOB_NAME = 47
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

Mutation = Callable[[dict[str, Any]], None]


def _strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object schema that, like `kubectl apply` (strict field validation), rejects unknown keys."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_ANY_OBJECT = {"type": "object"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0}
_POD_TEMPLATE = _strict(
    {
        "metadata": _ANY_OBJECT,
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                }
            },
        },
    },
    ("spec",),
)
_HEAD_GROUP = _strict(
    {
        "serviceType": {"type": "string"},
        "headService": _ANY_OBJECT,
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _STRING_MAP,
        "template": _POD_TEMPLATE,
        "resources": _STRING_MAP,
        "labels": _STRING_MAP,
    },
    ("template",),
)
_WORKER_GROUP = _strict(
    {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": _COUNT,
        "minReplicas": _COUNT,
        "maxReplicas": _COUNT,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": _COUNT,
        "suspend": {"type": "boolean"},
        "rayStartParams": _STRING_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": _ANY_OBJECT,
        "resources": _STRING_MAP,
        "labels": _STRING_MAP,
    },
    # Ray's autoscaler reads minReplicas and maxReplicas without defaults.
    ("groupName", "minReplicas", "maxReplicas", "template"),
)
_AUTOSCALER_OPTIONS = _strict(
    {
        "resources": _ANY_OBJECT,
        "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
        "securityContext": _ANY_OBJECT,
        "idleTimeoutSeconds": _COUNT,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
    }
)
_RAY_CLUSTER_SPEC = _strict(
    {
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": _AUTOSCALER_OPTIONS,
        "headServiceAnnotations": _STRING_MAP,
        "gcsFaultToleranceOptions": _ANY_OBJECT,
        "authOptions": _ANY_OBJECT,
        "managedBy": {"type": "string"},
        "suspend": {"type": "boolean"},
    },
    ("headGroupSpec",),
)
RAYJOB_SCHEMA = _strict(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}},
        },
        "spec": _strict(
            {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {
                    "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
                },
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number", "minimum": 0},
                "entrypointNumGpus": {"type": "number", "minimum": 0},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": _COUNT,
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": _COUNT,
                "suspend": {"type": "boolean"},
                "schedule": {"type": "string"},
                "metadata": _STRING_MAP,
                "clusterSelector": _STRING_MAP,
                "submitterPodTemplate": _ANY_OBJECT,
                "submitterConfig": _ANY_OBJECT,
                "managedBy": {"type": "string"},
                "deletionStrategy": _ANY_OBJECT,
                "rayClusterSpec": _RAY_CLUSTER_SPEC,
            },
            # This project's RayJobs create their own cluster (no clusterSelector) and run a sweep.
            ("entrypoint", "rayClusterSpec"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)


def _load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.safe_load(f)


def validate_cluster_launcher(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before any cloud call: merge the defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def validate_rayjob(job: dict[str, Any]) -> dict[str, Any]:
    """Check a RayJob as KubeRay and Ray's autoscaler would; return the derived autoscaler config.

    Raises:
        jsonschema.ValidationError: unknown or mistyped keys, missing required fields.
        ValueError: a rule of KubeRay's validation, or of Ray's autoscaler config validator.
    """
    jsonschema.validate(job, RAYJOB_SCHEMA)
    name = job["metadata"]["name"]
    if len(name) > MAX_RAYJOB_NAME or not DNS1035_LABEL.fullmatch(name):
        raise ValueError(f"metadata.name {name!r}: a DNS-1035 label of <= {MAX_RAYJOB_NAME} chars")
    spec = job["spec"]
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    unknown = set(runtime_env) - RuntimeEnv.known_fields
    if unknown:
        raise ValueError(f"runtimeEnvYAML: unknown fields {sorted(unknown)}")
    RuntimeEnv(**runtime_env)
    for group in spec["rayClusterSpec"].get("workerGroupSpecs", []):
        low, high = group["minReplicas"], group["maxReplicas"]
        replicas = group.get("replicas", low)  # absent: the operator starts at minReplicas
        if not low <= replicas <= high:
            raise ValueError(
                f"workerGroupSpecs[{group['groupName']}]: need minReplicas {low} <= "
                f"replicas {replicas} <= maxReplicas {high}"
            )
    return validate_cluster_launcher(_autoscaler_config(name, spec["rayClusterSpec"]))


def _autoscaler_config(name: str, cluster_spec: dict[str, Any]) -> dict[str, Any]:
    """What Ray's autoscaler in a KubeRay head pod derives from the RayCluster (and validates)."""
    ray_cluster = {"metadata": {"name": name, "namespace": "default"}, "spec": cluster_spec}
    return _derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cluster))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open a network connection (both validators must work offline)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def aws() -> dict[str, Any]:
    return _load(AWS_FILE)


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load(RAYJOB_FILE)


def _docker_env(config: dict[str, Any]) -> dict[str, str]:
    """The `--env KEY=VALUE` entries of the docker run options."""
    env = {}
    for option in config["docker"]["run_options"]:
        words = shlex.split(option)
        if words[0] == "--env":
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def _runtime_env(job: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def _group(job: dict[str, Any], name: str) -> dict[str, Any]:
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == name)


# --- cluster/aws-gpu.yaml ------------------------------------------------------------------


@pytest.mark.usefixtures("offline")
def test_aws_config_passes_ray_validation(aws: dict[str, Any]) -> None:
    prepared = validate_cluster_launcher(aws)
    types = prepared["available_node_types"]
    assert set(types) == {HEAD, CPU_WORKERS, GPU_WORKERS}
    assert types[HEAD]["max_workers"] == 0
    # Every command list is ours: none of Ray's AWS defaults (a nightly Ray wheel) leaked in.
    assert prepared["head_setup_commands"] == aws["setup_commands"]
    assert prepared["worker_setup_commands"] == aws["setup_commands"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == aws[key]


def test_aws_config_node_roles(aws: dict[str, Any]) -> None:
    types = aws["available_node_types"]
    assert types[HEAD]["resources"] == {"CPU": 0}
    for name in (CPU_WORKERS, GPU_WORKERS):
        assert types[name]["min_workers"] == 0
        assert types[name]["max_workers"] >= 1
    assert (
        aws["max_workers"] == types[CPU_WORKERS]["max_workers"] + types[GPU_WORKERS]["max_workers"]
    )
    gpu_node, cpu_node = types[GPU_WORKERS]["node_config"], types[CPU_WORKERS]["node_config"]
    assert gpu_node["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in cpu_node
    # Workers write checkpoints and cache entries to S3, so each carries an instance profile.
    assert gpu_node["IamInstanceProfile"] == cpu_node["IamInstanceProfile"]


def test_aws_config_installs_the_project_on_the_image_ray(aws: dict[str, Any]) -> None:
    assert aws["docker"]["image"] == IMAGE
    mount = next(remote for remote, local in aws["file_mounts"].items() if local == ".")
    install = aws["setup_commands"][0]
    assert f'-e "$HOME/{mount.removeprefix("~/")}[paper]"' in install
    assert f"ray[default,train,tune]=={ray.__version__}" in install
    env = _docker_env(aws)
    assert check_storage_uri(env[STORAGE_VAR]).startswith("s3://")
    assert env[TRACKING_VAR].startswith(("http://", "https://"))


def _set(path: tuple[str, ...], value: object) -> Mutation:
    def mutate(config: dict[str, Any]) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _rename(path: tuple[str, ...], new_key: str) -> Mutation:
    def mutate(config: dict[str, Any]) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        node[new_key] = node.pop(path[-1])

    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(config: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(config)

    return mutate


AWS_BROKEN = [
    pytest.param(
        _rename(("idle_timeout_minutes",), "idle_timeout_minute"),
        jsonschema.ValidationError,
        r"'idle_timeout_minute' was unexpected",
        id="typo-top-level-key",
    ),
    pytest.param(
        _rename(("available_node_types", GPU_WORKERS, "min_workers"), "min_worker"),
        jsonschema.ValidationError,
        r"'min_worker' was unexpected",
        id="typo-node-type-key",
    ),
    pytest.param(
        _rename(("docker", "image"), "imgae"),
        AssertionError,
        r"Must provide a container & image name",
        id="typo-docker-key",
    ),
    pytest.param(
        _both(
            _set(("max_workers",), 1),
            _set(("available_node_types", GPU_WORKERS, "min_workers"), 2),
        ),
        ValueError,
        r"global `max_workers` is smaller than the sum of `min_workers`",
        id="max-workers-below-min-workers",
    ),
    pytest.param(
        _set(("head_node_type",), "ray.head.default"),
        ValueError,
        r"`head_node_type` must be one of `available_node_types`",
        id="unknown-head-node-type",
    ),
    pytest.param(
        _set(("available_node_types", HEAD, "resources"), {"CPU": -1}),
        jsonschema.ValidationError,
        r"-1 is less than the minimum of 0",
        id="negative-resource",
    ),
]


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(("mutate", "error", "message"), AWS_BROKEN)
def test_aws_broken_copy_is_rejected_by_ray(
    aws: dict[str, Any], mutate: Mutation, error: type[Exception], message: str
) -> None:
    broken = copy.deepcopy(aws)
    mutate(broken)
    with pytest.raises(error, match=message):
        validate_cluster_launcher(broken)


# --- cluster/kuberay-rayjob.yaml -----------------------------------------------------------


@pytest.mark.usefixtures("offline")
def test_rayjob_passes_kuberay_rules_and_ray_validation(rayjob: dict[str, Any]) -> None:
    autoscaler = validate_rayjob(rayjob)
    types = autoscaler["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types[GPU_GROUP]["resources"]["GPU"] == PAPER_GPUS_PER_NODE
    assert "GPU" not in types[CPU_GROUP]["resources"]
    for name in (GPU_GROUP, CPU_GROUP):
        group = _group(rayjob, name)
        assert types[name]["min_workers"] == group["minReplicas"] == 0
        assert types[name]["max_workers"] == group["maxReplicas"] >= 1
    assert rayjob["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_runs_the_sweep_on_the_project_image(
    rayjob: dict[str, Any], aws: dict[str, Any]
) -> None:
    spec = rayjob["spec"]
    assert spec["entrypoint"].endswith(SWEEP_COMMAND)
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [
        _group(rayjob, name)["template"]["spec"]["containers"][0] for name in (GPU_GROUP, CPU_GROUP)
    ]
    assert {c["image"] for c in [head, *workers]} == {aws["docker"]["image"]}
    assert workers[0]["resources"]["limits"][GPU_LIMIT] == str(PAPER_GPUS_PER_NODE)
    assert GPU_LIMIT not in workers[1]["resources"].get("limits", {})


def test_rayjob_runtime_env_matches_pyproject(rayjob: dict[str, Any]) -> None:
    """The job installs exactly pyproject's dependencies, less Ray (the image has it), and its
    `paper` extra."""
    with PYPROJECT.open("rb") as f:
        project = tomllib.load(f)["project"]
    wanted = {str(r) for r in map(Requirement, project["dependencies"]) if r.name != "ray"}
    wanted |= {str(Requirement(r)) for r in project["optional-dependencies"]["paper"]}
    env = _runtime_env(rayjob)
    assert {str(Requirement(r)) for r in env["pip"]["packages"]} == wanted
    assert check_storage_uri(env["env_vars"][STORAGE_VAR]).startswith("s3://")
    assert env["env_vars"][TRACKING_VAR].startswith(("http://", "https://"))


def test_cluster_files_set_the_variables_the_orchestrator_reads(
    rayjob: dict[str, Any], aws: dict[str, Any]
) -> None:
    config = pytest.importorskip("orchestrator.config")
    names = {config.STORAGE_ENV, config.TRACKING_ENV}
    assert names <= set(_runtime_env(rayjob)["env_vars"])
    assert names <= set(_docker_env(aws))


def test_rayjob_entrypoint_sweep_resolves_with_the_job_env(
    rayjob: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    command = shlex.split(rayjob["spec"]["entrypoint"].split("&&")[-1])
    assert command[:2] == ["lfm", "sweep"]
    from orchestrator import cli, config

    args = cli.build_parser().parse_args(command[1:])
    sweep_file, overrides = ROOT / args.file, args.overrides
    assert (ROOT / args.cluster).is_file()

    env_vars = _runtime_env(rayjob)["env_vars"]
    for key, value in env_vars.items():
        monkeypatch.setenv(key, value)
    sweep = config.load_sweep(sweep_file, overrides)
    assert sweep.storage == env_vars[STORAGE_VAR]
    assert sweep.tracking.uri == env_vars[TRACKING_VAR]


def _set_group(name: str, key: str, value: object) -> Mutation:
    def mutate(job: dict[str, Any]) -> None:
        _group(job, name)[key] = value

    return mutate


def _pop_group(name: str, key: str) -> Mutation:
    def mutate(job: dict[str, Any]) -> None:
        del _group(job, name)[key]

    return mutate


def _rename_group_key(name: str, key: str, new_key: str) -> Mutation:
    def mutate(job: dict[str, Any]) -> None:
        group = _group(job, name)
        group[new_key] = group.pop(key)

    return mutate


def _drop_image(job: dict[str, Any]) -> None:
    del _group(job, GPU_GROUP)["template"]["spec"]["containers"][0]["image"]


def _runtime_env_field(job: dict[str, Any]) -> None:
    job["spec"]["runtimeEnvYAML"] += "workdir: .\n"


CLUSTER = ("spec", "rayClusterSpec")
RAYJOB_BROKEN = [
    pytest.param(
        _rename(("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinish"),
        jsonschema.ValidationError,
        r"'shutdownAfterJobFinish' was unexpected",
        id="typo-spec-key",
    ),
    pytest.param(
        _rename((*CLUSTER, "workerGroupSpecs"), "workerGroupSpec"),
        jsonschema.ValidationError,
        r"'workerGroupSpec' was unexpected",
        id="typo-cluster-key",
    ),
    pytest.param(
        _rename_group_key(GPU_GROUP, "maxReplicas", "maxReplica"),
        jsonschema.ValidationError,
        r"'maxReplicas' is a required property",
        id="typo-worker-group-key",
    ),
    pytest.param(
        _both(_set_group(GPU_GROUP, "minReplicas", 3), _set_group(GPU_GROUP, "maxReplicas", 2)),
        ValueError,
        r"workerGroupSpecs\[gpu\]: need minReplicas 3 <= replicas 0 <= maxReplicas 2",
        id="max-replicas-below-min-replicas",
    ),
    pytest.param(
        _set_group(CPU_GROUP, "replicas", 5),
        ValueError,
        r"workerGroupSpecs\[cpu\]: need minReplicas 0 <= replicas 5 <= maxReplicas 4",
        id="replicas-above-max-replicas",
    ),
    pytest.param(
        _set_group(GPU_GROUP, "minReplicas", -1),
        jsonschema.ValidationError,
        r"-1 is less than the minimum of 0",
        id="negative-min-replicas",
    ),
    pytest.param(
        _pop_group(CPU_GROUP, "groupName"),
        jsonschema.ValidationError,
        r"'groupName' is a required property",
        id="missing-group-name",
    ),
    pytest.param(
        _drop_image,
        jsonschema.ValidationError,
        r"'image' is a required property",
        id="container-without-image",
    ),
    pytest.param(
        _set(("spec", "entrypoint"), ""),
        jsonschema.ValidationError,
        r"'' should be non-empty",
        id="empty-entrypoint",
    ),
    pytest.param(
        _set(("apiVersion",), "ray.io/v1alpha1"),
        jsonschema.ValidationError,
        r"'ray.io/v1' was expected",
        id="old-api-version",
    ),
    pytest.param(
        _set((*CLUSTER, "autoscalerOptions", "upscalingMode"), "Fast"),
        jsonschema.ValidationError,
        r"'Fast' is not one of",
        id="bad-upscaling-mode",
    ),
    pytest.param(
        _set(("metadata", "name"), "LFM_data_reduction"),
        ValueError,
        r"metadata.name 'LFM_data_reduction': a DNS-1035 label",
        id="bad-name",
    ),
    pytest.param(
        _runtime_env_field,
        ValueError,
        r"runtimeEnvYAML: unknown fields \['workdir'\]",
        id="typo-runtime-env-field",
    ),
    pytest.param(
        _set(("spec", "runtimeEnvYAML"), "working_dir: s3://my-lfm-bucket/code/\n"),
        ValueError,
        r"Only \.zip, \.tar\.gz, \.tgz, \.tar\.xz files are supported for working_dir URIs",
        id="working-dir-not-an-archive",
    ),
    pytest.param(
        _set_group(GPU_GROUP, "rayStartParams", {"num-gpus": 1}),
        jsonschema.ValidationError,
        r"1 is not of type 'string'",
        id="non-string-ray-start-param",
    ),
]


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(("mutate", "error", "message"), RAYJOB_BROKEN)
def test_rayjob_broken_copy_is_rejected(
    rayjob: dict[str, Any], mutate: Mutation, error: type[Exception], message: str
) -> None:
    broken = copy.deepcopy(rayjob)
    mutate(broken)
    with pytest.raises(error, match=message):
        validate_rayjob(broken)


@pytest.mark.usefixtures("offline")
def test_ray_itself_rejects_worker_minimums_above_the_cluster_maximum(
    rayjob: dict[str, Any],
) -> None:
    """Ray's derivation validates on its own: sum(minReplicas) above sum(maxReplicas) fails."""
    broken = copy.deepcopy(rayjob)
    for name in (GPU_GROUP, CPU_GROUP):
        _group(broken, name)["maxReplicas"] = 0
    _group(broken, GPU_GROUP)["minReplicas"] = 1
    with pytest.raises(ValueError, match=r"global `max_workers` is smaller than the sum"):
        _autoscaler_config("x", broken["spec"]["rayClusterSpec"])


# --- the sweeps' paper profiles against the cluster files their comments name ----------------


def _paper_sweeps() -> list[tuple[Path, Path]]:
    """(sweep file, cluster file) for every sweep with a paper profile and every cluster file
    its text names."""
    pairs = []
    for sweep in SWEEPS:
        text = sweep.read_text()
        if "profiles:" not in text or "\n  paper:" not in text:
            continue
        names = sorted(set(CLUSTER_FILE_NAME.findall(text)))
        assert names, f"{sweep.name}: its paper profile names no cluster file"
        pairs += [(sweep, ROOT / name) for name in names]
    return pairs


def _dry_run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from orchestrator import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


@pytest.mark.parametrize(
    ("sweep", "cluster"), _paper_sweeps(), ids=lambda p: p.name if isinstance(p, Path) else p
)
def test_paper_profile_fits_its_cluster_file(
    sweep: Path, cluster: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["sweep", str(sweep), "profile=paper", f"storage={tmp_path}", "--dry-run"]
    status, out, err = _dry_run([*argv, "--cluster", str(cluster)], capsys)
    assert status == 0, err
    assert "fits: yes" in out
    # The paper profiles' trial drivers hold no GPU; their workers one 8-GPU node each.
    assert "trial demand: driver {CPU: 1} + 8 workers x {CPU: 8, GPU: 1} + stage task" in out
    from orchestrator import cluster_fit

    nodes = cluster_fit.node_types_from_file(cluster)
    assert max(n.resources.get("GPU", 0) for n in nodes) == PAPER_GPUS_PER_NODE


@pytest.mark.parametrize("cluster", [AWS_FILE, RAYJOB_FILE], ids=lambda p: p.name)
def test_a_worker_group_larger_than_any_node_is_refused_in_one_line(
    cluster: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = ROOT / "sweeps" / "data_reduction.yaml"
    argv = ["sweep", str(sweep), "profile=paper", f"storage={tmp_path}", "resources.num_workers=16"]
    argv += ["--dry-run", "--cluster", str(cluster)]
    status, _, err = _dry_run(argv, capsys)
    assert status == 2
    line = err.strip()
    assert "\n" not in line
    assert line.startswith("lfm sweep: error: resources: a Ray Train worker group")
    assert "needs GPU: 16 on one node but no node type has more than GPU: 8" in line


def test_gpu_demand_on_a_cpu_only_cluster_is_refused(tmp_path: Path) -> None:
    from lfm_core.errors import ConfigError
    from orchestrator import cluster_fit
    from orchestrator.config import load_sweep

    cfg = load_sweep(
        ROOT / "sweeps" / "tiny.yaml", [f"storage={tmp_path}", "resources.use_gpu=true"]
    )
    head = [cluster_fit.NodeType("node 127.0.0.1", {"CPU": 2.0}, 1)]
    with pytest.raises(ConfigError) as info:
        cluster_fit.check_fit(cluster_fit.trial_demand(cfg.resources), head)
    assert str(info.value) == (
        "resources: a Ray Train worker needs GPU: 1 ({CPU: 1, GPU: 1}) but no node type has "
        "more than GPU: 0; largest node: node 127.0.0.1 {CPU: 2}"
    )


def test_launcher_resources_are_inferred_from_known_instance_types() -> None:
    from lfm_core.errors import ConfigError
    from orchestrator import cluster_fit

    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "node_config": {"InstanceType": "m5.2xlarge"}},
            "p5": {"max_workers": 2, "node_config": {"InstanceType": "p5.48xlarge"}},
            "g5": {"max_workers": 5, "resources": {}, "node_config": {"InstanceType": "g5.xlarge"}},
        },
    }
    types = {t.name: t for t in cluster_fit.node_types_from_launcher(config)}
    assert types["head"] == cluster_fit.NodeType("head", {"CPU": 0.0}, 1)
    assert types["p5"] == cluster_fit.NodeType("p5", {"CPU": 192.0, "GPU": 8.0}, 2)
    assert types["g5"] == cluster_fit.NodeType("g5", {"CPU": 4.0, "GPU": 1.0}, 3)  # global cap
    config["available_node_types"]["g5"]["node_config"]["InstanceType"] = "x9.huge"
    with pytest.raises(ConfigError, match=r"node type g5: instance type 'x9.huge' has no known"):
        cluster_fit.node_types_from_launcher(config)


def test_kuberay_groups_read_limits_and_ray_start_params(rayjob: dict[str, Any]) -> None:
    from orchestrator import cluster_fit

    job = copy.deepcopy(rayjob)
    _group(job, CPU_GROUP)["rayStartParams"] = {"num-cpus": "2", "resources": '"{\\"node_a\\": 1}"'}
    types = {t.name: t for t in cluster_fit.node_types_from_kuberay(job)}
    assert types["headgroup"] == cluster_fit.NodeType("headgroup", {"CPU": 0.0}, 1)
    assert types[GPU_GROUP] == cluster_fit.NodeType(GPU_GROUP, {"CPU": 90.0, "GPU": 8.0}, 4)
    assert types[CPU_GROUP] == cluster_fit.NodeType(CPU_GROUP, {"CPU": 2.0, "node_a": 1.0}, 4)
    # The same node types as Ray's own derivation inside a KubeRay head pod.
    derived = _autoscaler_config("x", rayjob["spec"]["rayClusterSpec"])["available_node_types"]
    for name, node in cluster_fit_types(rayjob).items():
        ours = {k: v for k, v in derived[name]["resources"].items() if k in ("CPU", "GPU")}
        assert ours == dict(node.resources)


def cluster_fit_types(job: dict[str, Any]) -> dict[str, Any]:
    from orchestrator import cluster_fit

    return {t.name: t for t in cluster_fit.node_types_from_kuberay(job)}


def test_concurrency_comes_from_the_autoscalers_maximum(tmp_path: Path) -> None:
    from orchestrator import cluster_fit
    from orchestrator.config import load_sweep

    sweep = ROOT / "sweeps" / "data_reduction.yaml"
    cfg = load_sweep(sweep, ["profile=paper", f"storage={tmp_path}"])
    demand = cluster_fit.trial_demand(cfg.resources)
    nodes = cluster_fit.node_types_from_file(AWS_FILE)
    # A fresh cluster is the head alone; its maximum is 4 GPU nodes of 8 GPUs: 4 trials.
    assert cluster_fit.max_concurrent(demand, nodes, None) == 4
    assert cluster_fit.max_concurrent(demand, nodes, 2) == 2
