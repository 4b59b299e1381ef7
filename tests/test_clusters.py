"""The cluster definitions in clusters/ are valid, consistent and point at real code and configs.

- `ray up` YAMLs against the cluster-config JSON schema shipped inside the ray package
  (`ray/autoscaler/ray-schema.json`) and Ray's own config validation.
- KubeRay manifests against the RayCluster / RayJob / RayService CRD schemas
  (`tests/data/kuberay-crds/`, ray.io/v1, KubeRay commit feeaf72 after v1.7.0; see SOURCE.txt),
  made strict: Kubernetes silently prunes unknown fields, so a misspelt key would vanish
  without an error on `kubectl apply`; here it fails.
- Every module, config file and path the definitions and clusters/README.md reference exists,
  and every `python -m pipelines.<stage> ...` command among them passes `--dry-run`.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
CRDS = Path(__file__).parent / "data" / "kuberay-crds"
RAY_UP = sorted((CLUSTERS / "ray-up").glob("*.yaml"))
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def _load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)


def _manifests() -> list[tuple[str, dict]]:
    """(file:kind/name, document) for every Kubernetes manifest under clusters/."""
    out = []
    for path in sorted([*CLUSTERS.glob("kuberay/*.yaml"), *CLUSTERS.glob("k8s/*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


MANIFESTS = _manifests()
KUBERAY = [(name, doc) for name, doc in MANIFESTS if doc["kind"] in KUBERAY_KINDS]


# ---------------------------------------------------------------- schema helpers
def _strict(node: Any) -> Any:
    """Forbid keys a structural schema does not list (what the API server would prune)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd(kind: str) -> dict:
    return _load(CRDS / f"ray.io_{KUBERAY_KINDS[kind]}.yaml")


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    (v1,) = [v for v in _crd(kind)["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _crd_errors(doc: dict) -> list[str]:
    errors = _crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@functools.cache
def _ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _cluster_specs(doc: dict) -> list[dict]:
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    field = key[doc["kind"]]
    return [doc["spec"] if field is None else doc["spec"][field]]


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


# ---------------------------------------------------------------- ray up
def test_crd_data_is_the_cited_kuberay_version():
    source = (CRDS / "SOURCE.txt").read_text()
    assert "feeaf72facab4881ba2b179248bb67315634e229" in source and "ray.io/v1" in source
    for kind in KUBERAY_KINDS:
        crd = _crd(kind)
        assert crd["spec"]["names"]["kind"] == kind
        assert "v1" in [v["name"] for v in crd["spec"]["versions"]]


def test_there_are_aws_and_gcp_ray_up_configs():
    providers = {_load(p)["provider"]["type"] for p in RAY_UP}
    assert {"aws", "gcp"} <= providers


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_config_matches_ray_schema(path):
    config = _load(path)
    jsonschema.validate(config, _ray_schema())
    from ray.autoscaler._private.util import prepare_config, validate_config

    # Ray's own checks beyond the schema, on the config as `ray up` fills it out.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert any("constraints.txt" in c for c in prepared["worker_setup_commands"])


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_config_scales_gpu_workers_and_installs_the_pinned_stack(path):
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 8]
    assert gpu, "an 8-GPU worker type"
    for node_type in gpu:
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        assert node_type["max_workers"] >= 1
    # The image is this Ray; setup installs the repository under constraints.txt.
    assert f"ray:{ray.__version__}-" in config["docker"]["image"]
    assert config["file_mounts"]["/home/ray/dcm"] == "."
    setup = " ".join(config["setup_commands"])
    assert "-c /home/ray/dcm/constraints.txt" in setup and "-e /home/ray/dcm" in setup
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert f"ray=={ray.__version__}" in pins and any(p.startswith("torch==") for p in pins)
    # Ray 2.60 token auth on every node, with the token file shipped to each of them.
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[key])
    # MLflow with a SQL backend on the head, reachable under the same name as on Kubernetes.
    assert "--backend-store-uri sqlite:" in " ".join(config["head_start_ray_commands"])


# ---------------------------------------------------------------- KubeRay
def test_kuberay_has_a_cluster_a_job_and_a_service():
    assert {doc["kind"] for _, doc in KUBERAY} == set(KUBERAY_KINDS)


@pytest.mark.parametrize("doc", [d for _, d in KUBERAY], ids=[n for n, _ in KUBERAY])
def test_kuberay_manifest_matches_crd_schema(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert _crd_errors(doc) == []


def test_strict_crd_validation_catches_misspelt_and_bad_values():
    (doc,) = [d for _, d in KUBERAY if d["kind"] == "RayCluster"]
    typo = copy.deepcopy(doc)
    group = typo["spec"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")
    errors = _crd_errors(typo)
    assert any("maxReplica" in e for e in errors), errors
    bad_auth = copy.deepcopy(doc)
    bad_auth["spec"]["authOptions"]["mode"] = "password"
    assert any("authOptions" in e for e in _crd_errors(bad_auth))


@pytest.mark.parametrize("doc", [d for _, d in KUBERAY], ids=[n for n, _ in KUBERAY])
def test_kuberay_clusters_use_this_ray_token_auth_and_one_image(doc):
    images = set()
    for spec in _cluster_specs(doc):
        assert spec["rayVersion"] == ray.__version__
        assert spec["authOptions"] == {"mode": "token", "secretName": "dcm-ray-auth"}
        head_pod, *worker_pods = _pod_specs(spec)
        head = head_pod["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "CPU head"
        assert any(
            int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
            for pod in worker_pods
        ), "a GPU worker group"
        for pod in (head_pod, *worker_pods):
            images |= {c["image"] for c in pod["containers"]}
            mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert "/mnt/dcm" in mounts, "shared storage for checkpoints"
    assert len(images) == 1


def test_raycluster_autoscales_its_gpu_group():
    (doc,) = [d for _, d in KUBERAY if d["kind"] == "RayCluster"]
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]


def test_rayjob_runs_distill_with_the_shared_runtime_env():
    (doc,) = [d for _, d in KUBERAY if d["kind"] == "RayJob"]
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m pipelines.distill ")
    assert spec["shutdownAfterJobFinishes"] is True
    job_env = yaml.safe_load(spec["runtimeEnvYAML"])
    shared = _load(CLUSTERS / "runtime_env.yaml")
    assert job_env["env_vars"] == shared["env_vars"]
    assert "working_dir" not in job_env, "the image already holds the package"


def test_rayservice_runs_the_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs

    (doc,) = [d for _, d in KUBERAY if d["kind"] == "RayService"]
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    local = _load(ROOT / "serve" / "config.yaml")

    def apps(config: dict) -> dict:
        return {a["name"]: a for a in config["applications"]}

    assert apps(served).keys() == apps(local).keys()
    for name, app in apps(served).items():
        mine = apps(local)[name]
        assert (app["import_path"], app["route_prefix"]) == (
            mine["import_path"],
            mine["route_prefix"],
        )
        deployments = {d["name"] for d in app.get("deployments", [])}
        assert deployments <= {d["name"] for d in mine.get("deployments", [])}
        # The builder accepts these args and they resolve into a valid dcm config.
        cfg = AppArgs.parse(app["args"]).resolve()
        assert cfg.model.path == app["args"]["model"] and cfg.model.backbone == "wan"
        assert cfg.serve.replica_gpus >= 1 and cfg.serve.max_replicas > 1


def test_plain_manifests_reference_what_exists():
    """Claims, services and secrets: every reference has a definition or a README command."""
    claims = {d["metadata"]["name"] for _, d in MANIFESTS if d["kind"] == "PersistentVolumeClaim"}
    readme = (CLUSTERS / "README.md").read_text()
    pods = []
    for _, doc in MANIFESTS:
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
            assert (
                doc["spec"]["selector"]["matchLabels"].items()
                <= template["metadata"]["labels"].items()
            )
            pods.append((template["metadata"]["labels"], template["spec"]))
        elif doc["kind"] in KUBERAY_KINDS:
            pods += [({}, p) for s in _cluster_specs(doc) for p in _pod_specs(s)]
            for spec in _cluster_specs(doc):
                assert f"secret generic {spec['authOptions']['secretName']} " in readme
    for _, pod in pods:
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert f"secret generic {ref['name']} --from-literal={ref['key']}=" in readme
    for _, svc in MANIFESTS:
        if svc["kind"] != "Service":
            continue
        (labels, pod) = next(
            (lab, p) for lab, p in pods if svc["spec"]["selector"].items() <= lab.items()
        )
        ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def test_mlflow_server_has_a_sql_backend_and_a_service():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in MANIFESTS}
    server = docs[("Deployment", "dcm-mlflow")]["spec"]["template"]["spec"]["containers"][0]
    assert '--backend-store-uri "postgresql://' in " ".join(server["args"])
    assert ("Service", "dcm-mlflow") in docs and ("Service", "dcm-mlflow-db") in docs


# ---------------------------------------------------------------- references and dry runs
def _readme_commands() -> list[str]:
    """Shell lines of clusters/README.md's code blocks, continuation lines joined."""
    text = (CLUSTERS / "README.md").read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        lines += [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    return lines


def _stage_commands() -> list[tuple[str, list[str]]]:
    """(source, argv after `python -m`) of every stage command in the definitions and README."""
    found = []
    (job,) = [d for _, d in KUBERAY if d["kind"] == "RayJob"]
    sources = [("rayjob entrypoint", job["spec"]["entrypoint"])]
    sources += [("README", line) for line in _readme_commands()]
    for where, line in sources:
        for match in re.finditer(r"python -m (pipelines\.\S+.*)", line):
            tokens = shlex.split(match.group(1), comments=True)
            cut = next(
                (i for i, t in enumerate(tokens) if t in ("&&", "||", ";", "|")), len(tokens)
            )
            found.append((where, tokens[:cut]))
    return found


STAGE_COMMANDS = _stage_commands()


def test_definitions_reference_existing_files():
    text = "\n".join(
        [(CLUSTERS / "README.md").read_text()] + [p.read_text() for p in CLUSTERS.rglob("*.yaml")]
    )
    refs = set(
        re.findall(
            r"(?<![\w/.])((?:clusters|pipelines/configs|serve|tests)/[\w./-]+\.(?:yaml|py|md|txt|html))",
            text,
        )
    )
    refs |= {"constraints.txt", "clusters/Dockerfile"}
    missing = sorted(r for r in refs if not (ROOT / r).is_file())
    assert not missing, f"referenced but missing: {missing}"
    assert len(STAGE_COMMANDS) >= 3  # the RayJob's distill + README distill and sweep


@pytest.mark.parametrize(
    "argv",
    [c for _, c in STAGE_COMMANDS],
    ids=[f"{w}:{' '.join(c)[:60]}" for w, c in STAGE_COMMANDS],
)
def test_stage_command_passes_dry_run(argv, capsys):
    from pipelines.cli import main

    module, *args = argv
    path = ROOT / module.replace(".", "/")
    # `python -m` runs a module file or a package's __main__.py
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module
    if "--config" in args:
        assert (ROOT / args[args.index("--config") + 1]).is_file()
    if args[:1] == ["report"]:  # `sweep report RUN_DIR` reads results, it has no dry run
        return
    stage = module.split(".", 1)[1]
    try:  # resolve() exits after printing; a stage that checks more returns instead
        code = main([stage, *args, "--dry-run"])
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    resolved = yaml.safe_load(out.out)
    for item in (args[i + 1] for i, a in enumerate(args) if a == "--set"):
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        assert resolved[section][field] == yaml.safe_load(value), item
