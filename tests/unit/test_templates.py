"""The pages dermray writes are Jinja2 templates (dermray/templates/, core/templating.py): the HTML ones escape every
value they are given (a task, class, image or run named with markup shows as text), the Markdown ones write values
as they are, a name a template uses that it was not given is an error, and the templates ship in the wheel."""
import pathlib
import types

import jinja2
import pandas as pd
import pytest
import tomllib

from dermray.core import templating
from dermray.core.evaluation_tasks import Task, TaskClass
from dermray.core.report import render_report
from dermray.stages.saliency.gallery import gallery_html
from dermray.stages.saliency.sanity import sanity_result

REPO = pathlib.Path(__file__).resolve().parents[2]
EVIL = "<b>&\"x'"
ESCAPED = "&lt;b&gt;&amp;&#34;x&#39;"  # markupsafe's spelling


def binary_task(name: str) -> Task:
    return Task(name, (TaskClass("melanoma" + EVIL, (0,)), TaskClass("nevus", (1,))), positive="melanoma" + EVIL)


def metric(task: str, name: str, value, n=40, lo=None, hi=None, note=None, subset="all") -> dict:
    return {"task": task, "subset": subset, "metric": name, "value": value, "ci_low": lo, "ci_high": hi, "n": n,
            "note": note}


def test_the_report_escapes_a_task_named_with_markup_and_its_markdown_keeps_it():
    task = "mel" + EVIL
    t = types.SimpleNamespace(metrics=[metric(task, "auc", 0.81, lo=0.7, hi=0.9), metric(task, "n_positive", 12),
                                       metric(task, "auc_note", None, note="undefined " + EVIL)])
    summary = {"run_id": "run" + EVIL, "images": 40, "lesions": 30, "model_ids": ["m" + EVIL],
               "lineage": {"id": "lin" + EVIL}}
    md, page = render_report(summary, t, {f"roc_{task}_all.png": b"\x89PNG"}, [binary_task(task)], "card" + EVIL)
    assert EVIL not in page and "<b>&" not in page
    for shown in (f"data-task='mel{ESCAPED}'", f"<h2>mel{ESCAPED}</h2>", f"run run{ESCAPED}</h1>",
                  f"<td>undefined {ESCAPED}</td>", f"alt='roc_mel{ESCAPED}_all.png'", f"href='card{ESCAPED}'",
                  f"evaluation lin{ESCAPED}; model m{ESCAPED}</p>"):
        assert shown in page, shown
    # Markdown is not escaped (as before the templates): the names are written as they are
    assert f"## mel{EVIL} (all)" in md and f"# dermray evaluation — run `run{EVIL}`" in md
    assert f"Model card: card{EVIL}" in md and "&lt;" not in md
    assert "**AUC 0.810 [0.700, 0.900]**; no locked operating point. 40 images." in md


def test_the_gallery_escapes_names_with_markup():
    task = binary_task("mel_vs_nev" + EVIL)
    index = pd.DataFrame({"task": [task.name] * 2, "true_class": ["melanoma" + EVIL] * 2,
                          "image_id": ["ISIC_1" + EVIL] * 2, "method": ["gradcam" + EVIL, "gradient"],
                          "png_uri": ["/out/s/r/gradcam/ISIC_1.png", "/out/s/r/gradient/ISIC_1.png"],
                          "blank_map": [True, False], "score": [0.91234, 0.91234], "reason": ["top" + EVIL] * 2,
                          "target": ["melanoma" + EVIL] * 2})
    rows = [{"method": "gradcam" + EVIL, "level": lv, "randomised": f"to {lv}" + EVIL, "spearman": s, "ssim": s,
             "n_images": 8, "constant_maps": 0} for lv, s in ((0, 1.0), (1, 0.9))]
    checked = sanity_result(rows, 0.5)  # similarity stays high: flagged
    page = gallery_html(types.SimpleNamespace(run_id="r" + EVIL), index, checked, [task], "/out/s/r")
    assert EVIL not in page and "<b>&" not in page
    for shown in (f"<title>dermray saliency r{ESCAPED}</title>", f"<h2>mel vs nev{ESCAPED}</h2>",
                  f"<h3>melanoma{ESCAPED} (1 images)</h3>", f"<b>ISIC_1{ESCAPED}</b><br>score 0.912 (top{ESCAPED}), "
                  f"target melanoma{ESCAPED}", f"<div>gradcam{ESCAPED} <span class=blank>blank</span><br>"
                  f"<img src='gradcam/ISIC_1.png' alt='ISIC_1{ESCAPED} gradcam{ESCAPED}'></div>",
                  f"<td>gradcam{ESCAPED}</td><td>to 1{ESCAPED}</td><td>0.900</td>",
                  f"<p class='flag'>gradcam{ESCAPED}: maps barely change", "<h3>nevus (0 images)</h3>"
                  "<div class='row'><p>none</p></div>"):
        assert shown in page, shown


def test_a_name_a_template_was_not_given_is_an_error_not_an_empty_string():
    env = templating.environment()
    with pytest.raises(jinja2.UndefinedError, match="tsk"):
        env.from_string("<h2>{{ card.tsk }}</h2>").render(card={"task": "t"})
    with pytest.raises(jinja2.UndefinedError, match="run_id"):
        templating.render("gallery.html.j2", tasks=[], sanity=[])


def test_html_templates_are_escaped_markdown_ones_are_not_and_all_ship_in_the_wheel():
    env = templating.environment()
    names = env.list_templates()
    assert {"report.html.j2", "report.md.j2", "gallery.html.j2", "model_card.md.j2", "ensemble_card.md.j2"} <= set(
        names)
    assert all(env.autoescape(n) == (not n.endswith(".md.j2")) for n in names)
    assert env.from_string("{{ x }}").render(x=EVIL) == ESCAPED  # a template from text is escaped too
    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dermray"]
    assert all(any(pathlib.PurePath("templates", n).match(glob) for glob in shipped) for n in names), shipped
