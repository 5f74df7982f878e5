"""The nightly launcher: tonight's scoring RayJob - at most one per night, never two at once.

Run by the dermray-nightly CronJob's pod (the dermray image: Python's standard library, no kubectl). Steps:
1. Which launch. A Job that the CronJob made for a schedule is named <cronjob>-<minutes since the epoch> (read through
   the downward API label batch.kubernetes.io/job-name): that is the night's scheduled time, and its RayJob is
   dermray-nightly-YYYYMMDD (the date in DERMRAY_NIGHTLY_TIME_ZONE). Started more than DERMRAY_NIGHTLY_WINDOW_S after
   that time, the launch is stale: refused. Any other Job (`kubectl create job --from=cronjob/...`) is a manual run,
   dermray-nightly-manual-YYYYMMDDHHMM (UTC): it never takes a night's name, so the night itself still runs.
2. The lock. The Lease dermray-nightly names the RayJob that holds the nightly slot. A launcher takes it by creating
   it, or, when its holder is finished or gone, by an update carrying the resourceVersion it read (the API server
   refuses a stale one, so two launchers cannot both win). Held by another RayJob still running: refused.
3. The RayJob. spec.jobTemplate of the suspended RayCronJob DERMRAY_TEMPLATE (the one nightly spec; images and
   rayVersion set by kustomize) with suspend false and DERMRAY_NIGHTLY_SCHEDULED_FOR in the head's environment (the
   entrypoint refuses a night without it), labelled dermray/job=nightly and dermray/night, owned by this Job (when
   the CronJob drops the Job from its history the RayJob goes with it). 409 AlreadyExists: a retry of this Job.
4. It waits for the RayJob to finish, one line per status change, and exits with the night's outcome: `kubectl get
   cronjob dermray-nightly` shows LAST SUCCESSFUL (kube-state-metrics: kube_cronjob_status_last_successful_time),
   and a failed or refused night is a failed Job (kube_job_status_failed).
Exit 0: the night scored; 1: an API error (the Job runs the pod again); 2: a bad setting; 3: the night's RayJob
failed; 4: refused (a stale launch, or another RayJob still holds the slot).
KUBERNETES_API_URL and SA_DIR override the in-cluster API address and service-account directory, DERMRAY_POLL_S the
polling interval (tests).
"""
import copy
import datetime as dt
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request

PREFIX = "dermray-nightly"
LEASE = "dermray-nightly"
FINISHED = {"Complete", "Failed", "ValidationFailed"}  # KubeRay's final jobDeploymentStatus values
OK, API_ERROR, BAD_SETTING, NIGHT_FAILED, REFUSED = 0, 1, 2, 3, 4


def zone(name: str) -> dt.tzinfo:
    if name in ("UTC", "Etc/UTC"):
        return dt.timezone.utc
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def plan(job_name: str, tz_name: str, now: dt.datetime, window_s: int) -> tuple[str, dt.datetime, str | None]:
    """(the RayJob's name, the time it stands for, why it is refused or None) for the launcher Job `job_name`."""
    m = re.fullmatch(rf"{PREFIX}-(\d{{8,}})", job_name or "")
    if not m:  # made by hand: a manual run under a name of its own
        return f"{PREFIX}-manual-{now.astimezone(dt.timezone.utc):%Y%m%d%H%M}", now, None
    scheduled = dt.datetime.fromtimestamp(int(m.group(1)) * 60, dt.timezone.utc)
    name = f"{PREFIX}-{scheduled.astimezone(zone(tz_name)):%Y%m%d}"
    late = (now - scheduled).total_seconds()
    if late > window_s:
        return name, scheduled, (f"launched {late / 3600:.1f} h after the night's schedule ({scheduled:%Y-%m-%d %H:%M}"
                                 f" UTC; window {window_s / 3600:.1f} h): a stale launch, the night is skipped")
    return name, scheduled, None


class Api:
    def __init__(self):
        sa = os.environ.get("SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")
        self.base = os.environ.get("KUBERNETES_API_URL") or (
            f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}")
        self.sa = sa
        self.ctx = ssl.create_default_context(cafile=os.path.join(sa, "ca.crt")) if self.base.startswith(
            "https") else None

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        token = os.path.join(self.sa, "token")
        if os.path.exists(token):  # read on every call: the projected token is rotated
            with open(token) as f:
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ctx) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read() or b"{}")
            except ValueError:
                return e.code, {}
        except OSError as e:  # connection refused, timeout: retried by the caller
            return 0, {"message": str(e)}


def active(rayjob: dict) -> bool:
    return rayjob.get("status", {}).get("jobDeploymentStatus") not in FINISHED


def take_slot(api: Api, ns: str, name: str, now: dt.datetime) -> tuple[int, str]:
    """The Lease for RayJob `name`: (OK, how), (REFUSED, who holds it) or (API_ERROR, what failed)."""
    path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
    stamp = now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for _ in range(3):
        status, lease = api.call("GET", f"{path}/{LEASE}")
        if status == 404:
            status, body = api.call("POST", path, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": LEASE, "namespace": ns, "labels": {"app.kubernetes.io/name": "dermray"}},
                "spec": {"holderIdentity": name, "acquireTime": stamp}})
            if status in (200, 201):
                return OK, "created the lease"
            if status == 409:
                continue  # another launcher created it meanwhile: look again
            return API_ERROR, f"create Lease {LEASE}: HTTP {status}: {body.get('message', '')}"
        if status != 200:
            return API_ERROR, f"get Lease {LEASE}: HTTP {status}"
        holder = lease.get("spec", {}).get("holderIdentity") or ""
        if holder == name:
            return OK, "holds the lease already"
        if holder:
            status, held = api.call("GET", f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/{holder}")
            if status == 200 and active(held):
                return REFUSED, f"RayJob {holder} is still active and holds the nightly slot"
            if status not in (200, 404):
                return API_ERROR, f"get RayJob {holder}: HTTP {status}"
        lease["spec"] = {**lease.get("spec", {}), "holderIdentity": name, "acquireTime": stamp}
        status, body = api.call("PUT", f"{path}/{LEASE}", lease)  # carries the resourceVersion read above
        if status == 200:
            return OK, f"took the lease from {holder or 'nobody'}"
        if status != 409:
            return API_ERROR, f"update Lease {LEASE}: HTTP {status}: {body.get('message', '')}"
    return REFUSED, f"Lease {LEASE} kept changing under this launcher: another launcher is at work"


def rayjob_from(cron: dict, name: str, ns: str, scheduled: dt.datetime, night: str, job_name: str,
                job_uid: str) -> dict:
    spec = copy.deepcopy(cron["spec"]["jobTemplate"])
    spec["suspend"] = False  # the template is suspended so that nothing but this launcher starts it
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = [e for e in head.get("env", []) if e["name"] != "DERMRAY_NIGHTLY_SCHEDULED_FOR"]
    head["env"] = env + [{"name": "DERMRAY_NIGHTLY_SCHEDULED_FOR",
                          "value": scheduled.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}]
    labels = dict(cron.get("metadata", {}).get("labels", {}))
    labels.update({"dermray/job": "nightly", "dermray/night": night})
    meta = {"name": name, "namespace": ns, "labels": labels,
            "annotations": {"dermray/launched-by": job_name or "?",
                            "dermray/scheduled-for": head["env"][-1]["value"]}}
    if job_name and job_uid:  # pruned with the launcher Job from the CronJob's history
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": job_uid}]
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": spec}


def wait(api: Api, ns: str, name: str, poll_s: float) -> int:
    seen, errors = None, 0
    while True:
        status, rayjob = api.call("GET", f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/{name}")
        if status == 404:
            print(f"launcher: RayJob {name} was deleted before it finished", file=sys.stderr)
            return NIGHT_FAILED
        if status != 200:
            errors += 1
            if errors > 20:
                print(f"launcher: get RayJob {name}: HTTP {status}, {errors} times in a row", file=sys.stderr)
                return API_ERROR
            time.sleep(poll_s)
            continue
        errors = 0
        st = rayjob.get("status", {})
        now = (st.get("jobDeploymentStatus", "New"), st.get("jobStatus", ""))
        if now != seen:
            print(f"launcher: RayJob {name}: {now[0]} {now[1]}".rstrip(), flush=True)
            seen = now
        if now[0] in FINISHED:
            if now == ("Complete", "SUCCEEDED"):
                print(f"launcher: RayJob {name} succeeded")
                return OK
            print(f"launcher: RayJob {name} failed: {st.get('reason', '')} {st.get('message', '')}".rstrip(),
                  file=sys.stderr)
            return NIGHT_FAILED
        time.sleep(poll_s)


def launch(api: Api, ns: str, template: str, job_name: str, job_uid: str, tz_name: str, window_s: int,
           now: dt.datetime, poll_s: float) -> int:
    name, scheduled, refusal = plan(job_name, tz_name, now, window_s)
    night = "manual" if "-manual-" in name else name.rsplit("-", 1)[1]
    if refusal:
        print(f"launcher: not starting {name}: {refusal}", file=sys.stderr)
        return REFUSED
    rayjobs = f"/apis/ray.io/v1/namespaces/{ns}/rayjobs"
    status, _ = api.call("GET", f"{rayjobs}/{name}")
    if status == 200:
        print(f"launcher: RayJob {name} exists already (a retry of this launch): waiting for it")
        return wait(api, ns, name, poll_s)
    if status != 404:
        print(f"launcher: get RayJob {name}: HTTP {status}", file=sys.stderr)
        return API_ERROR
    code, how = take_slot(api, ns, name, now)
    if code != OK:
        print(f"launcher: not starting {name}: {how}", file=sys.stderr)
        return code
    status, cron = api.call("GET", f"/apis/ray.io/v1/namespaces/{ns}/raycronjobs/{template}")
    if status != 200:
        print(f"launcher: get RayCronJob {template} (the nightly template): HTTP {status}", file=sys.stderr)
        return API_ERROR
    status, body = api.call("POST", rayjobs, rayjob_from(cron, name, ns, scheduled, night, job_name, job_uid))
    if status in (200, 201):
        print(f"launcher: created RayJob {name} ({how}; scheduled for {scheduled:%Y-%m-%d %H:%M} UTC)", flush=True)
    elif status == 409:
        print(f"launcher: RayJob {name} was created meanwhile (AlreadyExists): waiting for it")
    else:
        print(f"launcher: create RayJob {name}: HTTP {status}: {body.get('message', '')}", file=sys.stderr)
        return API_ERROR
    return wait(api, ns, name, poll_s)


def main() -> int:
    try:
        ns = os.environ["POD_NAMESPACE"]
        template = os.environ.get("DERMRAY_TEMPLATE", PREFIX)
        tz_name = os.environ.get("DERMRAY_NIGHTLY_TIME_ZONE", "Etc/UTC")
        zone(tz_name)
        window_s = int(os.environ["DERMRAY_NIGHTLY_WINDOW_S"])
        poll_s = float(os.environ.get("DERMRAY_POLL_S", "30"))
        api = Api()
    except Exception as e:
        print(f"launcher: bad setting: {type(e).__name__}: {e}", file=sys.stderr)
        return BAD_SETTING
    return launch(api, ns, template, os.environ.get("JOB_NAME", ""), os.environ.get("JOB_UID", ""), tz_name,
                  window_s, dt.datetime.now(dt.timezone.utc), poll_s)


if __name__ == "__main__":
    sys.exit(main())
