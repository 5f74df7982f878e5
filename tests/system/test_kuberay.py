"""The KubeRay manifests as KubeRay reads them.

- Strict schema validation against KubeRay's own CRDs (the oldest supported version's, from
  ../shared/kuberay-crds), with jsonschema and cel-python: a field the structural schema does not declare is an
  error, as in a strict `kubectl apply`; types, enums, patterns, required fields and the CRDs' CEL rules are
  checked too. Every ray.io object in k8s/, in each rendered environment (its standing objects and its training
  run), embedded in a ConfigMap, and the RayJob the launcher creates.
- Strict schema validation of every standard object the overlays and k8s/cluster render (kubernetes-validate:
  Kubernetes' own schemas) at the oldest Kubernetes the manifests support and at the newest it knows.
- One image setting per environment reaches every container; rayVersion is written once and is the image's Ray.
- The GPUs an environment can request at once equal the cap its comment states; requests equal limits.
- The nightly launcher (run against a fake API server): one RayJob per night under a lock, a manual run under a name
  of its own, the night's outcome as its exit status; the entrypoint's guard for the night.
(tests/system/test_k8s_policy.py: KubeRay v1.7.0's controller semantics, security and operability.)
"""
import copy
import datetime as dt
import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import types
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import celpy
import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ["dev", "prod"]
SUPPORTED = "1.7.0"  # the oldest KubeRay the manifests support (docs/kuberay.md, each manifest's header)
CRD_DIR = REPO.parent / "shared" / "kuberay-crds" / f"v{SUPPORTED}"
PLACEHOLDER = "dermray"  # the image name every manifest uses; each overlay's `images:` rewrites it
SCHEDULE_TEMPLATE = "dermray-nightly"


# ---------------------------------------------------------------------------------------------------------------
# Strict validation, as a strict `kubectl apply` judges an object: a field the schema does not declare is an error.
# Standard objects: kubernetes-validate (Kubernetes' own OpenAPI schemas, bundled per release, offline; strict).
# KubeRay's: its CRDs' structural schemas through jsonschema, their CEL rules through cel-python (issue 30: these
# replace a hand-written schema walker and a CEL subset).

KUBERNETES = "1.27"  # the oldest Kubernetes the manifests support (docs/kuberay.md, each kustomization's first line)
# Judged at the oldest supported release and at the newest kubernetes-validate bundles (an API removed since fails).
KUBERNETES_VERSIONS = (KUBERNETES, kubernetes_validate.latest_version())


def _where(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out


def _schema_bugs_worked_around(obj: dict, version: str) -> dict:
    """kubernetes/kubernetes#120204: the OpenAPI of Kubernetes before 1.29 marks a podFailurePolicy rule's
    onPodConditions required, which its API server never did (a rule has onExitCodes or onPodConditions, not both).
    At those versions the copy judged carries an empty onPodConditions beside onExitCodes; from 1.29 on, the
    object is judged as written."""
    if tuple(int(x) for x in version.split(".")[:2]) >= (1, 29) or obj.get("kind") not in ("Job", "CronJob"):
        return obj
    obj = copy.deepcopy(obj)
    job = obj.get("spec", {})
    job = job.get("jobTemplate", {}).get("spec", {}) if obj["kind"] == "CronJob" else job
    for rule in job.get("podFailurePolicy", {}).get("rules", []):
        if "onExitCodes" in rule:
            rule.setdefault("onPodConditions", [])
    return obj


def validate_standard(obj: dict, version: str = KUBERNETES) -> list[str]:
    """The error a strict apply of a standard Kubernetes object would report at `version` ([] when accepted; the
    first one: kubernetes-validate stops there)."""
    try:
        kubernetes_validate.validate(_schema_bugs_worked_around(obj, version), version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_where(e.absolute_path) or obj.get('kind')}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


@functools.lru_cache(maxsize=None)
def _cel_program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule))  # an expression cel-python cannot parse raises here: the test fails


def cel(rule: str, value) -> bool:
    """A CRD's CEL rule on `value`. A transition rule (one that reads oldSelf) holds on create: the API server
    evaluates it on update only."""
    if re.search(r"\boldSelf\b", rule):
        return True
    return bool(_cel_program(rule).evaluate({"self": celpy.json_to_cel(value)}))


def _cel_rules(validator, rules, instance, schema):
    for r in rules:
        try:
            ok, why = cel(r["rule"], instance), ""
        except celpy.CELEvalError as e:  # an error in a rule rejects the object, as the API server does
            ok, why = False, f" ({e})"
        if not ok:
            yield jsonschema.ValidationError((r.get("message") or r["rule"]) + why)


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: a set's items, a map's keys (x-kubernetes-list-map-keys) are unique."""
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = [json.dumps(item, sort_keys=True) if list_type == "set" else tuple(item.get(k) for k in keys)
            for item in instance if list_type == "set" or isinstance(item, dict)]
    if len(seen) != len(set(seen)):
        yield jsonschema.ValidationError(f"duplicate entries in a list of type {list_type}" + (
            f" (keys {keys})" if list_type == "map" else ""))


INT_FORMATS = {"int32": (-2 ** 31, 2 ** 31 - 1), "int64": (-2 ** 63, 2 ** 63 - 1)}
FORMATS = jsonschema.FormatChecker(formats=())
for _name, (_lo, _hi) in INT_FORMATS.items():
    FORMATS.checks(_name)(lambda v, lo=_lo, hi=_hi: not isinstance(v, int) or lo <= v <= hi)
# OpenAPI v3's schema objects are JSON Schema draft 4 (Wright 00) with extensions: Kubernetes' are keywords here.
StructuralValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {
    "x-kubernetes-validations": _cel_rules, "x-kubernetes-list-type": _list_type})


def structural(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema with the API server's strict semantics: an object whose schema
    declares neither additionalProperties nor x-kubernetes-preserve-unknown-fields takes no field it does not
    list (the server prunes it; a strict apply rejects it); an embedded resource takes apiVersion, kind and
    metadata besides; nullable admits null. int-or-string is the schema's own anyOf."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: structural(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = structural(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [structural(s) for s in out[key]]
    if out.get("x-kubernetes-embedded-resource"):
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}, **out.get("properties", {})}
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crds() -> dict:
    if not CRD_DIR.is_dir():
        pytest.skip(f"{CRD_DIR} is absent: KubeRay's CRDs are needed for strict schema validation")
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if crd and crd.get("kind") == "CustomResourceDefinition":
                out[crd["spec"]["names"]["kind"]] = crd
    assert {"RayCluster", "RayJob", "RayCronJob"} <= set(out), f"{CRD_DIR}: {sorted(out)}"
    return out


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str, version: str):
    (served,) = [v for v in crds()[kind]["spec"]["versions"] if v["name"] == version]
    schema = structural(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: judged as a standard object's (validate)
    return StructuralValidator(schema, format_checker=FORMATS)


def validate(obj: dict, version: str = KUBERNETES) -> list[str]:
    """Errors a strict apply of `obj` would report, [] when it is accepted: a ray.io object against KubeRay's CRD
    (its metadata as any object's ObjectMeta, at Kubernetes `version`), any other object against Kubernetes'
    schemas at `version`."""
    if not str(obj.get("apiVersion", "")).startswith("ray.io/"):
        return validate_standard(obj, version)
    group, _, api_version = obj["apiVersion"].partition("/")
    crd = crds().get(obj.get("kind"))
    if crd is None or crd["spec"]["group"] != group:
        return [f"{obj.get('apiVersion')} {obj.get('kind')}: no such KubeRay kind"]
    served = sorted(v["name"] for v in crd["spec"]["versions"] if v.get("served"))
    if api_version not in served:
        return [f"{obj['kind']}: version {api_version!r} not served (served: {served})"]
    meta = validate_standard({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}, version)
    errors = _crd_validator(obj["kind"], api_version).iter_errors(obj)
    return meta + [f"{_where(e.absolute_path) or obj['kind']}: {e.message}"
                   for e in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path])]


# ---------------------------------------------------------------------------------------------------------------
# Rendering

def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed: kustomize overlays not built")
    return exe


def render_dir(path: pathlib.Path) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@functools.lru_cache(maxsize=None)
def _render_cached(path: str) -> str:
    return json.dumps(render_dir(K8S / path))


def render_standing(env: str) -> list[dict]:
    """An environment's standing objects (k8s/overlays/<env>): applied and re-applied at will."""
    return json.loads(_render_cached(f"overlays/{env}"))


def render_training(env: str) -> list[dict]:
    """An environment's training run (k8s/overlays/<env>/train), applied on its own."""
    return json.loads(_render_cached(f"overlays/{env}/train"))


def render(env: str) -> list[dict]:
    """Everything an environment runs: its standing objects and its training run (two kustomizations)."""
    return render_standing(env) + render_training(env)


def one(docs, kind, name=None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def raw_objects() -> list[tuple[pathlib.Path, dict]]:
    return [(p, d) for p in sorted(K8S.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def embedded_objects(docs) -> list[tuple[str, dict]]:
    """ray.io objects written as text in ConfigMap data."""
    out = []
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            try:
                parts = list(yaml.safe_load_all(text))
            except yaml.YAMLError:
                continue
            out += [(f"ConfigMap {cm['metadata']['name']}/{key}", p) for p in parts
                    if isinstance(p, dict) and str(p.get("apiVersion", "")).startswith("ray.io/")]
    return out


def cluster_specs(obj: dict) -> list[tuple[str, dict]]:
    """The RayClusterSpecs an object carries (a RayCluster's spec, a RayJob's, a RayCronJob's template's)."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "RayCluster":
        return [("spec", spec)]
    if kind == "RayJob" and "rayClusterSpec" in spec:
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    if kind == "RayCronJob" and "rayClusterSpec" in spec.get("jobTemplate", {}):
        return [("spec.jobTemplate.rayClusterSpec", spec["jobTemplate"]["rayClusterSpec"])]
    return []


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    out = []
    for where, cs in cluster_specs(obj):
        out.append((f"{where}.headGroupSpec", cs["headGroupSpec"]["template"]))
        out += [(f"{where}.workerGroupSpecs[{g['groupName']}]", g["template"]) for g in cs.get("workerGroupSpecs", [])]
    if obj["kind"] == "CronJob":
        out.append(("spec.jobTemplate.spec.template", obj["spec"]["jobTemplate"]["spec"]["template"]))
    return out


def all_images(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers", "ephemeralContainers") and isinstance(v, list):
                for c in v:
                    yield f"{path}.{k}[{c.get('name')}]", c.get("image")
            yield from all_images(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from all_images(v, f"{path}[{i}]")


def all_strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from all_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from all_strings(v)
    elif isinstance(node, str):
        yield node


QUANTITY = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30,
            "Ti": 2 ** 40}


def quantity(q) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(q))
    assert m and m.group(2) in QUANTITY, f"quantity {q!r}"
    return float(m.group(1)) * QUANTITY[m.group(2)]


# ---------------------------------------------------------------------------------------------------------------
# The validator itself

GOOD_CRON = {
    "apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": "x", "labels": {"a": "b"}},
    "spec": {"schedule": "0 2 * * *", "jobTemplate": {
        "entrypoint": "python x.py", "deletionStrategy": {"deletionRules": [
            {"policy": "DeleteSelf", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60}}]},
        "rayClusterSpec": {"rayVersion": "2.60.0", "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {
            "spec": {"containers": [{"name": "ray-head", "image": "i",
                                     "resources": {"limits": {"cpu": "2", "memory": "8Gi"}}}]}}}}}}}


def _mutate(fn):
    obj = json.loads(json.dumps(GOOD_CRON))
    fn(obj)
    return obj


def _head(o):
    return o["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("mutation,expect", [
    (lambda o: o["spec"].update(concurrencyPolicy="Forbid"), "spec: Additional properties are not allowed "
                                                             "('concurrencyPolicy' was unexpected)"),
    (lambda o: o["spec"].update(startingDeadlineSeconds=60), "('startingDeadlineSeconds' was unexpected)"),
    (lambda o: _head(o).update(imagePullPolicyy="Always"), "('imagePullPolicyy' was unexpected)"),
    (lambda o: o["spec"]["jobTemplate"].update(metadata={"labels": {"a": "b"}}), "is not of type 'string'"),
    (lambda o: o["metadata"].update(labelz={}), "metadata: Additional properties are not allowed ('labelz'"),
    (lambda o: o["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "0 is not of type 'string'"),
    (lambda o: _head(o)["resources"]["limits"].update(cpu="two"), "does not match"),
    (lambda o: o["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"][0].update(policy="DeleteAll"),
     "is not one of"),
    (lambda o: o["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"][0]["condition"].update(
        jobDeploymentStatus="Failed"), "cannot be used together"),
    (lambda o: o["spec"]["jobTemplate"]["deletionStrategy"].update(onSuccess={"policy": "DeleteSelf"}),
     "cannot be used together"),
    (lambda o: o["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"][0]["condition"].update(
        ttlSeconds=2 ** 31), "is not a 'int32'"),
    (lambda o: o["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"].append(
        {"name": "ray-head", "image": "j"}), "duplicate entries in a list of type map (keys ['name'])"),
    (lambda o: o["spec"].pop("schedule"), "spec: 'schedule' is a required property"),
    (lambda o: o.update(apiVersion="ray.io/v2"), "not served"),
])
def test_the_validator_rejects_what_a_strict_apply_rejects(mutation, expect):
    assert validate(GOOD_CRON) == []
    errors = validate(_mutate(mutation))
    assert any(expect in e for e in errors), errors


GOOD_CRONJOB = {
    "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x", "labels": {"a": "b"}},
    "spec": {"schedule": "0 2 * * *", "timeZone": "Etc/UTC", "concurrencyPolicy": "Forbid", "jobTemplate": {"spec": {
        "backoffLimit": 2, "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "c", "operator": "In", "values": [2, 3]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
        "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "c", "image": "i", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}}}}}}
GOOD_ROLE = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "x"},
             "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "create"]}]}


def _pod_spec(o):
    return o["spec"]["jobTemplate"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("good,mutation,expect", [
    (GOOD_CRONJOB, lambda o: _pod_spec(o)["containers"][0].update(imagePullPolicyy="Always"),
     "spec.jobTemplate.spec.template.spec.containers[0]: Additional properties are not allowed ('imagePullPolicyy'"),
    (GOOD_CRONJOB, lambda o: o["spec"]["jobTemplate"]["spec"].update(backoffLimit="two"), "is not of type 'integer'"),
    (GOOD_CRONJOB, lambda o: _pod_spec(o).update(containers={"name": "c"}), "is not of type 'array'"),
    (GOOD_CRONJOB, lambda o: o["metadata"].update(labelz={}), "('labelz' was unexpected)"),
    (GOOD_CRONJOB, lambda o: o["metadata"]["labels"].update(n=1), "1 is not of type 'string'"),
    (GOOD_CRONJOB, lambda o: o.update(specc={}), "('specc' was unexpected)"),
    (GOOD_CRONJOB, lambda o: o["spec"].pop("schedule"), "'schedule' is a required property"),
    (GOOD_CRONJOB, lambda o: o.update(apiVersion="batch/v1beta1"), "Couldn't find schema for kind CronJob"),
    (GOOD_ROLE, lambda o: o["rules"][0].update(verbs="get"), "rules[0].verbs: 'get' is not of type 'array'"),
])
def test_the_validator_rejects_a_broken_standard_object(good, mutation, expect, version):
    """Standard objects (kubernetes-validate, strict): an unknown field, a wrong type, a missing required field, an
    API version the release does not serve."""
    assert validate(good, version) == []
    obj = json.loads(json.dumps(good))
    mutation(obj)
    errors = validate(obj, version)
    assert any(expect in e for e in errors), errors


def test_a_kubernetes_schema_bug_is_worked_around_at_the_releases_it_is_in():
    """kubernetes#120204: the 1.27 OpenAPI requires onPodConditions in a podFailurePolicy rule that has onExitCodes
    (the API server never did). Once the bundled 1.27 schema drops the mistake, so can the workaround."""
    with pytest.raises(kubernetes_validate.ValidationError, match="'onPodConditions' is a required property"):
        kubernetes_validate.validate(GOOD_CRONJOB, KUBERNETES, strict=True)
    kubernetes_validate.validate(GOOD_CRONJOB, KUBERNETES_VERSIONS[-1], strict=True)  # fixed in 1.29
    assert validate(GOOD_CRONJOB, KUBERNETES) == []
    assert "onPodConditions" not in GOOD_CRONJOB["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]


def _cel_rules_of(schema) -> list[str]:
    if isinstance(schema, dict):
        own = [v["rule"] for v in schema.get("x-kubernetes-validations", [])]
        return own + [r for v in schema.values() for r in _cel_rules_of(v)]
    return [r for v in schema for r in _cel_rules_of(v)] if isinstance(schema, list) else []


def test_cel_rules_are_evaluated_by_cel_python():
    assert cel("!(has(self.a) && has(self.b))", {"a": 1}) is True
    assert cel("!(has(self.a) && has(self.b))", {"a": 1, "b": 2}) is False
    assert cel("self in ['x', 'y']", "z") is False
    assert cel("self.size() <= 2 && self.all(x, x > 0)", [1, 2, 3]) is False  # beyond has/!/&&/||/in
    assert cel("self == oldSelf", 1) is True  # a transition rule: evaluated on update only
    with pytest.raises(celpy.CELParseError):
        cel("self.(", {})
    rules = {r for crd in crds().values() for r in _cel_rules_of(crd["spec"]["versions"])}
    assert len(rules) >= 5
    for rule in rules:  # every rule in KubeRay's CRDs compiles
        _cel_program(rule)


def test_the_kubernetes_release_validated_against_is_the_one_the_manifests_state():
    stated = {m for p in K8S.rglob("*.yaml") for m in re.findall(r"Kubernetes >= (\d+\.\d+)", p.read_text())}
    assert stated == {KUBERNETES}
    assert f"Kubernetes >= {KUBERNETES}" in (REPO / "docs" / "kuberay.md").read_text()


def test_the_pod_template_is_expanded_in_the_crds():
    """Unknown-field detection reaches inside pod templates only because KubeRay's CRDs expand PodSpec."""
    pod = (crds()["RayCronJob"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
           ["properties"]["jobTemplate"]["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"]
           ["properties"]["template"]["properties"]["spec"])
    assert {"containers", "volumes", "tolerations"} <= set(pod["properties"])


# ---------------------------------------------------------------------------------------------------------------
# Strict validation of everything in k8s/

RAW_RAY = [(p, d) for p, d in raw_objects() if str(d.get("apiVersion", "")).startswith("ray.io/")]


@pytest.mark.parametrize("path,obj", RAW_RAY, ids=[f"{p.relative_to(K8S)}:{d['kind']}" for p, d in RAW_RAY])
def test_every_ray_object_in_k8s_passes_strict_validation(path, obj):
    assert validate(obj) == []


STANDING_KINDS = {"Namespace", "ResourceQuota", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob",
                  "PodDisruptionBudget", "NetworkPolicy", "PriorityClass"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_standard_object_passes_strict_validation(version):
    kinds = set()
    for path in [f"overlays/{env}{train}" for env in OVERLAYS for train in ("", "/train")] + ["cluster"]:
        for d in json.loads(_render_cached(path)):
            if not d["apiVersion"].startswith("ray.io/"):
                kinds.add(d["kind"])
                assert validate(d, version) == [], f"{path}: {d['kind']} {d['metadata']['name']}"
    assert kinds == STANDING_KINDS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_ray_object_passes_strict_validation(overlay):
    docs = render(overlay)
    ray_docs = [(f"{d['kind']} {d['metadata']['name']}", d) for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in ray_docs} == {"RayCluster", "RayJob", "RayCronJob"}
    for where, obj in ray_docs + embedded_objects(docs):
        assert validate(obj) == [], where


def _dns1035(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)) and len(name) <= 63


def operator_errors(obj: dict) -> list[str]:
    """The parts of KubeRay's own admission checks (utils/validation.go) that dermray's manifests touch."""
    errs = []
    name = obj["metadata"].get("name", "")
    if obj["kind"] == "RayCluster" and (len(name) > 53 or not _dns1035(name)):
        errs.append(f"RayCluster name {name!r}")
    if obj["kind"] == "RayJob" and (len(name) > 47 or not _dns1035(name)):
        errs.append(f"RayJob name {name!r}")
    job = obj["spec"] if obj["kind"] == "RayJob" else obj["spec"].get("jobTemplate") if obj[
        "kind"] == "RayCronJob" else None
    if job is not None:
        rules = job.get("deletionStrategy", {}).get("deletionRules", [])
        if not job.get("shutdownAfterJobFinishes") and job.get("ttlSecondsAfterFinished", 0) > 0:
            errs.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
        if rules and job.get("shutdownAfterJobFinishes"):
            errs.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
        by_status: dict = {}
        for r in rules:
            key = (r["condition"].get("jobStatus", ""), r["policy"])
            if key in by_status:
                errs.append(f"duplicate deletion rule {key}")
            by_status[key] = r["condition"].get("ttlSeconds", 0)
        order = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]
        for status in {s for s, _ in by_status}:
            ttls = [by_status[(status, p)] for p in order if (status, p) in by_status]
            if ttls != sorted(ttls):
                errs.append(f"deletion TTLs for {status!r} must not decrease along {order}")
        if job.get("activeDeadlineSeconds", 1) <= 0 or job.get("backoffLimit", 0) < 0:
            errs.append("activeDeadlineSeconds / backoffLimit")
        if job.get("preRunningDeadlineSeconds", 1) <= 0:
            errs.append("preRunningDeadlineSeconds must be positive")
        if job.get("suspend") and not job.get("shutdownAfterJobFinishes"):  # ValidateRayJobSpec
            errs.append("a RayJob with shutdownAfterJobFinishes false is not allowed to be suspended")
    for where, cs in cluster_specs(obj):
        if not cs["headGroupSpec"]["template"]["spec"].get("containers"):
            errs.append(f"{where}: head without containers")
        if any(not g["template"]["spec"].get("containers") for g in cs.get("workerGroupSpecs", [])):
            errs.append(f"{where}: worker group without containers")
        if cs.get("authOptions", {}).get("mode") == "token":
            v = tuple(int(x) for x in re.findall(r"\d+", cs.get("rayVersion", ""))[:3])
            if v < (2, 52, 0):
                errs.append(f"{where}: token authentication needs rayVersion >= 2.52.0, got {cs.get('rayVersion')}")
    return errs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_pass_kuberays_own_admission_checks(overlay):
    for d in render(overlay):
        if d["apiVersion"].startswith("ray.io/"):
            assert operator_errors(d) == [], f"{d['kind']} {d['metadata']['name']}"


def test_the_supported_kuberay_version_is_stated_once_and_everywhere():
    statement = f"Supported: KubeRay >= {SUPPORTED}"
    manifests = sorted({p for p, d in raw_objects() if "kind" in d})  # not the dermray run configs
    assert len(manifests) >= 9
    for path in manifests:
        text = path.read_text()
        assert statement in text.split("\n", 1)[0], f"{path}: first line must say {statement!r}"
        others = set(re.findall(r"KubeRay\s*(?:>=|<|<=|>)\s*v?[\d.]+", text)) - {f"KubeRay >= {SUPPORTED}"}
        assert not others, f"{path}: other version ranges {others}"
    assert statement in (REPO / "docs" / "kuberay.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Images and rayVersion

def _dockerfile_ray() -> str:
    return re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-", (REPO / "cluster" / "Dockerfile").read_text(),
                     re.M).group(1)


def _image_settings() -> dict[pathlib.Path, list]:
    return {p: yaml.safe_load(p.read_text()).get("images") for p in sorted(K8S.rglob("kustomization.yaml"))}


def test_manifests_name_one_image_placeholder_and_only_overlays_set_it():
    images = {img for p, d in raw_objects() for _, img in all_images(d)}
    assert images == {PLACEHOLDER}
    settings = {p: v for p, v in _image_settings().items() if v}
    for env in OVERLAYS:  # one setting per environment, shared by its standing objects and its training run
        mine = {p: v for p, v in settings.items() if p.is_relative_to(K8S / "overlays" / env)}
        assert len(mine) == 1, f"{env}: image settings in {sorted(mine)}"
        (path, entries), = mine.items()
        assert [e["name"] for e in entries] == [PLACEHOLDER], path
        users = [p for p in sorted((K8S / "overlays" / env).rglob("kustomization.yaml"))
                 if path.parent.name in str(yaml.safe_load(p.read_text()).get("components"))]
        assert {p.parent for p in users} == {K8S / "overlays" / env, K8S / "overlays" / env / "train"}, users
    assert all(p.is_relative_to(K8S / "overlays") for p in settings), "the image is set in the overlays only"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_setting_changes_every_image(overlay, tmp_path):
    before = render(overlay)
    kfile_rel = next(p for p, v in _image_settings().items() if v and p.is_relative_to(K8S / "overlays" / overlay))
    (entry,) = yaml.safe_load(kfile_rel.read_text())["images"]
    old_name = entry["newName"]
    old = f"{old_name}:{entry['newTag']}"
    assert {img for d in before for _, img in all_images(d)} == {old}

    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    kfile = tree / kfile_rel.relative_to(K8S)
    k = yaml.safe_load(kfile.read_text())
    new = "registry.example.com/other/dermray-test:9.9.9"
    k["images"] = [{"name": PLACEHOLDER, "newName": new.split(":")[0], "newTag": "9.9.9"}]
    kfile.write_text(yaml.safe_dump(k, sort_keys=False))
    after = render_dir(tree / "overlays" / overlay) + render_dir(tree / "overlays" / overlay / "train")

    seen = [(f"{d['kind']} {d['metadata']['name']}{w}", img) for d in after for w, img in all_images(d)]
    for where, obj in embedded_objects(after):
        seen += [(where + w, img) for w, img in all_images(obj)]
    assert seen and all(img == new for _, img in seen), [s for s in seen if s[1] != new]
    kinds_with_pods = {d["kind"] for d in after if pod_templates(d)}
    assert {w.split()[0] for w, _ in seen} == kinds_with_pods
    stale = [s for d in after for s in all_strings(d) if old_name in s]  # e.g. an image in ConfigMap text or env
    assert not stale, stale
    for d in after:  # rayVersion: the image's Ray, whatever the tag
        for _, cs in cluster_specs(d):
            assert cs["rayVersion"] == _dockerfile_ray()


def test_ray_version_is_written_once():
    lines = [(p, line) for p in sorted(K8S.rglob("*.yaml")) for line in p.read_text().splitlines()
             if re.match(r"\s*rayVersion\s*:", line)]
    assert len(lines) == 1 and lines[0][0] == K8S / "components" / "ray" / "versions.yaml", lines
    assert not [p for p, d in raw_objects() if "kind" in d for _, cs in cluster_specs(d) if "rayVersion" in cs]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_cluster_runs_the_images_ray_version(overlay):
    docs = render(overlay)
    specs = [(d["kind"], cs) for d in docs for _, cs in cluster_specs(d)]
    assert {k for k, _ in specs} == {"RayCluster", "RayJob", "RayCronJob"}
    assert {cs.get("rayVersion") for _, cs in specs} == {ray.__version__} == {_dockerfile_ray()}


# ---------------------------------------------------------------------------------------------------------------
# GPUs and resources

def _gpus(template: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in template["spec"]["containers"])


def _cluster_gpus(cs: dict) -> int:
    return _gpus(cs["headGroupSpec"]["template"]) + sum(
        g["maxReplicas"] * g.get("numOfHosts", 1) * _gpus(g["template"]) for g in cs.get("workerGroupSpecs", []))


def _daily(schedule: str) -> bool:
    return bool(re.fullmatch(r"\d{1,2} \d{1,2} \* \* \*", schedule))


def gpu_total(docs) -> tuple[int, dict]:
    """The most GPUs an overlay's objects can hold at once."""
    parts = {}
    for d in docs:
        name = f"{d['kind']} {d['metadata']['name']}"
        if d["kind"] == "RayCluster":
            parts[name] = 0 if d["spec"].get("suspend") else _cluster_gpus(d["spec"])
        elif d["kind"] == "RayJob":  # one cluster at a time per RayJob object
            parts[name] = _cluster_gpus(d["spec"]["rayClusterSpec"])
        elif d["kind"] == "RayCronJob":
            job = d["spec"]["jobTemplate"]
            # The nightly's template: one night at a time (the launcher's Lease; test_k8s_policy.py replays the
            # schedules), and a night ends (activeDeadlineSeconds) before the next daily schedule.
            assert _daily(d["spec"]["schedule"]) and job["activeDeadlineSeconds"] < 24 * 3600
            parts[name] = _cluster_gpus(job["rayClusterSpec"])
    launchers = [d for d in docs if d["kind"] == "CronJob"]
    crons = [d for d in docs if d["kind"] == "RayCronJob"]
    # one nightly mechanism: the CronJob launching from the RayCronJob, which KubeRay never schedules itself
    assert len(crons) == 1 and crons[0]["spec"]["suspend"] is True and crons[0]["spec"]["jobTemplate"]["suspend"]
    assert len(launchers) == 1
    for cj in launchers:  # Forbid + one deterministic RayJob per night under a lock
        assert cj["spec"]["concurrencyPolicy"] == "Forbid" and _daily(cj["spec"]["schedule"])
    return sum(parts.values()), parts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_total_equals_the_cap_the_overlay_states(overlay):
    text = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
    m = re.search(r"^# GPU cap: (\d+)\b", text, re.M)
    assert m, "the overlay's comment must state '# GPU cap: N'"
    total, parts = gpu_total(render(overlay))
    assert total == int(m.group(1)), parts
    quota = one(render_standing(overlay), "ResourceQuota")  # and the namespace enforces it
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": m.group(1)}
    for name, n in parts.items():  # and the comment's breakdown names each object's share
        assert n > 0, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_requests_equal_limits_and_ray_advertises_them(overlay):
    for d in render(overlay):
        groups = []
        for _, cs in cluster_specs(d):
            groups.append(("head", cs["headGroupSpec"]))
            groups += [(g["groupName"], g) for g in cs.get("workerGroupSpecs", [])]
        templates = [(w, g["template"], g.get("rayStartParams", {})) for w, g in groups]
        templates += [(w, t, None) for w, t in pod_templates(d) if d["kind"] == "CronJob"]
        for where, template, params in templates:
            for c in template["spec"]["containers"]:
                res = c.get("resources", {})
                assert res.get("requests") == res.get("limits"), f"{d['kind']} {where} {c['name']}: {res}"
                assert {"cpu", "memory"} <= set(res["limits"]), f"{d['kind']} {where} {c['name']}"
            if params is None:
                continue
            lim = template["spec"]["containers"][0]["resources"]["limits"]
            if "num-cpus" in params:
                assert quantity(params["num-cpus"]) <= quantity(lim["cpu"])
            if "num-gpus" in params:
                assert quantity(params["num-gpus"]) == quantity(lim.get("nvidia.com/gpu", 0))
            if "memory" in params:
                assert quantity(params["memory"]) <= quantity(lim["memory"])


# ---------------------------------------------------------------------------------------------------------------
# The nightly: one schedule, its deadlines, the entrypoint's guard, the launcher

def _head_env(cron: dict) -> dict:
    head = cron["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in head.get("env", [])}


def _configmap_of(docs, template_spec: dict, mount_path: str) -> dict:
    container = template_spec["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == mount_path)
    name = next(v for v in template_spec["volumes"] if v["name"] == mount["name"])["configMap"]["name"]
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_schedule_and_the_deadlines_that_guard_it(overlay):
    docs = render_standing(overlay)
    cron = one(docs, "RayCronJob", SCHEDULE_TEMPLATE)
    cj = one(docs, "CronJob", "dermray-nightly")
    assert (cj["spec"]["schedule"], cj["spec"]["timeZone"]) == (cron["spec"]["schedule"], cron["spec"]["timeZone"])
    launcher = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    launch_env = {e["name"]: e.get("value") for e in launcher["env"]}
    assert launch_env["DERMRAY_NIGHTLY_TIME_ZONE"] == cron["spec"]["timeZone"]
    job = cron["spec"]["jobTemplate"]
    window = int(_head_env(cron)["DERMRAY_NIGHTLY_WINDOW_S"])
    # a launch within the CronJob's starting deadline, a cluster up within preRunningDeadlineSeconds: inside the
    # entrypoint's window, which ends long before the night's deadline
    assert cj["spec"]["startingDeadlineSeconds"] <= int(launch_env["DERMRAY_NIGHTLY_WINDOW_S"])
    assert int(launch_env["DERMRAY_NIGHTLY_WINDOW_S"]) + job["preRunningDeadlineSeconds"] <= window
    assert window < job["activeDeadlineSeconds"] < 24 * 3600
    # the launcher outlives the night it waits for
    assert cj["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] >= job["activeDeadlineSeconds"] + 600
    entry = job["entrypoint"].split()
    assert entry[:3] == ["python", "/etc/dermray-entrypoint/entrypoint.py", "--night"]
    assert entry[entry.index("--") + 1:entry.index("--") + 3] == ["python", "/app/jobs/nightly_score.py"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "entrypoint.py" in _configmap_of(docs, head, "/etc/dermray-entrypoint")["data"]


def _load(path: pathlib.Path, name: str):
    """Import a script under k8s/ without leaving a __pycache__ there."""
    mod = types.ModuleType(name)
    exec(compile(path.read_text(), str(path), "exec"), mod.__dict__)  # noqa: S102
    return mod


ENTRYPOINT = K8S / "components" / "ray" / "entrypoint.py"
LAUNCHER = K8S / "base" / "launch_nightly.py"


def test_the_entrypoint_runs_only_the_night_the_launcher_scheduled():
    e = _load(ENTRYPOINT, "entrypoint")
    fired = dt.datetime(2025, 12, 2, 2, 0, tzinfo=dt.timezone.utc)
    env = {"DERMRAY_NIGHTLY_WINDOW_S": "7200", "DERMRAY_NIGHTLY_SCHEDULED_FOR": "2025-12-02T02:00:00Z"}
    assert e.night_check(fired + dt.timedelta(minutes=5), env)[0] is True
    assert e.night_check(fired + dt.timedelta(minutes=119), env)[0] is True
    run, line = e.night_check(fired + dt.timedelta(hours=12, minutes=30), env)  # the cluster came up at 14:30
    assert run is False and "stale" in line and "2025-12-02T02:00:00Z" in line
    assert e.night_check(fired - dt.timedelta(hours=1), env)[0] is False  # a time in the future
    run, line = e.night_check(fired, {**env, "DERMRAY_NIGHTLY_SCHEDULED_FOR": ""})  # a copy of the template
    assert run is False and "not created by the nightly launcher" in line
    with pytest.raises(ValueError):
        e.night_check(fired, {**env, "DERMRAY_NIGHTLY_SCHEDULED_FOR": "2025-12-02T02:00:00"})  # no time zone


@pytest.mark.parametrize("late_h,runs", [(0, True), (3, False), (None, False)])
def test_the_nightly_entrypoint_runs_or_refuses_loudly(late_h, runs, tmp_path):
    docs = render_standing("prod")
    cron = one(docs, "RayCronJob", SCHEDULE_TEMPLATE)
    head = cron["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    script = tmp_path / "entrypoint.py"
    script.write_text(_configmap_of(docs, head, "/etc/dermray-entrypoint")["data"]["entrypoint.py"])
    env = _head_env(cron)
    if late_h is not None:  # as the launcher sets it; None: the template's own copy, never launched
        fired = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=late_h, minutes=1)
        env["DERMRAY_NIGHTLY_SCHEDULED_FOR"] = fired.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = subprocess.run([sys.executable, str(script), "--night", "--", sys.executable, "-c",
                          "print('RAN'); raise SystemExit(3)"],
                         capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert ("RAN" in out.stdout.split()) == runs, out.stdout + out.stderr
    assert out.returncode == (3 if runs else 4)  # running: the command's status (3: a missed floor); refused: 4
    bad = subprocess.run([sys.executable, str(script), "--night", "--", "true"], capture_output=True, text=True,
                         timeout=60, env={**env, "DERMRAY_NIGHTLY_WINDOW_S": "two hours"})
    assert bad.returncode == 2


class FakeKube(ThreadingHTTPServer):
    """Just enough of the API server for the launcher: RayJobs (which finish after a few reads, as KubeRay would
    move them along), one RayCronJob and Leases (optimistic concurrency by resourceVersion) in one namespace."""

    def __init__(self, cron: dict, ns: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ns, self.cron, self.rayjobs, self.leases, self.calls = ns, cron, {}, {}, []
        self.hide_existing = 0  # GETs of an existing RayJob still answered 404 (a concurrent creator)
        self.create_status = None  # force an error on POST
        self.outcome = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}  # what a new RayJob ends as
        self.reads_to_finish = 3
        self.reads: dict[str, int] = {}
        self.launched: set[str] = set()  # created through the API: KubeRay runs them

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def do_GET(self):  # noqa: N802
        s: FakeKube = self.server
        path = urllib.parse.urlparse(self.path).path
        s.calls.append(("GET", path))
        base = f"/apis/ray.io/v1/namespaces/{s.ns}"
        if path == f"{base}/raycronjobs/{s.cron['metadata']['name']}":
            return self._send(200, s.cron)
        if path.startswith(f"{base}/rayjobs/"):
            name = path.rsplit("/", 1)[1]
            if name in s.rayjobs and s.hide_existing:
                s.hide_existing -= 1
            elif name in s.rayjobs:
                job = s.rayjobs[name]
                if "status" not in job or job["status"].get("jobDeploymentStatus") not in ("Complete", "Failed"):
                    s.reads[name] = s.reads.get(name, 0) + 1  # KubeRay moves a launched night along
                    if s.reads[name] >= s.reads_to_finish and name in s.launched:
                        job["status"] = dict(s.outcome)
                    elif name in s.launched:
                        job["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
                return self._send(200, job)
            return self._send(404, {"reason": "NotFound"})
        if path.startswith(f"/apis/coordination.k8s.io/v1/namespaces/{s.ns}/leases/"):
            name = path.rsplit("/", 1)[1]
            return self._send(200, s.leases[name]) if name in s.leases else self._send(404, {"reason": "NotFound"})
        self._send(404, {"reason": "NotFound"})

    def do_POST(self):  # noqa: N802
        s: FakeKube = self.server
        body = self._body()
        s.calls.append(("POST", self.path))
        name = body["metadata"]["name"]
        if self.path == f"/apis/coordination.k8s.io/v1/namespaces/{s.ns}/leases":
            if name in s.leases:
                return self._send(409, {"reason": "AlreadyExists"})
            body["metadata"]["resourceVersion"] = "1"
            s.leases[name] = body
            return self._send(201, body)
        if s.create_status:
            return self._send(s.create_status, {"message": "boom"})
        if name in s.rayjobs:
            return self._send(409, {"reason": "AlreadyExists", "message": f"rayjobs {name!r} already exists"})
        s.rayjobs[name] = body
        s.launched.add(name)
        self._send(201, body)

    def do_PUT(self):  # noqa: N802
        s: FakeKube = self.server
        body = self._body()
        s.calls.append(("PUT", self.path))
        name = self.path.rsplit("/", 1)[1]
        if name not in s.leases or body["metadata"].get("resourceVersion") != s.leases[name]["metadata"][
                "resourceVersion"]:
            return self._send(409, {"reason": "Conflict"})
        body["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)
        s.leases[name] = body
        self._send(200, body)


@pytest.fixture
def launcher(tmp_path):
    docs = render_standing("dev")
    cron = one(docs, "RayCronJob", SCHEDULE_TEMPLATE)
    assert cron["spec"]["suspend"] is True  # the launcher's template, never scheduled by KubeRay itself
    cj = one(docs, "CronJob", "dermray-nightly")
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    mount = c["volumeMounts"][0]
    cm = one(docs, "ConfigMap", next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]["name"])
    script_rel = pathlib.PurePosixPath(c["command"][-1]).relative_to(mount["mountPath"])
    script = tmp_path / "launcher" / script_rel
    script.parent.mkdir()
    script.write_text(cm["data"][str(script_rel)])
    assert c["command"][0] == "python"
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    server = FakeKube(cron, "dermray-dev")
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def run(job_name: str, job_uid: str = "uid-1") -> subprocess.CompletedProcess:
        full = {**env, "PATH": "/usr/bin:/bin", "POD_NAMESPACE": "dermray-dev", "JOB_NAME": job_name,
                "JOB_UID": job_uid, "KUBERNETES_API_URL": server.url, "SA_DIR": str(tmp_path / "no-sa"),
                "DERMRAY_POLL_S": "0.01"}
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=full, timeout=60)

    yield server, run, cron
    server.shutdown()
    server.server_close()


def _job_name(t: dt.datetime) -> str:  # what the CronJob controller names the Job for scheduled time t
    return f"dermray-nightly-{int(t.timestamp()) // 60}"


def _tonight() -> dt.datetime:  # a schedule a few minutes ago, as the CronJob controller would have just served it
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)).replace(second=0, microsecond=0)


def test_the_launcher_creates_one_rayjob_per_night_and_waits_for_its_outcome(launcher):
    server, run, cron = launcher
    night = _tonight()
    name = f"dermray-nightly-{night:%Y%m%d}"
    first = run(_job_name(night))
    assert first.returncode == 0, first.stderr
    assert f"RayJob {name} succeeded" in first.stdout and "Running RUNNING" in first.stdout
    assert list(server.rayjobs) == [name]
    job = server.rayjobs[name]
    spec = json.loads(json.dumps(cron["spec"]["jobTemplate"]))
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for e in head["env"]:  # the one nightly spec, copied whole: unsuspended, with the night it stands for
        if e["name"] == "DERMRAY_NIGHTLY_SCHEDULED_FOR":
            e["value"] = f"{night:%Y-%m-%dT%H:%M:%SZ}"
    assert job["spec"] == {**spec, "suspend": False}
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "dermray" and labels["dermray/job"] == "nightly"
    assert labels["dermray/night"] == f"{night:%Y%m%d}"
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": _job_name(night), "uid": "uid-1"}]
    assert server.leases["dermray-nightly"]["spec"]["holderIdentity"] == name
    if CRD_DIR.is_dir():
        assert validate(job) == [] and operator_errors(job) == []

    posts = sum(1 for m, _ in server.calls if m == "POST")
    again = run(_job_name(night))  # the Job's retry, or a second pod: waits for the same RayJob
    assert again.returncode == 0 and "exists already" in again.stdout
    assert sum(1 for m, _ in server.calls if m == "POST") == posts and len(server.rayjobs) == 1

    server.hide_existing = 1  # a concurrent pod created it between our GET and POST: AlreadyExists is fine
    race = run(_job_name(night))
    assert race.returncode == 0 and "AlreadyExists" in race.stdout and len(server.rayjobs) == 1


def test_the_launcher_never_overlaps_nights_and_fails_loudly(launcher):
    server, run, _ = launcher
    n2 = _tonight()
    n1 = n2 - dt.timedelta(days=1)
    held = f"dermray-nightly-{n1:%Y%m%d}"  # yesterday's night, still running, holds the slot
    server.rayjobs[held] = {"metadata": {"name": held}, "status": {"jobDeploymentStatus": "Running"}}
    server.leases["dermray-nightly"] = {"metadata": {"name": "dermray-nightly", "resourceVersion": "7"},
                                        "spec": {"holderIdentity": held}}
    blocked = run(_job_name(n2))
    assert blocked.returncode == 4 and f"RayJob {held} is still active" in blocked.stderr
    assert list(server.rayjobs) == [held]
    server.rayjobs[held]["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    assert run(_job_name(n2)).returncode == 0  # yesterday's is over: the lease passes on (resourceVersion 7 -> 8)
    tonight = f"dermray-nightly-{n2:%Y%m%d}"
    assert server.leases["dermray-nightly"]["spec"]["holderIdentity"] == tonight
    assert server.leases["dermray-nightly"]["metadata"]["resourceVersion"] == "8"

    server.outcome = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"}
    by_hand = run("nightly-by-hand")  # `kubectl create job --from=cronjob/...`: a name of its own, never tonight's
    assert by_hand.returncode == 3 and "failed: AppFailed" in by_hand.stderr  # the night's failure is the Job's
    (manual,) = set(server.rayjobs) - {held, tonight}
    assert re.fullmatch(r"dermray-nightly-manual-\d{12}", manual)
    assert server.rayjobs[manual]["metadata"]["labels"]["dermray/night"] == "manual"

    stale = run(_job_name(n2 - dt.timedelta(hours=3)))  # the CronJob's Job started 3 h after its schedule
    assert stale.returncode == 4 and "stale launch" in stale.stderr
    server.rayjobs.clear()
    server.leases.clear()
    server.create_status = 500
    failed = run(_job_name(n2))
    assert failed.returncode == 1 and "HTTP 500" in failed.stderr  # an API error: the Job runs the pod again
