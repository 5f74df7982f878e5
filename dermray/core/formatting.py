"""How numbers are written for people - three decimals, an em dash for an undefined value - and the external
validation's rows (each cohort beside its reference), shared by the report, the model cards and the summaries the
commands print. Pure: no I/O."""
from __future__ import annotations

import math


def fmt(v) -> str:
    """A metric for people: 3 decimals, an em dash when undefined."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def auc_cell(r: dict | None) -> str:
    if r is None:
        return "—"
    ci = f" [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if r.get("ci_low") is not None else ""
    return f"{fmt(r['value'])}{ci}, n={r['n']}"


def external_rows(metrics: list[dict]) -> list[list[str]]:
    """Each cohort beside the reference, per task and subset: [task, subset, cohort, its AUC, the reference, the
    reference's AUC, the difference with its CI] (from evaluate's ``cohort=<name>:<subset>`` rows)."""
    auc = {(r["task"], r["subset"]): r for r in metrics if r["metric"] == "auc" and r["subset"].startswith("cohort=")}
    rows = []
    for r in metrics:
        if r["metric"] != "auc_difference":
            continue
        cohort, subset = r["subset"][len("cohort="):].split(":", 1)
        reference = (r.get("note") or "").split(" minus ", 1)[1].split(" (", 1)[0] if " minus " in (
            r.get("note") or "") else "?"
        rows.append([r["task"], subset, cohort, auc_cell(auc.get((r["task"], r["subset"]))), reference,
                     auc_cell(auc.get((r["task"], f"cohort={reference}:{subset}"))),
                     f"{fmt(r['value'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"])
    return rows


def flagged_points(headline: list[dict]) -> list[str]:
    """One warning per task whose locked operating points do not carry over to the evaluated data (the headline's
    ``carries_over@locked:<point>`` rows that are 0: evaluate.carry_over_verdict), naming the points; each
    point's subsets and reason are in the metrics' note and the report."""
    flagged: dict[str, dict[str, list[str]]] = {}
    for h in headline:
        if h["metric"].startswith("carries_over@") and h["value"] == 0:
            point = h["metric"].split("@locked:", 1)[-1]
            flagged.setdefault(h["task"], {}).setdefault(point, []).append(h["subset"])
    # One console line each (<= 120 columns): the subsets and reasons are in the report and the metrics' notes.
    if len(flagged) == 1:
        task, points = next(iter(flagged.items()))
        return [f"warning: {task}: locked {','.join(points)} do not carry over: see the report"]
    line = f"warning: locked points do not carry over in {len(flagged)} tasks ({', '.join(flagged)}): see the report"
    return [line if len(line) <= 118 else f"warning: locked points do not carry over in {len(flagged)} tasks: see "
            "the report"] if flagged else []


def _json_safe(value):
    """``value`` with every float that JSON cannot hold (NaN, ±Infinity) as None, numpy scalars and arrays as Python
    numbers and lists, tuples and sets as lists, and anything else JSON has no type for as its ``str``."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, without importing numpy here
    if callable(tolist):
        return _json_safe(tolist())
    return str(value)


def strict_json(value, indent: int | None = 2) -> str:
    """JSON that every parser reads (RFC 8259): an undefined number (NaN, ±Infinity) is ``null`` - Python's json
    module would write the bare ``NaN`` that strict parsers (browsers' JSON.parse, jq, most other languages) refuse.
    Every summary, model card and record dermray writes goes through here."""
    import json

    return json.dumps(_json_safe(value), indent=indent, allow_nan=False)


def duration(value: float | None) -> str:
    """A duration for people: 0.2s, 7.5s, 52s, 4m09s, 1h02m; "?" when unknown."""
    if value is None or value != value or value < 0:
        return "?"
    if value < 10:
        return f"{value:.1f}s"
    s = int(round(value))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def rate(value: float) -> str:
    """A rate for people, three significant figures at most below 1,000 and whole numbers above: 147,072 (not
    147071.9), 52.4, 3.07."""
    if value != value:
        return "?"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
