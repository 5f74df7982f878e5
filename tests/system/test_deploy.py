"""The deployment files: KubeRay manifests and kustomize overlays, the cluster launcher, the Dockerfile and the
runtime env all parse, carry the fields their kinds require, point at entrypoints that exist, and hold configs
that dermray's own loader accepts; no credentials anywhere."""
import pathlib
import re
import shutil
import subprocess

import pytest
import ray
import yaml

from dermray.runtime.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CLUSTER = REPO / "cluster"
OVERLAYS = ["dev", "prod"]


def kustomize(path: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: kustomize overlays not built")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def every_manifest() -> list[pathlib.Path]:
    return sorted(K8S.rglob("*.yaml"))


@pytest.mark.parametrize("path", every_manifest(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_yaml_file_in_k8s_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, path
    for d in docs:
        assert isinstance(d, dict)
        if "kind" in d and d["kind"] not in ("Kustomization", "Component"):
            assert d.get("apiVersion") and d.get("metadata", {}).get("name") or d["metadata"].get("generateName")


def _cluster_spec_ok(spec: dict, where: str) -> list[str]:
    """The RayCluster fields KubeRay needs, and dermray's rules: head does no work, GPU workers autoscale."""
    assert spec["rayVersion"] == ray.__version__, where
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token authentication"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head does no work"
    images = [c["image"] for c in head["template"]["spec"]["containers"]]
    assert head["template"]["spec"]["serviceAccountName"] == "dermray-head"  # the autoscaler's (test_k8s_policy)
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu, f"{where}: a GPU worker group"
    g = gpu[0]
    assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and spec.get("enableInTreeAutoscaling") is True
    assert g["template"]["spec"]["serviceAccountName"] == "dermray-worker"
    for c in g["template"]["spec"]["containers"]:
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        images.append(c["image"])
    tol = g["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tol)
    return images


# the entrypoint wrapper (deadline, logs, the night's guard: test_kuberay.py, test_k8s_policy.py)
WRAPPER = re.compile(r"python /etc/dermray-entrypoint/entrypoint\.py (--[a-z-]+ (\d+ )?)*-- ")


def _entrypoint_ok(entrypoint: str, configs: dict[str, str], tmp_path) -> None:
    wrapper = WRAPPER.match(entrypoint)
    assert wrapper, f"{entrypoint}: not run through the entrypoint wrapper (deadline, logs)"
    command = entrypoint[wrapper.end():]
    m = re.fullmatch(r"python /app/(jobs/\w+\.py) --config /etc/dermray/(\S+)", command)
    assert m, entrypoint
    assert (REPO / m.group(1)).exists(), f"{entrypoint}: {m.group(1)} does not exist"
    assert m.group(2) in configs, f"{entrypoint}: {m.group(2)} is not in the ConfigMap mounted at /etc/dermray"
    f = tmp_path / m.group(2)
    f.write_text(configs[m.group(2)])
    load_config(str(f))  # raises on an unknown or mistyped key


def _cleans_up(spec: dict) -> bool:
    """A finished RayJob's cluster goes: shutdownAfterJobFinishes, or deletion rules deleting it on both outcomes."""
    if spec.get("shutdownAfterJobFinishes") is True:
        return spec.get("ttlSecondsAfterFinished", 0) > 0
    rules = spec.get("deletionStrategy", {}).get("deletionRules", [])
    gone = {r["condition"].get("jobStatus") for r in rules if r["policy"] in ("DeleteCluster", "DeleteSelf")}
    return {"SUCCEEDED", "FAILED"} <= gone and any(r["condition"].get("jobDeploymentStatus") == "Failed" for r in rules)


def _mounted_config(docs, template_spec: dict) -> dict[str, str]:
    mount = next(m for m in template_spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/dermray")
    name = next(v for v in template_spec["volumes"] if v["name"] == mount["name"])["configMap"]["name"]
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_build_and_carry_what_kuberay_needs(overlay, tmp_path):
    standing, training = kustomize(f"overlays/{overlay}"), kustomize(f"overlays/{overlay}/train")
    namespace = "dermray-dev" if overlay == "dev" else "dermray"
    by_kind: dict[str, list[dict]] = {}
    for d in standing + training:
        by_kind.setdefault(d["kind"], []).append(d)
        if d["kind"] == "Namespace":  # cluster-scoped: the overlay's namespace itself
            assert d["metadata"]["name"] == namespace
        else:
            assert d["metadata"].get("namespace") == namespace, d["kind"]
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "dermray", d["kind"]
    for cm in by_kind["ConfigMap"]:
        for key, text in cm["data"].items():
            if key.endswith(".yaml"):
                (tmp_path / "c.yaml").write_text(text)
                load_config(str(tmp_path / "c.yaml"))
    for name in ("dermray-head", "dermray-worker"):
        sa = next(s for s in by_kind["ServiceAccount"] if s["metadata"]["name"] == name)
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    (cluster,) = by_kind["RayCluster"]
    images = _cluster_spec_ok(cluster["spec"], "RayCluster")
    # Training: the training kustomization holds the RayJob and its configs, nothing standing.
    (train,) = by_kind["RayJob"]
    assert train in training and {d["kind"] for d in training} == {"RayJob", "ConfigMap"}
    spec = train["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    configs = _mounted_config(training, spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])
    _entrypoint_ok(spec["entrypoint"], configs, tmp_path)
    images += _cluster_spec_ok(spec["rayClusterSpec"], "RayJob train")
    # The nightly: one spec (the RayCronJob's jobTemplate, never scheduled by KubeRay) and the CronJob launching it.
    (cron,) = by_kind["RayCronJob"]
    assert cron["apiVersion"] == "ray.io/v1" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["suspend"] is True and cron["spec"]["jobTemplate"]["suspend"] is True
    (launcher,) = by_kind["CronJob"]
    assert launcher["spec"]["concurrencyPolicy"] == "Forbid" and launcher["spec"]["startingDeadlineSeconds"] > 0
    pod = launcher["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "dermray-launcher" and pod["restartPolicy"] == "Never"
    cm_name = pod["volumes"][0]["configMap"]["name"]
    holder = next(c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == cm_name)
    (name,) = holder["data"]
    assert pod["containers"][0]["command"][-1].endswith("/" + name)
    images.append(pod["containers"][0]["image"])
    role = next(r for r in by_kind["Role"] if r["metadata"]["name"] == "dermray-launcher")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]},
        {"apiGroups": ["ray.io"], "resources": ["raycronjobs"], "resourceNames": [cron["metadata"]["name"]],
         "verbs": ["get"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["dermray-nightly"],
         "verbs": ["get", "update"]}]
    nightly = cron["spec"]["jobTemplate"]
    assert _cleans_up(nightly) and 0 < nightly["activeDeadlineSeconds"] < 24 * 3600
    assert "jobs/nightly_score.py" in nightly["entrypoint"]
    configs = _mounted_config(standing, nightly["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])
    _entrypoint_ok(nightly["entrypoint"], configs, tmp_path)
    images += _cluster_spec_ok(nightly["rayClusterSpec"], "nightly RayJob")
    assert len(set(images)) == 1, f"pods run different images: {set(images)}"
    assert images[0].split(":")[-1].split()[0] == _dockerfile_tag_hint()


def _dockerfile_tag_hint() -> str:
    """The image tag that cluster/aws-gpu.yaml and the manifests use."""
    launcher = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    return launcher["docker"]["image"].split(":")[-1]


def test_no_credentials_in_deployment_files():
    pattern = re.compile(r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|aws_secret|AKIA[0-9A-Z]{16}"
                         r"|RAY_AUTH_TOKEN\s*[:=]\s*\S"
                         r"|auth_token\s*[:=]\s*['\"][0-9a-f]{16,})")
    for path in list(K8S.rglob("*")) + list(CLUSTER.rglob("*")):
        if path.is_file():
            hits = pattern.findall(path.read_text())
            assert not hits, f"{path}: {hits}"


def test_cluster_launcher_runtime_env_and_dockerfile():
    launcher = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in launcher
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = types["gpu_workers"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    for t in types.values():
        assert "IamInstanceProfile" in t["node_config"]
    assert all("RAY_AUTH_MODE=token" in c for c in launcher["head_start_ray_commands"] + launcher[
        "worker_start_ray_commands"] if c.startswith("RAY_"))
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert {".git", ".venv", "outputs", "data"} <= set(env["excludes"])
    assert env["working_dir"] == "."
    docker_from = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert docker_from.startswith(f"rayproject/ray:{ray.__version__}-")
    for path in ("local-up.sh", "local-down.sh"):
        out = subprocess.run(["bash", "-n", str(CLUSTER / path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
