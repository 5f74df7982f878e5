"""The plain CronJob's launcher: create tonight's nightly RayJob, exactly once per night.

Run by the dermray-nightly CronJob's pod (the dermray image: Python's standard library, no kubectl). Steps:
1. The night: the date of the scheduled time the CronJob encodes in its Job's name (`<cronjob>-<minutes since
   the epoch>`, read through the downward API label batch.kubernetes.io/job-name) in DERMRAY_NIGHTLY_TIME_ZONE;
   for a Job made by hand (`kubectl create job --from=cronjob/...`) the date now. RayJob name:
   dermray-nightly-YYYYMMDD - deterministic, so every retry of the same night names the same object.
2. GET that RayJob: there already (an earlier try created it) -> nothing to do, exit 0.
3. Any other night's RayJob (label dermray/job=nightly) not finished -> refuse, exit 1: nights never overlap.
4. Copy spec.jobTemplate of the RayCronJob DERMRAY_TEMPLATE (suspended by this component: it is the one nightly
   spec, images and rayVersion already set by kustomize) into a RayJob with dermray's labels, and POST it;
   409 AlreadyExists (a concurrent try won) counts as success.
Exit 0: tonight's RayJob exists; 1: an API error or an active earlier night; 2: a bad setting.
KUBERNETES_API_URL and SA_DIR override the in-cluster API address and service-account directory (tests).
"""
import datetime as dt
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

PREFIX = "dermray-nightly"
FINISHED = {"Complete", "Failed", "ValidationFailed"}  # KubeRay's final jobDeploymentStatus values


def zone(name: str) -> dt.tzinfo:
    if name in ("UTC", "Etc/UTC"):
        return dt.timezone.utc
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def night(job_name: str, tz: dt.tzinfo, now: dt.datetime) -> dt.date:
    """The night a launcher Job stands for: its scheduled time (from the CronJob's Job name), else now."""
    m = re.search(r"-(\d{8,})$", job_name or "")
    t = dt.datetime.fromtimestamp(int(m.group(1)) * 60, dt.timezone.utc) if m else now
    return t.astimezone(tz).date()


class Api:
    def __init__(self):
        sa = os.environ.get("SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")
        self.base = os.environ.get("KUBERNETES_API_URL") or (
            f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}")
        token = os.path.join(sa, "token")
        self.headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if os.path.exists(token):
            with open(token) as f:
                self.headers["Authorization"] = f"Bearer {f.read().strip()}"
        ca = os.path.join(sa, "ca.crt")
        self.ctx = ssl.create_default_context(cafile=ca) if self.base.startswith("https") else None

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ctx) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read() or b"{}")
            except ValueError:
                return e.code, {}


def launch(api: Api, ns: str, template: str, job_name: str, tz_name: str, now: dt.datetime) -> int:
    d = night(job_name, zone(tz_name), now)
    name = f"{PREFIX}-{d:%Y%m%d}"
    rayjobs = f"/apis/ray.io/v1/namespaces/{ns}/rayjobs"
    status, _ = api.call("GET", f"{rayjobs}/{name}")
    if status == 200:
        print(f"launcher: RayJob {name} exists already (night {d}): nothing to do")
        return 0
    if status != 404:
        print(f"launcher: GET RayJob {name}: HTTP {status}", file=sys.stderr)
        return 1
    status, listing = api.call("GET", f"{rayjobs}?labelSelector=" + urllib.parse.quote("dermray/job=nightly"))
    if status != 200:
        print(f"launcher: list nightly RayJobs: HTTP {status}", file=sys.stderr)
        return 1
    active = [j["metadata"]["name"] for j in listing.get("items", [])
              if j["metadata"]["name"] != name and j.get("status", {}).get("jobDeploymentStatus") not in FINISHED]
    if active:
        print(f"launcher: not starting {name}: an earlier night is still active: {', '.join(active)}",
              file=sys.stderr)
        return 1
    status, cron = api.call("GET", f"/apis/ray.io/v1/namespaces/{ns}/raycronjobs/{template}")
    if status != 200:
        print(f"launcher: GET RayCronJob {template} (the nightly template): HTTP {status}", file=sys.stderr)
        return 1
    labels = dict(cron.get("metadata", {}).get("labels", {}))
    labels.update({"dermray/job": "nightly", "dermray/night": d.isoformat()})
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
              "metadata": {"name": name, "namespace": ns, "labels": labels,
                           "annotations": {"dermray/launched-by": job_name or "?"}},
              "spec": cron["spec"]["jobTemplate"]}
    status, body = api.call("POST", rayjobs, rayjob)
    if status in (200, 201):
        print(f"launcher: created RayJob {name} (night {d})")
        return 0
    if status == 409:
        print(f"launcher: RayJob {name} was created meanwhile (AlreadyExists): nothing to do")
        return 0
    print(f"launcher: create RayJob {name}: HTTP {status}: {body.get('message', '')}", file=sys.stderr)
    return 1


def main() -> int:
    try:
        ns = os.environ["POD_NAMESPACE"]
        template = os.environ.get("DERMRAY_TEMPLATE", PREFIX)
        tz_name = os.environ.get("DERMRAY_NIGHTLY_TIME_ZONE", "Etc/UTC")
        zone(tz_name)
        api = Api()
    except Exception as e:
        print(f"launcher: bad setting: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return launch(api, ns, template, os.environ.get("JOB_NAME", ""), tz_name, dt.datetime.now(dt.timezone.utc))


if __name__ == "__main__":
    sys.exit(main())
