"""infra/: every manifest parses and has what its controller needs, and every entrypoint it names exists.

No Docker engine or Kubernetes API is available here, so the checks are static: the Ray cluster launcher
config is validated against Ray's own JSON schema (ray/autoscaler/ray-schema.json), the KubeRay and
Kubernetes objects are checked field by field for what the RayCluster/RayJob/CronJob controllers read,
the CronJob's shell script is checked with `bash -n`, and the Dockerfile's instructions are parsed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g5g|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e)\.")


def load_all(path: Path) -> list[dict]:
    """Return the YAML documents of ``path`` (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def constraint(package: str) -> str:
    """Return the version constraints.txt pins for ``package``."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def pod_containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def gpus(container: dict) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


def test_every_yaml_file_in_infra_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert {p.name for p in files} >= {"ray-cluster-aws.yaml", "raycluster.yaml", "rayjob-reindex.yaml",
                                       "cronjob-reindex.yaml", "kustomization.yaml"}
    for path in files:
        for doc in load_all(path):
            assert isinstance(doc, dict), path
            if path.parent == K8S and path.name != "kustomization.yaml":
                assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a Kubernetes object needs both"
                assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), path


def test_cluster_launcher_config_is_valid_for_ray():
    import jsonschema
    import ray

    cfg = load_all(INFRA / "ray-cluster-aws.yaml")[0]
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [name for name, t in types.items() if GPU_INSTANCE.match(t["node_config"]["InstanceType"])]
    assert gpu_types and all(name != cfg["head_node_type"] for name in gpu_types)
    for name in gpu_types:
        assert types[name]["max_workers"] >= 1 and types[name]["max_workers"] <= cfg["max_workers"]
    assert cfg["setup_commands"] and all(isinstance(c, str) and c.strip() for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
    assert cfg["docker"]["image"] == image_of_k8s()


def image_of_k8s() -> str:
    job = one(load_all(K8S / "rayjob-reindex.yaml"), "RayJob")
    return pod_containers(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]["image"]


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """Assert what the KubeRay operator needs of a RayCluster spec, with GPU workers."""
    assert spec["rayVersion"] == constraint("ray"), f"{where}: rayVersion must match the image's Ray"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and pod_containers(head["template"])[0]["image"] == image_of_k8s()
    ports = {p["containerPort"] for p in pod_containers(head["template"])[0].get("ports", [])}
    assert {6379, 8265} <= ports, f"{where}: the head exposes GCS and the dashboard (RayJob submits through it)"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    gpu_groups = [g for g in groups if any(gpus(c) >= 1 for c in pod_containers(g["template"]))]
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    for g in groups:
        assert "rayStartParams" in g
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        for c in pod_containers(g["template"]):
            assert c["image"] == image_of_k8s()
            req = (c.get("resources") or {}).get("requests") or {}
            assert int(req.get("nvidia.com/gpu", 0)) == gpus(c), "GPU requests must equal limits"
    for g in gpu_groups:
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)


def test_raycluster_has_a_head_and_gpu_workers():
    cluster = one(load_all(K8S / "raycluster.yaml"), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")


def test_rayjob_runs_the_reindex_entrypoint_with_a_valid_config(monkeypatch):
    job = one(load_all(K8S / "rayjob-reindex.yaml"), "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["generateName"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob-reindex.yaml")
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.reindex"]
    assert importlib.util.find_spec(argv[2]) is not None
    from jobs.reindex import build_parser

    args = build_parser().parse_args(argv[3:])
    config = REPO / args.config  # relative to the image's WORKDIR, a copy of the repository root
    assert config.is_file(), f"the RayJob names {args.config}, which does not exist"
    # The config's ${VAR}s are provided by the RayJob's runtime env.
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    for key in [k for k in os.environ if k.startswith("ICAR_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    from pipeline.reindex.jobconfig import load_job_config

    cfg = load_job_config(str(config))
    assert cfg.ray.address == "auto" and cfg.model.device == "cuda"
    assert cfg.root.startswith("s3://") and all(i.startswith("s3://") for i in cfg.inputs)


def test_cronjob_submits_the_rayjob_nightly(tmp_path, monkeypatch):
    docs = load_all(K8S / "cronjob-reindex.yaml")
    cron = one(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    from pipeline.reindex.jobconfig import check_cron, load_job_config

    assert check_cron(spec["schedule"]) is None
    assert spec["concurrencyPolicy"] == "Forbid"
    monkeypatch.setenv("ICAR_BUCKET", "bkt")
    job_cfg = load_job_config(str(REPO / "jobs" / "examples" / "s3-cluster.yaml"))
    assert spec["schedule"] == job_cfg.schedule.cron, "the CronJob and the job config disagree on the schedule"

    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    container = pod["containers"][0]
    script = "\n".join(container.get("args", []))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] in mounts)
    created = re.search(r"kubectl create -f (\S+)", script)
    assert created, "the CronJob must create the RayJob"
    manifest = Path(created.group(1))
    assert str(manifest.parent) == mounts[volume["name"]]
    # The mounted ConfigMap is generated from rayjob-reindex.yaml by the kustomization.
    kust = load_all(K8S / "kustomization.yaml")[0]
    for resource in kust["resources"]:
        assert (K8S / resource).is_file()
    generator = next(g for g in kust["configMapGenerator"] if g["name"] == volume["configMap"]["name"])
    assert manifest.name in generator["files"]
    assert one(load_all(K8S / manifest.name), "RayJob")["metadata"]["labels"]["app.kubernetes.io/name"] in script
    # The script is valid bash, and the pod may do what it does.
    path = tmp_path / "submit.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    account = pod["serviceAccountName"]
    assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == account for d in docs)
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and
                   any(s["name"] == account for s in d["subjects"]))
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == binding["roleRef"]["name"])
    verbs = {v for rule in role["rules"] if "rayjobs" in rule["resources"] and "ray.io" in rule["apiGroups"]
             for v in rule["verbs"]}
    assert {"create", "get", "list", "delete"} <= verbs


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in (INFRA / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def test_dockerfile_installs_the_package_with_a_cuda_torch():
    steps = dockerfile_instructions()
    assert steps[0][0] == "FROM" or steps[0][0] == "ARG"
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in steps if k == "ARG" and "=" in a}
    expand = lambda s: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)
    runs = [expand(a) for k, a in steps if k == "RUN"]
    torch_run = next(r for r in runs if "torch==" in r and "pip install" in r)
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+", torch_run), torch_run
    assert f"torch=={constraint('torch')}" in torch_run
    package_run = next(r for r in runs if re.search(r"pip install .*-c constraints\.txt \.( |$)", r))
    assert "ray[default" in package_run, "KubeRay submits jobs through the dashboard: ray[default] is needed"
    assert runs.index(torch_run) < runs.index(package_run), "torch must be installed before the package"
    copies = [a.split() for k, a in steps if k == "COPY"]
    copied = {src for c in copies for src in c[:-1] if not src.startswith("--")}
    assert {"pipeline", "jobs", "pyproject.toml", "constraints.txt"} <= copied
    for src in copied:
        assert (REPO / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
    workdir = [a for k, a in steps if k == "WORKDIR"]
    assert workdir and workdir[-1] == "/app", "RayJob entrypoints run `python -m jobs.*` from the image's WORKDIR"
    assert any(k == "USER" for k, _ in steps)


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "jobs" / "examples").glob("*.yaml")))
def test_example_configs_dry_run_their_parser(example, monkeypatch):
    from jobs.reindex import build_parser
    from pipeline.reindex.jobconfig import load_job_config

    monkeypatch.setenv("ICAR_BUCKET", "bkt")
    path = str(REPO / "jobs" / "examples" / example)
    assert build_parser().parse_args(["--config", path, "--check-config"]).check_config
    assert load_job_config(path).name
