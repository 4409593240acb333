"""The cluster specs in ``cluster/specs``: the Ray cluster-launcher YAML is validated against the JSON
schema that ships inside the installed ``ray`` package (the one ``ray up`` itself applies), and the
KubeRay RayJob manifest is checked for the fields and value types the RayJob CRD requires. Both are
checked for the security properties the README promises: token auth on, dashboard not exposed,
no credentials in the files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

SPECS = Path(__file__).resolve().parent.parent / "cluster" / "specs"
LAUNCHER = SPECS / "aws-gpu-cluster.yaml"
RAYJOB = SPECS / "rayjob.yaml"
CONFIGS = SPECS.parent.parent / "configs"
GPUS_PER_NODE = 8  # p5.48xlarge
# The environment NCCL needs to run over EFA (libfabric's efa provider, GPUDirect RDMA).
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}

# Names of env vars / keys that would carry a secret; none may appear with a literal value.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
# AWS access key ids (long-term AKIA, temporary ASIA) and anything assigning a secret access key.
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET_ASSIGN = re.compile(r"aws_secret_access_key\s*[:=]", re.IGNORECASE)


def _load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), f"{path.name} is not a YAML mapping"
    return doc


def _assert_no_aws_credentials(text: str, where: str) -> None:
    assert not AWS_KEY_ID.search(text), f"{where} contains an AWS access key id"
    assert not AWS_SECRET_ASSIGN.search(text), f"{where} assigns an AWS secret access key"
    assert "AWS_SESSION_TOKEN" not in text, f"{where} carries an AWS session token"


# --------------------------------------------------------------------------------------------
# Ray cluster launcher (ray up)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher_text() -> str:
    return LAUNCHER.read_text()


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return _load(LAUNCHER)


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    # The schema file only, via the package's location: importing ray itself is not needed.
    import importlib.util

    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin, "ray is not installed"
    path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"Ray's cluster-config schema is missing at {path}"
    return json.loads(path.read_text())


def test_launcher_validates_against_rays_schema(launcher: dict[str, Any], ray_schema: dict[str, Any]) -> None:
    jsonschema.validate(launcher, ray_schema)


def test_launcher_passes_rays_own_config_preparation(launcher: dict[str, Any]) -> None:
    # What `ray up` does before touching AWS: merge provider defaults, then validate (schema plus
    # Ray's cross-field checks, e.g. head_node_type and per-type worker bounds). Offline.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(json.loads(json.dumps(launcher)))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_ray_schema_rejects_an_unknown_field(launcher: dict[str, Any], ray_schema: dict[str, Any]) -> None:
    # Guards the test above: Ray's schema is strict (additionalProperties: false), so a misspelt
    # key would fail `ray up`; make sure the validation here would catch it too.
    broken = dict(launcher, head_start_commands=["ray start --head"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def test_launcher_provider_and_node_types(launcher: dict[str, Any]) -> None:
    provider = launcher["provider"]
    assert provider["type"] == "aws"
    assert provider.get("region")
    assert isinstance(provider.get("cache_stopped_nodes"), bool)
    assert provider.get("availability_zone")
    assert launcher["auth"]["ssh_user"]

    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types

    gpu_types = [
        name for name, t in types.items()
        if t["node_config"].get("InstanceType") == "p5.48xlarge"
    ]
    assert gpu_types, "no p5.48xlarge (8x H100) worker type"
    for name in gpu_types:
        assert name != launcher["head_node_type"], "the head must not be a GPU instance"
        assert types[name]["resources"].get("GPU") == 8, f"{name} must advertise 8 GPUs"
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("p", "g")), "head should be a CPU instance"


def test_launcher_worker_counts(launcher: dict[str, Any]) -> None:
    workers = {n: t for n, t in launcher["available_node_types"].items() if n != launcher["head_node_type"]}
    assert workers
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers", launcher["max_workers"])
        assert 0 <= lo <= hi, f"{name}: min_workers {lo} > max_workers {hi}"
        assert hi <= launcher["max_workers"], f"{name}: max_workers above the cluster's"
    assert launcher["max_workers"] >= sum(t.get("min_workers", 0) for t in workers.values())


def _gpu_types(launcher: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: t for n, t in launcher["available_node_types"].items()
            if t["node_config"].get("InstanceType") == "p5.48xlarge"}


def _paper_nodes() -> int:
    """GPU nodes the largest paper recipe's training stages ask for (workers / 8)."""
    workers = []
    for path in CONFIGS.glob("vit-*.yaml"):
        for stage in _load(path)["stages"].values():
            if stage.get("type") in ("pretrain", "finetune"):
                workers.append(stage["params"]["workers"])
    assert workers, "no paper recipes found"
    return -(-max(workers) // GPUS_PER_NODE)


def test_launcher_has_room_for_the_h14_recipe(launcher: dict[str, Any]) -> None:
    h14 = _load(CONFIGS / "vit-h14-s3.yaml")["stages"]["pretrain"]["params"]["workers"]
    assert h14 // GPUS_PER_NODE == 16 == _paper_nodes()
    for name, t in _gpu_types(launcher).items():
        assert t.get("max_workers", launcher["max_workers"]) >= 16, f"{name} caps GPU nodes below the H/14 recipe's 16"
    assert launcher["max_workers"] >= 16


def test_launcher_gpu_nodes_have_efa(launcher: dict[str, Any]) -> None:
    for name, t in _gpu_types(launcher).items():
        cfg = t["node_config"]
        nics = cfg.get("NetworkInterfaces")
        assert nics, f"{name}: no NetworkInterfaces, so no EFA: NCCL would fall back to TCP"
        # One EFA per network card, all 32 of the p5: card 0 is the primary (EFA with ENA, device
        # index 0); the others sit at device index 1, EFA with or without ENA (AWS's layout).
        assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(32))
        for n in nics:
            primary = n["NetworkCardIndex"] == 0
            assert n["DeviceIndex"] == (0 if primary else 1)
            assert n["InterfaceType"] == "efa" if primary else n["InterfaceType"] in ("efa", "efa-only")
            # Ray takes subnet and security group from every interface, and refuses them at node level.
            assert n.get("SubnetId") and n.get("Groups"), f"{name}: interface {n['NetworkCardIndex']} lacks them"
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(cfg)
        assert cfg["Placement"]["GroupName"], f"{name}: EFA wants a cluster placement group"


def _effective_worker_setup(launcher: dict[str, Any], node_type: str) -> list[str]:
    """The setup commands Ray runs on a worker of ``node_type``: setup_commands + worker_setup_commands,
    unless the node type has its own worker_setup_commands, which then replace both (Ray's rule)."""
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(json.loads(json.dumps(launcher)))
    return prepared["available_node_types"][node_type].get("worker_setup_commands",
                                                           prepared["worker_setup_commands"])


def test_launcher_gpu_nodes_export_the_nccl_efa_environment(launcher: dict[str, Any]) -> None:
    for name in _gpu_types(launcher):
        setup = "\n".join(_effective_worker_setup(launcher, name))
        assert "pip install" in setup, f"{name}: the project's setup does not run there"
        for var, value in {**EFA_ENV, "NCCL_SOCKET_IFNAME": None}.items():
            found = re.findall(rf"export {var}=([^\s']+)", setup)
            assert found, f"{name}: {var} is not exported"
            assert value is None or found == [value], f"{name}: {var}={found}"
        assert re.search(r"export LD_LIBRARY_PATH=[^\s']*/opt/amazon/ofi-nccl/lib", setup), "aws-ofi-nccl not found"


def test_launcher_credentials_come_from_instance_profiles(launcher: dict[str, Any], launcher_text: str) -> None:
    _assert_no_aws_credentials(launcher_text, LAUNCHER.name)
    for name, t in launcher["available_node_types"].items():
        profile = t["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Arn") or profile.get("Name")), f"{name} has no IamInstanceProfile"
    # No command exports anything secret-looking either (env vars in setup/start commands).
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in launcher.get(key) or []:
            for var in re.findall(r"export\s+([A-Za-z_][A-Za-z0-9_]*)=", cmd):
                assert not SECRET_NAME.search(var), f"{key} exports {var}"


def test_launcher_token_auth_on_every_node(launcher: dict[str, Any]) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = launcher[key]
        starts = [c for c in cmds if "ray start" in c]
        assert starts, f"{key} never starts Ray"
        for c in starts:
            assert "RAY_AUTH_MODE=token" in c, f"{key}: `ray start` without RAY_AUTH_MODE=token"
    # The token reaches the nodes as a file at Ray's default path, never as a literal.
    mounts = launcher["file_mounts"]
    assert any(remote.rstrip("/").endswith(".ray/auth_token") for remote in mounts), \
        "the Ray auth token is not shipped via file_mounts"
    assert any(local in (".", "./") for local in mounts.values()), "the project is not synced"


def test_launcher_dashboard_bound_to_loopback(launcher: dict[str, Any], launcher_text: str) -> None:
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head_start)
    assert "0.0.0.0" not in head_start
    # Nothing else in the file binds the dashboard to all interfaces either.
    assert not re.search(r"dashboard-host[= ]['\"]?0\.0\.0\.0", launcher_text)


def test_launcher_installs_the_project(launcher: dict[str, Any]) -> None:
    setup = " ".join(launcher.get("setup_commands") or [])
    assert "pip install" in setup and "-e ~/vitpipe" in setup
    assert "~/vitpipe" in launcher["file_mounts"]


# --------------------------------------------------------------------------------------------
# KubeRay RayJob
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob_text() -> str:
    return RAYJOB.read_text()


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load(RAYJOB)


def _pod_specs(rayjob: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return pods


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def test_rayjob_kind_and_entrypoint(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])
    spec = rayjob["spec"]
    assert re.search(r"\bpython -m pipeline\.cli run \S+\.ya?ml\b", spec["entrypoint"])
    # Several pods share the run, so it must live on object storage, not a pod's disk.
    assert "--run-dir s3://" in spec["entrypoint"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0


def test_rayjob_cluster_spec(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]
    c0 = head["template"]["spec"]["containers"][0]
    assert c0["name"] and c0["image"]
    groups = [head] + cluster["workerGroupSpecs"]
    for g in groups:
        params = g["rayStartParams"]
        assert isinstance(params, dict)
        for k, v in params.items():
            # KubeRay's CRD types rayStartParams as map[string]string: a bare 0 or true is rejected.
            assert isinstance(k, str) and isinstance(v, str), f"rayStartParams {k}={v!r} must be a string"
    # Reachable by the submitter and the operator through the ClusterIP service only.
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"


def test_rayjob_worker_groups(rayjob: dict[str, Any]) -> None:
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert groups
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    assert "gpu-workers" in names
    for g in groups:
        lo, n, hi = g["minReplicas"], g["replicas"], g["maxReplicas"]
        assert all(type(x) is int for x in (lo, n, hi)), f"{g['groupName']}: replica counts must be ints"
        assert 0 <= lo <= n <= hi, f"{g['groupName']}: need minReplicas <= replicas <= maxReplicas"
        spec = g["template"]["spec"]
        containers = spec["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers)
        res = containers[0]["resources"]
        assert str(res["limits"]["nvidia.com/gpu"]) == "8", f"{g['groupName']}: 8 GPUs per pod"
        assert res["requests"]["cpu"] and res["requests"]["memory"]
        assert res["limits"]["cpu"] and res["limits"]["memory"]
        # NCCL needs a large /dev/shm: a memory-backed emptyDir mounted there.
        shm = [v["name"] for v in spec.get("volumes", []) if (v.get("emptyDir") or {}).get("medium") == "Memory"]
        mounts = {m["mountPath"]: m["name"] for m in containers[0].get("volumeMounts", [])}
        assert mounts.get("/dev/shm") in shm, f"{g['groupName']}: no memory-backed /dev/shm"


def test_rayjob_gpu_workers_use_efa_and_fit_the_h14_recipe(rayjob: dict[str, Any]) -> None:
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]
    assert gpu["replicas"] >= _paper_nodes() == 16
    container = gpu["template"]["spec"]["containers"][0]
    for kind in ("requests", "limits"):
        assert str(container["resources"][kind].get("vpc.amazonaws.com/efa")) == "32", f"EFA {kind}"
    env = _env(container)
    for var, value in EFA_ENV.items():
        assert env.get(var, {}).get("value") == value, f"gpu-workers: {var} is not {value}"


def test_rayjob_token_auth_from_secret(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    auth = cluster.get("authOptions") or {}
    assert auth.get("mode") == "token"
    secret_names = set()
    pods = _pod_specs(rayjob) + [("submitter", rayjob["spec"]["submitterPodTemplate"]["spec"])]
    for where, pod in pods:
        env = _env(pod["containers"][0])
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
        token = env.get("RAY_AUTH_TOKEN")
        assert token is not None, f"{where}: no RAY_AUTH_TOKEN"
        assert "value" not in token, f"{where}: literal RAY_AUTH_TOKEN"
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] == "auth_token"
        secret_names.add(ref["name"])
    assert secret_names == {auth.get("secretName")}, "every pod must use the Secret named in authOptions"


def test_rayjob_has_no_literal_secrets(rayjob: dict[str, Any], rayjob_text: str) -> None:
    _assert_no_aws_credentials(rayjob_text, RAYJOB.name)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
                raise AssertionError(f"{path}: env var {node['name']} has a literal value")
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(rayjob, "rayjob")
    # AWS access is by IRSA: pods that touch S3 run under a service account.
    for where, pod in _pod_specs(rayjob):
        assert pod.get("serviceAccountName"), f"{where}: no serviceAccountName (IRSA)"


def test_rayjob_runtime_env_is_yaml_without_secrets(rayjob: dict[str, Any]) -> None:
    raw = rayjob["spec"]["runtimeEnvYAML"]
    assert isinstance(raw, str), "runtimeEnvYAML must be a YAML string, not a mapping"
    runtime_env = yaml.safe_load(raw)
    assert isinstance(runtime_env, dict)
    env_vars = runtime_env.get("env_vars") or {}
    assert isinstance(env_vars, dict)
    for name, value in env_vars.items():
        assert not SECRET_NAME.search(name), f"runtimeEnvYAML env var {name} looks like a secret"
        assert isinstance(value, str), f"runtime_env env_vars values must be strings ({name}={value!r})"
        assert not AWS_KEY_ID.search(value)


def test_secret_checks_catch_a_leak(rayjob: dict[str, Any]) -> None:
    # The checks above must be able to fail: plant a secret and watch them trip.
    leaky = yaml.safe_dump({"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}})
    env = yaml.safe_load(leaky)["env_vars"]
    assert any(SECRET_NAME.search(k) for k in env)
    assert AWS_KEY_ID.search("key AKIAABCDEFGHIJKLMNOP here")
    with pytest.raises(AssertionError):
        _assert_no_aws_credentials("aws_secret_access_key: abc", "planted")
