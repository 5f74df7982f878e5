"""The KubeRay manifests against the controllers that run them (issue 31): one nightly per night, a training run that
survives its log stream, least privilege, restricted pods, and what keeps a platform engineer's namespace in order.

Read for these tests (the sources whose behaviour is simulated or checked here):
- KubeRay v1.7.0 (ray-project/kuberay tag v1.7.0, ray-operator/controllers/ray/): raycronjob_controller.go
  (Reconcile: LastScheduleTime set to the schedule just served, one RayJob per reconcile, getRayJobName
  <cronjob>-<unix minutes>; the status update triggers the next reconcile), rayjob_controller.go
  (initRayJobStatusIfNeed: StartTime reset on every attempt; checkActiveDeadlineAndUpdateStatusIfNeeded only marks
  the RayJob Failed; checkBackoffLimitAndUpdateStatusIfNeeded; checkSubmitterFinishedTimeoutAndUpdateStatusIfNeeded:
  30 s after the submitter ends; reconcileHTTPModeJobNotFound; handleShutdownAfterJobFinishes),
  common/pod.go (DefaultHeadPodTemplate, DefaultWorkerPodTemplate's wait-gcs-ready init container, BuildPod's
  /dev/shm and /tmp/ray emptyDirs, BuildAutoscalerContainer, mergeAutoscalerOverrides, labelPod,
  SetContainerTokenAuthEnvVars), common/rbac.go (BuildRole, BuildRoleBinding: the head's ServiceAccount),
  common/job.go (GetSubmitterTemplate), utils/validation.go (ValidateRayJobSpec: suspend needs
  shutdownAfterJobFinishes; ValidateRayCronJobSpec), raycluster_controller.go (createAuthSecret: Secret
  <cluster>, key auth_token), pkg/features/features.go (RayCronJob, RayClusterNetworkPolicy, RayClusterMTLS: alpha).
- Kubernetes pkg/controller/cronjob: utils.go (mostRecentScheduleTime: the most recent missed schedule only, not
  before now - startingDeadlineSeconds), cronjob_controllerv2.go (syncCronJob: MissSchedule when too late,
  concurrencyPolicy Forbid against the CronJob's active Jobs, a Job made with `kubectl create job --from` is owned
  by the CronJob and counts as active).
- The Pod Security Standards, `restricted` level (kubernetes.io/docs/concepts/security/pod-security-standards).
"""
import copy
import datetime as dt
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from test_kuberay import (
    CRD_DIR,
    ENTRYPOINT,
    K8S,
    LAUNCHER,
    OVERLAYS,
    _load,
    cluster_specs,
    one,
    quantity,
    render,
    render_dir,
    render_standing,
    render_training,
    validate,
)

REPO = K8S.parent
KUBERAY_PAGE = REPO / "docs" / "kuberay.md"
UTC = dt.timezone.utc


@functools.lru_cache(maxsize=None)
def script(path: pathlib.Path):
    """A script under k8s/ loaded as a module (once)."""
    return _load(path, path.stem)


# ---------------------------------------------------------------------------------------------------------------
# The pods KubeRay creates from a cluster spec (KubeRay v1.7.0, common/pod.go and common/job.go)

def _env_token(cluster: str) -> list[dict]:  # SetContainerTokenAuthEnvVars; the Secret: createAuthSecret
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": cluster, "key": "auth_token"}}}]


def _empty_dir(spec: dict, container: dict, name: str, path: str, medium: str | None) -> None:
    """addEmptyDir: mounted unless the container already mounts that path; a memory one sized to the limit."""
    if any(m["mountPath"] == path for m in container.get("volumeMounts", [])):
        return
    if not any(v["name"] == name for v in spec.get("volumes", [])):
        src = {"medium": medium, "sizeLimit": container["resources"]["limits"]["memory"]} if medium else {}
        spec.setdefault("volumes", []).append({"name": name, "emptyDir": src})
    container.setdefault("volumeMounts", []).append({"name": name, "mountPath": path})


def _pod(name: str, ns: str, template: dict, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                         "annotations": dict(template.get("metadata", {}).get("annotations", {}))},
            "spec": template["spec"]}


def _labels(template: dict, cluster: str, node_type: str, group: str) -> dict:  # labelPod
    fixed = {"ray.io/node-type": node_type, "ray.io/group": group, "ray.io/cluster": cluster}
    out = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
           "app.kubernetes.io/created-by": "kuberay-operator", **fixed}
    out.update({k: v for k, v in template.get("metadata", {}).get("labels", {}).items() if k not in fixed})
    return out


def kuberay_pods(obj: dict) -> list[tuple[str, dict]]:
    """The Pods KubeRay would create for a RayCluster, RayJob or RayCronJob template: the head with its autoscaler
    sidecar, a worker of each group with its wait-gcs-ready init container, and (K8sJobMode) the submitter."""
    ns, name, out = obj["metadata"].get("namespace", "default"), obj["metadata"]["name"], []
    for where, cs in cluster_specs(obj):
        cluster = name if obj["kind"] == "RayCluster" else f"{name}-k2x7p"  # GenerateRayClusterName: <name>-<rand>
        token = _env_token(cluster) if cs.get("authOptions", {}).get("mode") == "token" else []
        head = copy.deepcopy(cs["headGroupSpec"]["template"])
        spec, ray = head["spec"], head["spec"]["containers"][0]
        ray["env"] = ray.get("env", []) + token
        _empty_dir(spec, ray, "shared-mem", "/dev/shm", "Memory")
        if cs.get("enableInTreeAutoscaling"):
            spec["serviceAccountName"] = spec.get("serviceAccountName") or cluster  # GetHeadGroupServiceAccountName
            opts = cs.get("autoscalerOptions", {})
            scaler = {"name": "autoscaler", "image": opts.get("image", ray["image"]),
                      "imagePullPolicy": opts.get("imagePullPolicy", "IfNotPresent"),
                      "command": ["/bin/bash", "-c", "--"], "args": ["ray kuberay-autoscaler ..."],
                      "env": [{"name": "RAY_CLUSTER_NAMESPACE", "valueFrom": {"fieldRef": {
                          "fieldPath": "metadata.namespace"}}}] + opts.get("env", []) + token,
                      "resources": opts.get("resources", {"requests": {"cpu": "500m", "memory": "512Mi"},
                                                          "limits": {"cpu": "500m", "memory": "512Mi"}}),
                      "volumeMounts": list(opts.get("volumeMounts", []))}
            if "securityContext" in opts:
                scaler["securityContext"] = opts["securityContext"]
            spec["containers"].append(scaler)
            _empty_dir(spec, ray, "ray-logs", "/tmp/ray", None)
            _empty_dir(spec, scaler, "ray-logs", "/tmp/ray", None)
        out.append((f"{obj['kind']} {name} {where}.head",
                    _pod(f"{cluster}-head", ns, head, _labels(head, cluster, "head", "headgroup"))))
        for g in cs.get("workerGroupSpecs", []):
            w = copy.deepcopy(g["template"])
            spec, ray = w["spec"], w["spec"]["containers"][0]
            init = {"name": "wait-gcs-ready", "image": ray["image"], "command": ["/bin/bash", "-lc", "--"],
                    "args": ["ray health-check ..."], "env": copy.deepcopy(ray.get("env", [])),
                    "volumeMounts": copy.deepcopy(ray.get("volumeMounts", [])),
                    "resources": {"requests": {"cpu": "200m", "memory": "256Mi"},
                                  "limits": {"cpu": "200m", "memory": "256Mi"}}}
            for key in ("imagePullPolicy", "securityContext"):
                if key in ray:
                    init[key] = copy.deepcopy(ray[key])
            spec["initContainers"] = spec.get("initContainers", []) + [init]
            ray["env"] = ray.get("env", []) + token
            _empty_dir(spec, ray, "shared-mem", "/dev/shm", "Memory")
            out.append((f"{obj['kind']} {name} {where}.workerGroupSpecs[{g['groupName']}]",
                        _pod(f"{cluster}-{g['groupName']}-worker", ns, w,
                             _labels(w, cluster, "worker", g["groupName"]))))
        job = obj["spec"] if obj["kind"] == "RayJob" else obj["spec"].get("jobTemplate")
        if job is not None and job.get("submissionMode", "K8sJobMode") == "K8sJobMode":  # GetSubmitterTemplate
            sub = copy.deepcopy(job.get("submitterPodTemplate")) or {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "ray-job-submitter", "image": cs["headGroupSpec"]["template"]["spec"]["containers"][0][
                    "image"], "resources": {"limits": {"cpu": "1", "memory": "1Gi"},
                                            "requests": {"cpu": "500m", "memory": "200Mi"}}}]}}
            out.append((f"{obj['kind']} {name} submitter", _pod(f"{name}-submitter", ns, sub,
                                                                  sub.get("metadata", {}).get("labels", {}))))
    return out


def launcher_pods(docs) -> list[tuple[str, dict]]:
    out = []
    for cj in (d for d in docs if d["kind"] == "CronJob"):
        t = copy.deepcopy(cj["spec"]["jobTemplate"]["spec"]["template"])
        out.append((f"CronJob {cj['metadata']['name']}", _pod(f"{cj['metadata']['name']}-29400000-x", cj[
            "metadata"]["namespace"], t, t["metadata"]["labels"])))
    return out


def every_pod(env: str) -> list[tuple[str, dict]]:
    docs = render(env)
    return [p for d in docs for p in kuberay_pods(d)] + launcher_pods(docs)


# ---------------------------------------------------------------------------------------------------------------
# The `restricted` Pod Security Standard

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict) -> list[str]:
    """What the `restricted` level (which includes `baseline`) rejects in a Pod, [] when admitted."""
    spec, errs = pod["spec"], []
    psc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            errs.append(f"{field}")
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            errs.append(f"volume {v['name']}: {sorted(kinds - ALLOWED_VOLUMES)}")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            errs.append(f"sysctl {s['name']}")
    if psc.get("runAsUser") == 0:
        errs.append("pod runAsUser 0")
    for key, value in pod["metadata"].get("annotations", {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value not in (
                "runtime/default", "") and not value.startswith("localhost/"):
            errs.append(f"apparmor {key}={value}")
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(kind, []):
            sc, where = c.get("securityContext", {}), f"{kind}[{c['name']}]"
            if sc.get("privileged"):
                errs.append(f"{where}: privileged")
            if sc.get("windowsOptions", {}).get("hostProcess") or psc.get("windowsOptions", {}).get("hostProcess"):
                errs.append(f"{where}: hostProcess")
            if any(p.get("hostPort") for p in c.get("ports", [])):
                errs.append(f"{where}: hostPort")
            if sc.get("procMount", "Default") != "Default":
                errs.append(f"{where}: procMount")
            se = {**psc.get("seLinuxOptions", {}), **sc.get("seLinuxOptions", {})}
            if se.get("type", "") not in ("", "container_t", "container_init_t", "container_kvm_t",
                                          "container_engine_t") or se.get("user") or se.get("role"):
                errs.append(f"{where}: seLinuxOptions")
            if sc.get("allowPrivilegeEscalation") is not False:
                errs.append(f"{where}: allowPrivilegeEscalation must be false")
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            if non_root is not True:
                errs.append(f"{where}: runAsNonRoot must be true")
            if sc.get("runAsUser") == 0:
                errs.append(f"{where}: runAsUser 0")
            seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
            if seccomp not in ("RuntimeDefault", "Localhost"):
                errs.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost, got {seccomp}")
            caps = sc.get("capabilities", {})
            if "ALL" not in caps.get("drop", []):
                errs.append(f"{where}: capabilities must drop ALL")
            if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
                errs.append(f"{where}: capabilities added {caps['add']}")
    return errs


def test_the_restricted_check_rejects_what_the_standard_rejects():
    good = {"metadata": {}, "spec": {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "v", "projected": {"sources": []}}]}}
    assert restricted_violations(good) == []
    for mutate, expect in [
        (lambda p: p["spec"]["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilege"),
        (lambda p: p["spec"]["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda p: p["spec"]["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda p: p["spec"]["containers"][0]["securityContext"].update(capabilities={}), "drop ALL"),
        (lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda p: p["spec"].update(initContainers=[{"name": "i"}]), "initContainers[i]"),
    ]:
        bad = copy.deepcopy(good)
        mutate(bad)
        assert any(expect in e for e in restricted_violations(bad)), expect


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_the_overlays_create_meets_restricted_pod_security(overlay):
    """Finding 5: the head, its autoscaler sidecar, the workers and their injected init container, the launcher -
    and a submitter pod wherever a RayJob still used K8sJobMode - as KubeRay creates them."""
    pods = every_pod(overlay)
    assert {w.split(" ")[0] for w, _ in pods} == {"RayCluster", "RayJob", "RayCronJob", "CronJob"}
    bad = {w: e for w, p in pods if (e := restricted_violations(p))}
    assert not bad, json.dumps(bad, indent=1)
    (ns,) = [d for d in render_standing(overlay) if d["kind"] == "Namespace"]  # and the namespace enforces it
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {d["metadata"]["namespace"] for d in render(overlay) if d["kind"] != "Namespace"} == {ns["metadata"]["name"]}


# ---------------------------------------------------------------------------------------------------------------
# checkov over every pod (finding 5): a maintained scanner, in a virtual environment of its own (Makefile: its pins,
# boto3 among them, conflict with dermray's)

CHECKOV = pathlib.Path(os.environ.get("DERMRAY_CHECKOV", REPO / ".venv" / "tools" / "checkov" / "bin" / "checkov"))
# The checks that fail by design, each with its reason; every other check of checkov's Kubernetes framework must pass.
ALLOWED = {
    "CKV_K8S_43": (lambda pod: True, "image by digest: the overlays set a tag (`images:`); pin a digest at release"),
    "CKV_K8S_40": (lambda pod: True, "UID >= 10000: the image's user is ray (1000), who owns its files"),
    "CKV_K8S_8": (lambda pod: True, "liveness probe: KubeRay injects the Ray containers' probes; the autoscaler "
                                    "sidecar and the launcher are processes whose exit is their failure"),
    "CKV_K8S_9": (lambda pod: True, "readiness probe: as CKV_K8S_8"),
    "CKV_K8S_22": (lambda pod: "ray.io/node-type" in pod["metadata"]["labels"],
                   "read-only root filesystem: Ray writes its session directory and the caches under the image's "
                   "HOME (not required by `restricted`); the launcher's root filesystem is read-only"),
    "CKV_K8S_35": (lambda pod: "ray.io/node-type" in pod["metadata"]["labels"],
                   "secrets as files: KubeRay 1.7 passes the Ray token as RAY_AUTH_TOKEN from the Secret"),
}


@functools.lru_cache(maxsize=None)
def _checkov(scan_dir: str) -> dict:
    out = subprocess.run([str(CHECKOV), "-d", scan_dir, "--framework", "kubernetes", "-o", "json",
                          "--skip-download"], capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    report = json.loads(out.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_passes_every_pod_and_policy(tmp_path):
    if not CHECKOV.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHECKOV} is missing: `make test` installs it (Makefile, target $(CHECKOV))")
        pytest.skip(f"checkov is not installed at {CHECKOV}: `make checkov` (its own virtual environment)")
    pods = {}
    for env in OVERLAYS:
        docs = render(env)
        scanned = [p for _, p in every_pod(env)] + [d for d in docs if d["kind"] in (
            "NetworkPolicy", "Role", "RoleBinding", "ServiceAccount", "PodDisruptionBudget", "ResourceQuota",
            "Namespace")]
        (tmp_path / f"{env}.yaml").write_text(yaml.safe_dump_all(scanned, sort_keys=False))
        pods.update({f"Pod.{p['metadata']['namespace']}.{p['metadata']['name']}": p for _, p in every_pod(env)})
    report = _checkov(str(tmp_path))
    assert report["summary"]["resource_count"] >= len(pods) and report["summary"]["passed"] > 100
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    unexpected = [(cid, res) for cid, res in failed
                  if cid not in ALLOWED or res not in pods or not ALLOWED[cid][0](pods[res])]
    assert not unexpected, unexpected
    passed = {c["check_id"] for c in report["results"]["passed_checks"]}
    assert {"CKV_K8S_20", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_37", "CKV_K8S_31", "CKV_K8S_38", "CKV2_K8S_6",
            "CKV_K8S_22"} <= passed  # privilege escalation, root, NET_RAW, capabilities, seccomp, SA token, NetPol


# ---------------------------------------------------------------------------------------------------------------
# Finding 1: the nightly replays, simulated

def _daily(schedule: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,2}) (\d{1,2}) \* \* \*", schedule)
    assert m, f"the simulation knows daily schedules only: {schedule!r}"
    return int(m.group(2)), int(m.group(1))


def next_fire(schedule: str, tz_name: str, t: dt.datetime) -> dt.datetime:
    """robfig/cron Schedule.Next for 'M H * * *' in a zone: the first fire strictly after t."""
    from zoneinfo import ZoneInfo

    hour, minute = _daily(schedule)
    local = t.astimezone(ZoneInfo(tz_name))
    fire = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if fire <= local:
        fire += dt.timedelta(days=1)
    return fire.astimezone(UTC)


def raycronjob_replay(cron: dict, created: dt.datetime, down: tuple[dt.datetime, dt.datetime],
                      until: dt.datetime) -> list[tuple[dt.datetime, dict]]:
    """The RayJobs that KubeRay v1.7.0's RayCronJob controller creates (raycronjob_controller.go Reconcile) while it
    is up (outside `down`), as (creation time, RayJob): earliest = LastScheduleTime or the creation time; if the next
    schedule after it has passed, create <cronjob>-<unix minutes> for that schedule, set LastScheduleTime to it, and
    the status update triggers the next reconcile at once."""
    spec, out = cron["spec"], []
    if spec.get("suspend"):
        return out
    last, t = created, created
    while t <= until:
        if down[0] <= t < down[1]:
            t = down[1]
            continue
        nxt = next_fire(spec["schedule"], spec.get("timeZone", "UTC"), last)
        while nxt <= t:  # back to back, one per reconcile
            job = {"metadata": {"name": f"{cron['metadata']['name']}-{int(nxt.timestamp()) // 60}"},
                   "spec": copy.deepcopy(spec["jobTemplate"])}
            out.append((t, job))
            last = nxt
            nxt = next_fire(spec["schedule"], spec.get("timeZone", "UTC"), last)
        t = nxt if not down[0] <= nxt < down[1] else down[1]
    return out


def scoring_starts(rayjob: dict, at: dt.datetime) -> bool:
    """Does a RayJob created at `at` start scoring? A suspended one creates no cluster (rayjob_controller.go:
    Initializing -> Suspending -> Suspended); otherwise its entrypoint decides, a few minutes later, on the head."""
    spec = rayjob["spec"]
    if spec.get("suspend"):
        return False
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "/etc/dermray-entrypoint/entrypoint.py"], "the nightly runs through the wrapper"
    if "--night" not in entry[:entry.index("--")]:
        return True
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "") for e in head.get("env", [])}
    return script(ENTRYPOINT).night_check(at + dt.timedelta(minutes=5), env)[0]


MON = dt.datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


def _unsuspended(cron: dict, template_too: bool) -> dict:
    c = copy.deepcopy(cron)
    c["spec"]["suspend"] = False
    if template_too:
        c["spec"]["jobTemplate"]["suspend"] = False
    return c


def test_the_raycronjob_simulation_reproduces_the_replay_of_kuberay_1_7():
    """The simulator against the issue's numbers: an active template (as prod had it) replays every missed night."""
    cron = _unsuspended(one(render_standing("prod"), "RayCronJob", "dermray-nightly"), template_too=True)
    created = MON - dt.timedelta(days=7, hours=-10)  # applied a week before, at 10:00
    jobs = raycronjob_replay(cron, created, (MON + dt.timedelta(hours=1), MON + dt.timedelta(days=2, hours=2.5)),
                             MON + dt.timedelta(days=2, hours=3))
    outage = [(t, j) for t, j in jobs if t == MON + dt.timedelta(days=2, hours=2.5)]
    assert [j["metadata"]["name"] for _, j in outage] == [
        f"dermray-nightly-{int((MON + dt.timedelta(days=d, hours=2)).timestamp()) // 60}" for d in range(3)]
    gate = raycronjob_replay(cron, created, (created, created + dt.timedelta(days=29, hours=17)),
                             created + dt.timedelta(days=29, hours=18))
    assert len(gate) == 30 and {t for t, _ in gate} == {created + dt.timedelta(days=29, hours=17)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_raycronjob_replay_starts_a_scoring(overlay):
    """Finding 1, whatever the operator does with the RayCronJob: down Monday 01:00 to Wednesday 02:30; the feature
    gate turned on 30 days after the apply, at 03:00; the template un-suspended by hand; its RayJobs too."""
    cron = one(render_standing(overlay), "RayCronJob", "dermray-nightly")
    created = MON - dt.timedelta(days=7, hours=-10)
    outage = (MON + dt.timedelta(hours=1), MON + dt.timedelta(days=2, hours=2.5))
    gate = (created, created + dt.timedelta(days=29, hours=17))
    for down in (outage, gate):
        assert raycronjob_replay(cron, created, down, down[1] + dt.timedelta(hours=1)) == []  # suspended
        for template_too, expect_objects in ((False, True), (True, True)):
            jobs = raycronjob_replay(_unsuspended(cron, template_too), created, down, down[1] + dt.timedelta(hours=1))
            assert bool(jobs) == expect_objects  # the RayJob objects appear, as KubeRay 1.7 makes them ...
            assert not [j for t, j in jobs if scoring_starts(j, t)]  # ... and none of them scores
            if CRD_DIR.is_dir():
                assert validate({"apiVersion": "ray.io/v1", "kind": "RayJob", **jobs[0][1]}) == []


def cronjob_replay(cj: dict, cron: dict, created: dt.datetime, down: tuple[dt.datetime, dt.datetime],
                   until: dt.datetime, manual: tuple[dt.datetime, ...] = (), scoring_h: float = 3.0) -> dict:
    """The nightly through the launcher CronJob: Kubernetes' CronJob controller (utils.go mostRecentScheduleTime with
    startingDeadlineSeconds, cronjob_controllerv2.go syncCronJob: too late -> MissSchedule; Forbid while a Job of the
    CronJob is active, manual ones included), the launcher's plan (stale launch, the night's name, a manual run's
    name) and its Lease (one RayJob at a time), and the entrypoint's guard in the RayJob the launcher builds from the
    template `cron`. Returns the scorings, the launcher Jobs and the controller's events."""
    lau = script(LAUNCHER)
    spec = cj["spec"]
    tz = spec["timeZone"]
    container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    window = int({e["name"]: e.get("value") for e in container["env"]}["DERMRAY_NIGHTLY_WINDOW_S"])
    deadline = spec["startingDeadlineSeconds"]
    last, jobs, scorings, events = None, [], [], []

    def active(t):
        return [j for j in jobs if j["start"] <= t < j["end"]]

    def run_job(job_name, t):
        name, scheduled, refusal = lau.plan(job_name, tz, t, window)
        holder = [s for s in scorings if s["start"] <= t < s["end"]]
        if refusal or holder:
            events.append((t, job_name, "refused", refusal or f"{holder[0]['name']} holds the slot"))
            jobs.append({"name": job_name, "start": t, "end": t + dt.timedelta(minutes=1), "ok": False})
            return
        rayjob = lau.rayjob_from(cron, name, "ns", scheduled, "n", job_name, "uid")  # what the launcher creates
        end = t + dt.timedelta(hours=scoring_h)
        if scoring_starts(rayjob, t):
            scorings.append({"name": name, "start": t + dt.timedelta(minutes=5), "end": end})
        jobs.append({"name": job_name, "start": t, "end": end, "ok": True})

    ticks = sorted({next_fire(spec["schedule"], tz, created + dt.timedelta(days=d)) for d in range(
        (until - created).days + 2)} | {down[1]} | set(manual))
    for t in (x for x in ticks if x <= until):
        for m in manual:
            if m == t:
                run_job("nightly-by-hand", t)  # kubectl creates the Job itself: no Forbid, no deadline
        if down[0] <= t < down[1]:
            continue
        earliest = max(last or created, t - dt.timedelta(seconds=deadline))  # mostRecentScheduleTime
        fire = None
        probe = next_fire(spec["schedule"], tz, earliest)
        while probe <= t:
            fire, probe = probe, next_fire(spec["schedule"], tz, probe)
        if fire is None:
            continue
        if spec["concurrencyPolicy"] == "Forbid" and active(t):
            events.append((t, fire, "JobAlreadyActive", active(t)[0]["name"]))
            continue
        run_job(f"{cj['metadata']['name']}-{int(fire.timestamp()) // 60}", t)
        last = fire
    return {"scorings": scorings, "events": events, "jobs": jobs}


def _assert_one_at_a_time(scorings):
    names = [s["name"] for s in scorings]
    assert len(names) == len(set(names)), names  # at most one scoring per night
    spans = sorted((s["start"], s["end"]) for s in scorings)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # never two at once


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_launcher_cronjob_scores_each_night_at_most_once_and_never_two_at_once(overlay):
    docs = render_standing(overlay)
    cj, cron = one(docs, "CronJob", "dermray-nightly"), one(docs, "RayCronJob", "dermray-nightly")
    created = MON - dt.timedelta(days=7, hours=-10)
    # the controller (kube-controller-manager) down Monday 01:00 to Wednesday 02:30: Wednesday's night only
    r = cronjob_replay(cj, cron, created, (MON + dt.timedelta(hours=1), MON + dt.timedelta(days=2, hours=2.5)),
                       MON + dt.timedelta(days=3))
    _assert_one_at_a_time(r["scorings"])
    days = {s["name"] for s in r["scorings"] if s["start"] >= MON}
    assert days == {f"dermray-nightly-{MON + dt.timedelta(days=2):%Y%m%d}"}
    # 30 nights' worth of schedules pending at once (created 30 days before the controller first runs, at 03:00)
    late = cronjob_replay(cj, cron, created, (created, created + dt.timedelta(days=29, hours=17)),
                          created + dt.timedelta(days=32))
    _assert_one_at_a_time(late["scorings"])
    assert len(late["scorings"]) == 2  # the two nights after it, each once; none of the 30 missed ones
    # by hand at 01:00, before the night: a run under its own name; the night still runs once it has ended ...
    tue = MON + dt.timedelta(days=1)
    hand = cronjob_replay(cj, cron, created, (created, created), tue + dt.timedelta(hours=12),
                          manual=(tue + dt.timedelta(hours=1),), scoring_h=0.5)
    _assert_one_at_a_time(hand["scorings"])
    assert {s["name"] for s in hand["scorings"] if s["start"] >= tue} == {
        f"dermray-nightly-manual-{tue:%Y%m%d}0100", f"dermray-nightly-{tue:%Y%m%d}"}
    # ... and a manual run still going at 02:00 keeps the night from starting, visibly (never under its name)
    long = cronjob_replay(cj, cron, created, (created, created), tue + dt.timedelta(hours=12),
                          manual=(tue + dt.timedelta(hours=1),), scoring_h=3)
    _assert_one_at_a_time(long["scorings"])
    assert {s["name"] for s in long["scorings"] if s["start"] >= tue} == {f"dermray-nightly-manual-{tue:%Y%m%d}0100"}
    assert [e[2] for e in long["events"] if e[0] >= tue] == ["JobAlreadyActive"]


def test_a_skipped_or_failed_night_is_never_a_success(tmp_path):
    """Finding 8: the entrypoint refuses with 4 (the RayJob fails), the launcher exits with the night's outcome, and
    the CronJob's Job fails at once on those (podFailurePolicy) instead of retrying."""
    e = script(ENTRYPOINT)
    assert e.REFUSED == 4 and e.DEADLINE == 124
    lau = script(LAUNCHER)
    assert (lau.NIGHT_FAILED, lau.REFUSED) == (3, 4)
    for env in OVERLAYS:
        cj = one(render_standing(env), "CronJob", "dermray-nightly")
        rules = cj["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
        fail = next(r for r in rules if r["action"] == "FailJob")["onExitCodes"]
        assert {lau.NIGHT_FAILED, lau.REFUSED, lau.BAD_SETTING} <= set(fail["values"])
        assert lau.API_ERROR not in fail["values"]  # an API error runs the pod again


# ---------------------------------------------------------------------------------------------------------------
# Findings 2 and 3: submission, deadlines, logs

def _ray_jobs(env: str) -> list[tuple[str, dict]]:
    """Every RayJob spec an environment runs: the training RayJob and the nightly template."""
    out = []
    for d in render(env):
        if d["kind"] == "RayJob":
            out.append((f"RayJob {d['metadata']['name']}", d["spec"]))
        elif d["kind"] == "RayCronJob":
            out.append((f"RayCronJob {d['metadata']['name']}", d["spec"]["jobTemplate"]))
    return out


def _wrapper_deadline(spec: dict) -> float:
    entry = spec["entrypoint"].split()
    opts = entry[:entry.index("--")]
    return float(opts[opts.index("--deadline-s") + 1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_jobs_survive_a_dropped_log_stream_and_their_deadlines_stop_the_work(overlay):
    """Findings 2 and 3. HTTPMode: no submitter pod following `ray job logs --follow` (a dropped stream fails a
    K8sJobMode RayJob 30 s after the submitter ends, and its retry deletes a healthy cluster). No KubeRay retry (each
    one restarts activeDeadlineSeconds). The driver stopped before KubeRay's deadline, the cluster deleted within a
    minute of it: the work ends within deadline + ttlSecondsAfterFinished."""
    jobs = _ray_jobs(overlay)
    assert {w.split()[0] for w, _ in jobs} == {"RayJob", "RayCronJob"}
    for where, spec in jobs:
        assert spec["submissionMode"] == "HTTPMode", where
        assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec, where
        attempts = spec.get("backoffLimit", 0) + 1
        assert attempts == 1, f"{where}: {attempts} attempts, each with a fresh activeDeadlineSeconds"
        assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 300, where
        assert "deletionStrategy" not in spec, where
        assert 0 < spec["activeDeadlineSeconds"] - _wrapper_deadline(spec) <= 3600, where
        assert spec["activeDeadlineSeconds"] + spec["ttlSecondsAfterFinished"] <= {
            "RayJob": 3 * 86400 if overlay == "prod" else 6 * 3600, "RayCronJob": 6 * 3600}[where.split()[0]] + 300


def _config(tmp_path, output) -> pathlib.Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_id": "esteva-inception", "output": str(output)}))
    return cfg


def test_the_entrypoint_keeps_each_attempts_driver_log(tmp_path):
    """Finding 2: the driver's output goes to <output>/logs/<run_id>/, one file per attempt, while it runs."""
    out = tmp_path / "bucket" / "dermray"
    cfg = _config(tmp_path, out)
    child = ("import sys, time\nprint('fold 0: epoch 1', flush=True)\nprint('a warning', file=sys.stderr, "
             "flush=True)\ntime.sleep(0.8)\nprint('fold 0: epoch 2', flush=True)\nsys.exit(int(sys.argv[1]))")
    env = {"PATH": "/usr/bin:/bin", "DERMRAY_LOG_UPLOAD_S": "0.3"}
    codes = []
    for attempt in (1, 0):
        proc = subprocess.Popen([sys.executable, str(ENTRYPOINT), "--", sys.executable, "-c", child, str(attempt),
                                 "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        logs = out / "logs" / "esteva-inception"
        deadline = time.monotonic() + 30  # the log is there while the driver still runs
        while not (logs.is_dir() and any("epoch 1" in p.read_text() for p in logs.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        stdout, _ = proc.communicate(timeout=30)
        codes.append(proc.returncode)
        assert "fold 0: epoch 2" in stdout  # Ray's own job log still gets every line
        time.sleep(1.1)  # the next attempt starts in another second: a file of its own
    assert codes == [1, 0]  # the driver's own exit status
    files = sorted((out / "logs" / "esteva-inception").iterdir())
    assert len(files) == 2 and all(re.fullmatch(r"\d{8}T\d{6}Z-.+\.log", f.name) for f in files)
    for f in files:
        assert f.read_text().splitlines() == ["fold 0: epoch 1", "a warning", "fold 0: epoch 2"]


def test_the_entrypoint_deadline_stops_the_driver_and_what_it_started(tmp_path):
    """Finding 3: at the deadline the driver's process group gets SIGTERM, then SIGKILL; exit 124."""
    pids = tmp_path / "pids"
    child = ("import os, signal, subprocess, sys, time\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # a driver that ignores SIGTERM ...
             "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"  # ... and its child
             f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}')\n"
             "print('started', flush=True)\ntime.sleep(60)")
    t0 = time.monotonic()
    # 5 s: a loaded CI machine took over 1 s to start the driver's Python and print "started" (the deadline came
    # first, and the test failed though the entrypoint did its job).
    out = subprocess.run([sys.executable, str(ENTRYPOINT), "--deadline-s", "5", "--grace-s", "1", "--",
                          sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 124 and "deadline" in out.stdout and "started" in out.stdout, out.stdout + out.stderr
    assert time.monotonic() - t0 < 20
    for pid in map(int, pids.read_text().split()):  # the driver and its child: gone (or a zombie awaiting its reaper)
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
        except psutil.NoSuchProcess:
            pass


# ---------------------------------------------------------------------------------------------------------------
# Finding 4: least privilege

def kuberay_role(cluster: str) -> dict:  # common/rbac.go BuildRole
    return {"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
                      {"apiGroups": [""], "resources": ["pods/resize"], "verbs": ["patch"]},
                      {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "patch"]}]}


def _mounts_token(pod_spec: dict, container: dict, sa_automount: bool) -> bool:
    """Does this container see its ServiceAccount's API token?"""
    auto = pod_spec.get("automountServiceAccountToken", sa_automount)
    token_vols = {v["name"] for v in pod_spec.get("volumes", [])
                  if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
    return auto or any(m["name"] in token_vols for m in container.get("volumeMounts", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_autoscaler_holds_an_api_token(overlay):
    """KubeRay binds its autoscaler Role to the head's ServiceAccount (BuildRoleBinding). That account is used by
    heads only, where autoscaling is on, and its token is mounted into the autoscaler sidecar alone: no Ray
    container - the driver, a task, a worker - holds a token that can patch pods or RayClusters."""
    docs = render(overlay)
    automount = {d["metadata"]["name"]: d.get("automountServiceAccountToken", True) for d in docs
                 if d["kind"] == "ServiceAccount"}
    assert set(automount) == {"dermray-head", "dermray-worker", "dermray-launcher"} and not any(automount.values())
    bound = set()
    for d in docs:
        for where, cs in cluster_specs(d):
            head_sa = cs["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
            if cs.get("enableInTreeAutoscaling"):
                bound.add(head_sa)  # KubeRay's Role <cluster> -> RoleBinding to this account
            for g in cs.get("workerGroupSpecs", []):
                assert g["template"]["spec"]["serviceAccountName"] not in bound | {head_sa}, where
    assert bound == {"dermray-head"}
    assert not [r for r in kuberay_role("x")["rules"] if "resourceNames" in r]  # namespace-wide: guard the token
    for where, pod in every_pod(overlay):
        spec = pod["spec"]
        sa = spec.get("serviceAccountName", "default")
        for c in spec.get("initContainers", []) + spec["containers"]:
            holds = _mounts_token(spec, c, automount.get(sa, True))
            if c["name"] == "autoscaler":
                assert holds and sa == "dermray-head", where
            elif c["name"] == "launch":
                assert holds and sa == "dermray-launcher", where
            else:
                assert not holds, f"{where} {c['name']}: a Ray container with the API token of {sa}"
    sas = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for name in ("dermray-head", "dermray-worker"):  # S3 through cloud IAM's own projected token, not the API's
        assert sas[name]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        (e["operator"] == "Exists" and e["key"] in labels) or (e["operator"] == "In" and labels.get(e["key"]) in e[
            "values"]) for e in selector.get("matchExpressions", []))


def ingress_allowed(policies: list[dict], src: dict, src_ns: dict, dst: dict, dst_ns: str, port: int) -> bool:
    """NetworkPolicy semantics (networking.k8s.io/v1) for TCP ingress from pod `src` (namespace labels `src_ns`)."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst_ns and _matches(p["spec"]["podSelector"], dst)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(x.get("port") in (port, None) for x in ports):
                continue
            for peer in rule.get("from", [{}]):
                same_ns = src_ns.get("kubernetes.io/metadata.name") == dst_ns
                ns_ok = _matches(peer["namespaceSelector"], src_ns) if "namespaceSelector" in peer else same_ns
                if ns_ok and _matches(peer.get("podSelector", {}), src):
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_what_ray_needs(overlay):
    """Finding 6: Ray's nodes reach each other within one kind of cluster; the operator reaches the heads' 8265;
    nothing else reaches any dermray pod - another tenant's pod, the other dermray clusters, the launcher."""
    docs = render(overlay)
    ns = one(docs, "Namespace")["metadata"]["name"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = {w: p["metadata"]["labels"] for w, p in every_pod(overlay)}
    kind = {w: p.get("dermray/job") for w, p in pods.items()}
    here = {"kubernetes.io/metadata.name": ns}
    operator = ({"app.kubernetes.io/name": "kuberay-operator"}, {"kubernetes.io/metadata.name": "kuberay-system"})
    stranger = ({"app": "web"}, here)
    for dst, labels in pods.items():
        for src, src_labels in pods.items():
            for port in (6379, 8265, 8080, 10002, 19999):
                expect = kind[src] == kind[dst] and "ray.io/node-type" in src_labels and "ray.io/node-type" in labels
                assert ingress_allowed(policies, src_labels, here, labels, ns, port) == expect, (src, dst, port)
        head = labels.get("ray.io/node-type") == "head"
        assert ingress_allowed(policies, *operator, labels, ns, 8265) == head, dst
        assert not ingress_allowed(policies, *operator, labels, ns, 6379), dst
        assert not ingress_allowed(policies, *stranger, labels, ns, 8265), dst


def test_the_kuberay_page_says_where_the_token_lives_and_why_no_tls():
    section = KUBERAY_PAGE.read_text()
    for needed in ("auth_token", "get secret dermray", "port-forward", "RAY_AUTH_TOKEN", "TLS", "restricted",
                   "k8s/overlays/prod/train", "k8s/cluster"):
        assert needed in section, needed


# ---------------------------------------------------------------------------------------------------------------
# Finding 7: the training run applied on its own; configs immutable per run

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_is_applied_on_its_own_with_a_config_of_its_own(overlay, tmp_path):
    standing, training = render_standing(overlay), render_training(overlay)
    assert not [d for d in standing if d["kind"] == "RayJob"], "a standing apply would start a training run"
    assert {d["kind"] for d in training} == {"RayJob", "ConfigMap"}
    by_name = {d["metadata"]["name"]: d for d in standing + training if d["kind"] == "ConfigMap"}
    for d in standing + training:
        for _, pod in kuberay_pods(d):
            for v in pod["spec"].get("volumes", []):
                if "configMap" in v:  # every config a Ray pod reads: named by its content, immutable
                    cm = by_name[v["configMap"]["name"]]
                    assert re.fullmatch(r"dermray-[a-z-]+-[a-z0-9]{10}", cm["metadata"]["name"]), v
                    assert cm.get("immutable") is True, cm["metadata"]["name"]
    # editing run.yaml makes a new ConfigMap (the old one, and the running cluster's reference to it, stay)
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    run_yaml = next(p for p in [tree / "overlays" / overlay / "train" / "run.yaml", tree / "train" / "run.yaml"]
                    if p.exists())
    run_yaml.write_text(run_yaml.read_text().replace("epochs:", "epochs: 1\n  # was:\n  # epochs:", 1))
    after = render_dir(tree / "overlays" / overlay / "train")
    old = {d["metadata"]["name"] for d in training if d["kind"] == "ConfigMap"}
    new = {d["metadata"]["name"] for d in after if d["kind"] == "ConfigMap"}
    assert len(new - old) == 1 and next(iter(new - old)).startswith("dermray-train-config-")


# ---------------------------------------------------------------------------------------------------------------
# Finding 8: operability

def test_priority_classes_put_the_nightly_first():
    classes = {d["metadata"]["name"]: d for d in render_dir(K8S / "cluster") if d["kind"] == "PriorityClass"}
    assert classes["dermray-nightly"]["value"] > classes["dermray-training"]["value"] > classes[
        "dermray-interactive"]["value"]
    assert classes["dermray-training"]["preemptionPolicy"] == classes["dermray-interactive"][
        "preemptionPolicy"] == "Never"
    assert not any(c.get("globalDefault") for c in classes.values())
    for env in OVERLAYS:
        for where, pod in every_pod(env):
            want = {"nightly": "dermray-nightly", "nightly-launcher": "dermray-nightly", "train": "dermray-training",
                    "interactive": "dermray-interactive"}[pod["metadata"]["labels"]["dermray/job"]]
            assert pod["spec"].get("priorityClassName") == want, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_guaranteed_qos_and_gpu_pods_can_run_bf16(overlay):
    """Requests equal limits in every container KubeRay runs, its sidecar and init container included (a K8sJobMode
    default submitter would be Burstable); GPU workers land on compute capability >= 8.0 (bf16), tolerate the GPU
    taint, and carry no hand-written /dev/shm: KubeRay mounts one sized to the memory limit."""
    for where, pod in every_pod(overlay):
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            r = c.get("resources", {})
            assert r.get("requests") == r.get("limits") and {"cpu", "memory"} <= set(r["limits"]), (where, c["name"])
        shm = [v for v in pod["spec"].get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        ray = pod["spec"]["containers"][0]
        if "ray.io/node-type" in pod["metadata"]["labels"]:
            assert [v["name"] for v in shm] == ["shared-mem"], where  # KubeRay's, not ours
            assert quantity(shm[0]["emptyDir"]["sizeLimit"]) == quantity(ray["resources"]["limits"]["memory"])
        if int(ray["resources"]["limits"].get("nvidia.com/gpu", 0)):
            terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"]
            assert all({"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["7"]} in t[
                "matchExpressions"] for t in terms), where
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"]), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_voluntary_eviction_of_a_ray_head(overlay):
    (pdb,) = [d for d in render_standing(overlay) if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 0
    for where, pod in every_pod(overlay):
        is_head = pod["metadata"]["labels"].get("ray.io/node-type") == "head"
        assert _matches(pdb["spec"]["selector"], pod["metadata"]["labels"]) == is_head, where
