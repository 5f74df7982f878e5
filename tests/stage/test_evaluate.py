"""The evaluation stage on a synthetic but complete study: taxonomy, partition membership, predictions with
subsets, readers; values checked against scikit-learn computed independently in the test."""
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from dermray.cli import main
from dermray.core.evaluation_tasks import parse_tasks
from dermray.core.partitioning import node_to_class, partition_classes, task_membership
from dermray.core.taxonomy import Taxonomy
from dermray.runtime.config import load_config
from dermray.stages import evaluate

LEAVES = ["Benign:Nevus:Blue", "Benign:Nevus:Common", "Benign:SK", "Malignant:Melanoma:Invasive",
          "Malignant:Melanoma:InSitu", "Malignant:BCC", "Other:Eczema"]
TASKS = {"tasks": {
    "mel_vs_nev": {"positive": "melanoma", "classes": {"melanoma": ["Malignant:Melanoma"],
                                                       "nevus": ["Benign:Nevus"]}},
    "three": {"classes": {"benign": ["Benign"], "malignant": ["Malignant"], "other": ["Other"]}},
}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    tax = Taxonomy.from_paths(LEAVES)
    pq.write_table(tax.to_table(), d / "taxonomy.parquet")
    (d / "tasks.yaml").write_text(yaml.safe_dump(TASKS))
    tasks = parse_tasks(TASKS, tax)
    rng = np.random.default_rng(0)
    n = 800
    leaf = rng.choice(LEAVES, n, p=[0.2, 0.25, 0.15, 0.12, 0.08, 0.1, 0.1])
    own = np.zeros(len(tax), np.int64)
    for lab in leaf:
        own[tax.index[lab]] += 1
    classes = partition_classes(tax, own, 150)
    lookup = node_to_class(tax, classes)
    rows, bad = task_membership(tax, classes, tasks, own)
    assert not bad
    (d / "partition").mkdir()
    pq.write_table(pa.table({"task": [r[0] for r in rows], "task_class": [r[1] for r in rows],
                             "class_index": pa.array([r[2] for r in rows], pa.int32()),
                             "node_id": [classes[r[2]].node_id for r in rows]}),
                   d / "partition" / "task_membership.parquet")
    true_class = lookup[[tax.index[x] for x in leaf]]
    logits = rng.normal(0, 1.0, (n, len(classes)))
    logits[np.arange(n), true_class] += 1.6
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    groups = [f"L{i // 2}" for i in range(n)]
    modality = np.where(rng.random(n) < 0.5, "dermoscopy", "clinical")
    # The clinical photos in this study are all of nevi or eczema: no melanoma there (an undefined AUC).
    modality[np.isin(leaf, ["Malignant:Melanoma:Invasive", "Malignant:Melanoma:InSitu"])] = "dermoscopy"
    df = pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "model_id": "m1", "label": leaf,
                       "label_source": np.where(rng.random(n) < 0.6, "biopsy", "clinical"),
                       "modality": modality, "group_id": groups, "sex": rng.choice(["female", "male"], n),
                       "age": rng.integers(20, 90, n).astype(float)})
    # Ten nevi to which the model gives no melanoma and no nevus probability at all.
    eczema = [c.class_index for c in classes if c.node_id.startswith("Other")]
    nevus_rows = np.flatnonzero(np.char.startswith(leaf.astype(str), "Benign:Nevus"))[:10]
    probs[nevus_rows] = 0.0
    probs[nevus_rows, eczema[0]] = 1.0
    table = pa.Table.from_pandas(df, preserve_index=False).append_column(
        "probs", pa.array(list(probs.astype(np.float32)), pa.list_(pa.float32())))
    pq.write_table(table, d / "predictions.parquet")
    # Readers: 6 dermatologists on 200 melanoma/nevus images.
    mel_nev = df[np.char.startswith(leaf.astype(str), "Malignant:Melanoma") |
                 np.char.startswith(leaf.astype(str), "Benign:Nevus")].head(200)
    truth = mel_nev["label"].str.startswith("Malignant").to_numpy()
    readers = []
    for r in range(6):
        sens, spec = 0.6 + 0.05 * r, 0.85 - 0.05 * r
        called = np.where(truth, rng.random(len(truth)) < sens, rng.random(len(truth)) > spec)
        readers += [{"reader_id": f"derm{r}", "image_id": i, "task": "mel_vs_nev", "decision": int(c)}
                    for i, c in zip(mel_nev["image_id"], called)]
    pq.write_table(pa.Table.from_pylist(readers), d / "readers.parquet")
    return {"dir": d, "df": df, "probs": probs, "classes": classes, "tax": tax, "rows": rows}


def independent_score(study, task, positive, negative):
    """P(pos) / (P(pos) + P(neg)) computed from the training classes' nodes, without the stage's code."""
    def under(node_id, prefix):
        return node_id == prefix or node_id.startswith(prefix + ":")

    p = study["probs"]
    pos = sum(p[:, c.class_index] for c in study["classes"] if under(c.node_id, positive))
    neg = sum(p[:, c.class_index] for c in study["classes"] if under(c.node_id, negative))
    with np.errstate(invalid="ignore"):
        return pos / (pos + neg)


def run_eval(study, tmp_path, *extra):
    d = study["dir"]
    out = tmp_path / "out"
    cfg = load_config(None, [f"evaluate.predictions={d / 'predictions.parquet'}", f"data.tasks={d / 'tasks.yaml'}",
                             f"data.taxonomy={d / 'taxonomy.parquet'}", f"evaluate.partition={d / 'partition'}",
                             f"output={out}", "run_id=r1", "evaluate.n_bootstrap=200", *extra])
    summary = evaluate.run(cfg)
    base = out / "metrics" / "r1"
    metrics = pd.read_parquet(base / "metrics.parquet")
    return summary, metrics, base


def value(metrics, task, subset, metric):
    row = metrics[(metrics.task == task) & (metrics.subset == subset) & (metrics.metric == metric)]
    assert len(row) == 1, (task, subset, metric)
    return row.iloc[0]


def test_binary_metrics_match_sklearn_on_every_subset(study, tmp_path):
    summary, metrics, base = run_eval(study, tmp_path, f"evaluate.readers={study['dir'] / 'readers.parquet'}",
                                      "evaluate.subgroups=[sex, 'age:0/50/120']")
    df = study["df"]
    score = independent_score(study, "mel_vs_nev", "Malignant:Melanoma", "Benign:Nevus")
    in_task = df["label"].str.startswith("Malignant:Melanoma") | df["label"].str.startswith("Benign:Nevus")
    y = df["label"].str.startswith("Malignant").to_numpy()
    m_all = in_task.to_numpy() & ~np.isnan(score)
    for subset, mask in [("all", in_task), ("biopsy", in_task & (df.label_source == "biopsy")),
                         ("sex=male", in_task & (df.sex == "male")), ("age=[50,120)", in_task & (df.age >= 50))]:
        m = mask.to_numpy() & ~np.isnan(score)
        row = value(metrics, "mel_vs_nev", subset, "auc")
        assert abs(row.value - roc_auc_score(y[m], score[m])) < 1e-9, subset
        assert row.ci_low < row.value < row.ci_high and row.n == m.sum()
        sens = value(metrics, "mel_vs_nev", subset, "sensitivity@0.5").value
        assert abs(sens - (score[m][y[m]] >= 0.5).mean()) < 1e-12
    undefined = value(metrics, "mel_vs_nev", "modality=clinical", "auc")
    assert pd.isna(undefined.value) and "no positives" in undefined.note
    excluded = value(metrics, "mel_vs_nev", "all", "excluded_undefined_score")
    assert excluded.value == 10 and "no probability" in excluded.note
    assert summary["excluded"]["mel_vs_nev"]["undefined_score"] == 10
    # No value is NaN without a note saying why.
    assert metrics.loc[metrics.value.isna(), "note"].notna().all()
    # Readers: one point each, and the stage's count of readers below the curve agrees with its own table.
    readers = pd.read_parquet(base / "readers.parquet")
    all_readers = readers[readers.subset == "all"]
    assert len(all_readers) == 6
    assert value(metrics, "mel_vs_nev", "all", "readers_below_model_curve").value == all_readers.below_model_curve.sum()
    assert abs(value(metrics, "mel_vs_nev", "all", "readers_mean_specificity").value
               - all_readers.specificity.mean()) < 1e-12
    roc = pd.read_parquet(base / "roc.parquet")
    assert {"threshold", "fpr", "tpr"} <= set(roc.columns) and (roc.groupby(["task", "subset"]).size() > 2).all()
    # The paper's comparison at the readers' mean point, with lesion-bootstrap intervals, checked against
    # scikit-learn's ROC curve on the same images.
    fpr, tpr, _ = roc_curve(y[m_all], score[m_all], drop_intermediate=False)
    mean_spec, mean_sens = all_readers.specificity.mean(), all_readers.sensitivity.mean()
    at_spec = value(metrics, "mel_vs_nev", "all", "model_sensitivity_at_readers_mean_specificity")
    assert abs(at_spec.value - tpr[(1 - fpr) >= mean_spec - 1e-12].max()) < 1e-12
    at_sens = value(metrics, "mel_vs_nev", "all", "model_specificity_at_readers_mean_sensitivity")
    assert abs(at_sens.value - (1 - fpr[tpr >= mean_sens - 1e-12]).max()) < 1e-12
    for row in (at_spec, at_sens):
        assert row.ci_low <= row.value <= row.ci_high and row.ci_high - row.ci_low > 0
    below = value(metrics, "mel_vs_nev", "all", "readers_below_model_curve")
    assert below.note == f"{int(below.value)} of 6 readers lie below the model's ROC curve"


def test_multiclass_accuracy_confusion_and_calibration(study, tmp_path):
    _, metrics, base = run_eval(study, tmp_path)
    df, p = study["df"], study["probs"]
    top = {"Benign": 0, "Malignant": 1, "Other": 2}
    tp = np.zeros((len(df), 3))
    for c in study["classes"]:
        tp[:, top[c.node_id.split(":")[0]]] += p[:, c.class_index]
    y = df["label"].str.split(":").str[0].map(top).to_numpy()
    ties = (tp == tp.max(1, keepdims=True)).sum(1) > 1
    acc = ((tp.argmax(1) == y) & ~ties).mean()
    row = value(metrics, "three", "all", "accuracy")
    assert abs(row.value - acc) < 1e-12 and row.ci_low <= row.value <= row.ci_high
    confusion = pd.read_parquet(base / "confusion.parquet")
    assert confusion[(confusion.task == "three") & (confusion.subset == "all")]["n"].sum() == len(df)
    cal = pd.read_parquet(base / "calibration.parquet")
    assert cal[(cal.task == "mel_vs_nev") & (cal.subset == "all")]["n"].sum() == value(
        metrics, "mel_vs_nev", "all", "auc").n


def test_report_renders_with_images(study, tmp_path):
    summary, _, base = run_eval(study, tmp_path, f"evaluate.readers={study['dir'] / 'readers.parquet'}")
    page = (base / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "mel_vs_nev" in page
    md = (base / "report.md").read_text()
    assert "| mel_vs_nev | all | auc |" in md
    # The first lines of each binary task's card answer the paper's question (issue 29).
    card = md[md.index("## mel_vs_nev"):].splitlines()
    assert card[2].startswith("**AUC ")  # the headline, then the answer
    answer = card[4]
    assert answer.startswith("**Against 6 dermatologists (mean sensitivity ") and " of 6 lie below its ROC curve" in \
        answer, answer
    assert "at their mean specificity the CNN's sensitivity is " in answer and "at their mean sensitivity its " \
        "specificity is " in answer
    assert "Against 6 dermatologists" in page
    # A multi-class card leads with balanced accuracy and gives each class's recall.
    three = md[md.index("## three"):].splitlines()[2]
    assert three.startswith("**balanced accuracy ") and "; accuracy " in three and "recall per class: " in three
    assert all(f"{name} " in three.split("recall per class: ")[1] for name in ("benign", "malignant", "other"))
    pngs = list((base / "plots").glob("*.png"))
    assert any(p.name == "roc_mel_vs_nev_all.png" for p in pngs)
    for png in pngs:
        Image.open(io.BytesIO(png.read_bytes())).verify()
    assert "mel_vs_nev" in evaluate.format_summary(summary)


def test_delong_comparison_of_two_runs(study, tmp_path):
    d = study["dir"]
    t = pq.read_table(d / "predictions.parquet")
    noisy = np.asarray(t.column("probs").combine_chunks().flatten()).reshape(t.num_rows, -1)
    noisy = noisy + np.random.default_rng(1).uniform(0, 0.2, noisy.shape).astype(np.float32)
    other = t.set_column(t.column_names.index("probs"), "probs",
                         pa.array(list(noisy / noisy.sum(1, keepdims=True)), pa.list_(pa.float32())))
    pq.write_table(other, tmp_path / "other.parquet")
    _, metrics, _ = run_eval(study, tmp_path, f"evaluate.compare={tmp_path / 'other.parquet'}")
    p = value(metrics, "mel_vs_nev", "all", "delong_p_value").value
    diff = value(metrics, "mel_vs_nev", "all", "delong_auc_diff")
    assert 0 <= p <= 1 and diff.ci_low < diff.value < diff.ci_high


def test_distributed_histogram_path_agrees_with_exact_auc(study, tmp_path, ray_local):
    _, exact, _ = run_eval(study, tmp_path)
    out = tmp_path / "dist"
    d = study["dir"]
    cfg = load_config(None, [f"evaluate.predictions={d / 'predictions.parquet'}", f"data.tasks={d / 'tasks.yaml'}",
                             f"data.taxonomy={d / 'taxonomy.parquet'}", f"evaluate.partition={d / 'partition'}",
                             f"output={out}", "run_id=r1", "evaluate.distributed=true"])
    s = evaluate.run(cfg)
    dist = pd.read_parquet(out / "metrics" / "r1" / "metrics.parquet")
    for subset in ("all", "biopsy", "modality=dermoscopy"):
        a = value(exact, "mel_vs_nev", subset, "auc").value
        b = value(dist, "mel_vs_nev", subset, "auc").value
        assert abs(a - b) < 1e-4, (subset, a, b)
        assert value(dist, "mel_vs_nev", subset, "sensitivity@0.5").value == pytest.approx(
            value(exact, "mel_vs_nev", subset, "sensitivity@0.5").value, abs=1e-12)
    assert s["mode"] == "distributed"


def test_bad_inputs_give_one_line_errors(study, tmp_path, capsys):
    d = study["dir"]
    t = pq.read_table(d / "predictions.parquet")
    pq.write_table(t.drop_columns(["label"]), tmp_path / "nolabel.parquet")
    two = pa.concat_tables([t, t.set_column(1, "model_id", pa.array(["m2"] * t.num_rows))])
    pq.write_table(two, tmp_path / "two.parquet")
    base = ["evaluate", "--tasks", str(d / "tasks.yaml"), "--taxonomy", str(d / "taxonomy.parquet"),
            "--partition", str(d / "partition"), "--output", str(tmp_path / "o"), "--set", "evaluate.n_bootstrap=20"]
    cases = [("nolabel.parquet", [], "need the manifest's 'label' column"),
             ("two.parquet", [], "choose one with evaluate.model_id"),
             ("missing.parquet", [], "no such file"),
             ("two.parquet", ["--model-id", "m9"], "no predictions of model_id 'm9'")]
    for name, extra, fragment in cases:
        assert main([*base, "--predictions", str(tmp_path / name), *extra]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert main([*base, "--predictions", str(tmp_path / "two.parquet"), "--model-id", "m2"]) == 0


def test_subgroups_get_a_verdict_worst_group_and_largest_gap(study, tmp_path):
    """Per subgroup column: the worst group's AUC (named in the note) and the gap between the best and the worst
    group with a bootstrap CI - the form in which skin-tone results are judged."""
    _, metrics, _ = run_eval(study, tmp_path, "evaluate.subgroups=[sex, 'age:0/40/60/120']")
    df = study["df"]
    score = independent_score(study, "mel_vs_nev", "Malignant:Melanoma", "Benign:Nevus")
    in_task = (df["label"].str.startswith("Malignant:Melanoma") | df["label"].str.startswith("Benign:Nevus")).to_numpy()
    y = df["label"].str.startswith("Malignant").to_numpy()
    aucs = {}
    for lo, hi in ((0, 40), (40, 60), (60, 120)):
        m = in_task & ~np.isnan(score) & (df.age >= lo).to_numpy() & (df.age < hi).to_numpy()
        aucs[f"age=[{lo},{hi})"] = roc_auc_score(y[m], score[m])
    worst = value(metrics, "mel_vs_nev", "by:age", "worst_group_auc")
    assert abs(worst.value - min(aucs.values())) < 1e-9 and min(aucs, key=aucs.get) in worst.note
    gap = value(metrics, "mel_vs_nev", "by:age", "auc_gap")
    assert abs(gap.value - (max(aucs.values()) - min(aucs.values()))) < 1e-9
    assert gap.ci_low <= gap.value <= gap.ci_high  # a signed interval: it may reach below 0 (issue 28, finding 2)
    assert value(metrics, "mel_vs_nev", "by:sex", "auc_gap").value >= 0
    # The modality column has one group with an undefined AUC (no melanoma in the clinical photos): no verdict.
    assert metrics[(metrics.subset == "by:modality")].empty


def test_external_validation_compares_cohorts_with_an_unpaired_ci(study, tmp_path):
    """A cohort column (or a reference run): each cohort's AUC and its difference from the reference cohort with a
    CI from lesion bootstraps of each cohort apart; the difference equals the two AUCs' difference computed
    independently, and appears in the report and the headline."""
    d = study["dir"]
    df = pd.read_parquet(d / "predictions.parquet")
    rng = np.random.default_rng(5)
    lesion = df["group_id"].to_numpy()
    ext = np.isin(lesion, np.unique(lesion)[rng.random(len(np.unique(lesion))) < 0.4])
    df["cohort"] = np.where(ext, "clinic_b", "internal")
    probs = np.stack(df["probs"])
    noisy = probs.copy()
    noisy[ext] = 0.5 * probs[ext] + 0.5 * rng.dirichlet(np.ones(probs.shape[1]), ext.sum())  # worse at clinic b
    df["probs"] = list(noisy.astype(np.float32))
    df.to_parquet(tmp_path / "cohorts.parquet", index=False)
    out = tmp_path / "out"
    cfg = load_config(None, [f"evaluate.predictions={tmp_path / 'cohorts.parquet'}", f"data.tasks={d / 'tasks.yaml'}",
                             f"data.taxonomy={d / 'taxonomy.parquet'}", f"evaluate.partition={d / 'partition'}",
                             f"output={out}", "run_id=ext", "evaluate.n_bootstrap=200", "evaluate.cohort=cohort"])
    summary = evaluate.run(cfg)
    m = pd.read_parquet(out / "metrics" / "ext" / "metrics.parquet")
    diff = value(m, "mel_vs_nev", "cohort=clinic_b:all", "auc_difference")
    a_ext = value(m, "mel_vs_nev", "cohort=clinic_b:all", "auc").value
    a_int = value(m, "mel_vs_nev", "cohort=internal:all", "auc").value
    score = independent_score(study, "mel_vs_nev", "Malignant:Melanoma", "Benign:Nevus")
    y = df["label"].str.startswith("Malignant").to_numpy()
    in_task = (df["label"].str.startswith("Malignant:Melanoma") | df["label"].str.startswith("Benign:Nevus")).to_numpy()
    keep = in_task & ~ext & ~np.isnan(score)
    assert abs(a_int - roc_auc_score(y[keep], score[keep])) < 1e-9  # the internal cohort kept its scores
    assert abs(diff.value - (a_ext - a_int)) < 1e-12 and diff.value < 0 and diff.ci_low < diff.value < diff.ci_high
    assert "clinic_b minus internal" in diff.note
    assert any(h["metric"] == "auc_difference" for h in summary["headline"])
    assert "External validation" in (out / "metrics" / "ext" / "report.html").read_text()
    # The report puts each cohort beside the reference: both AUCs with CIs, then the difference with its CI.
    row = next(ln for ln in (out / "metrics" / "ext" / "report.md").read_text().splitlines()
               if ln.startswith("| mel_vs_nev | all | clinic_b |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith(f"{a_ext:.3f} [") and cells[4] == "internal" and cells[5].startswith(f"{a_int:.3f} [")
    assert cells[6].startswith(f"{diff.value:.3f} [{diff.ci_low:.3f}, {diff.ci_high:.3f}]"), cells
    # A reference run instead of a cohort column: the same two AUCs and their difference.
    df[~ext].to_parquet(tmp_path / "internal.parquet", index=False)
    df[ext].to_parquet(tmp_path / "external.parquet", index=False)
    cfg = load_config(None, [f"evaluate.predictions={tmp_path / 'external.parquet'}", f"data.tasks={d / 'tasks.yaml'}",
                             f"data.taxonomy={d / 'taxonomy.parquet'}", f"evaluate.partition={d / 'partition'}",
                             f"output={out}", "run_id=ref", "evaluate.n_bootstrap=200",
                             f"evaluate.reference={tmp_path / 'internal.parquet'}"])
    evaluate.run(cfg)
    r = pd.read_parquet(out / "metrics" / "ref" / "metrics.parquet")
    assert abs(value(r, "mel_vs_nev", "cohort=external:all", "auc").value - a_ext) < 1e-12
    assert abs(value(r, "mel_vs_nev", "cohort=internal:all", "auc").value - a_int) < 1e-12
    assert abs(value(r, "mel_vs_nev", "cohort=external:all", "auc_difference").value - diff.value) < 1e-12
    # ... and so does the model card's test results, from the headline it is given.
    from dermray.runtime import artifacts
    from tests.helpers import write_fold

    classes = pa.table({"class_index": pa.array([0, 1], pa.int32()), "node_id": ["benign", "malignant"],
                        "name": ["benign", "malignant"], "scope": ["subtree", "subtree"]})
    write_fold(tmp_path / "fold=0", classes, seed=0)
    card = artifacts.read_card(str(tmp_path / "fold=0" / "model_card.json"))
    card = card.model_copy(update={"test_metrics": [{"evaluation": "ext", "model_id": "m", "predictions": "p",
                                                     "headline": summary["headline"]}]})
    md = artifacts.render_markdown(card)
    assert "| mel_vs_nev | all | clinic_b | " in md and "| reference AUC (95% CI), n |" in md, md


def test_an_empty_group_id_is_the_image_alone_as_a_null_one_is(study, tmp_path):
    """Issue 28, finding 3: partition and train took an empty group_id ("") for "the image alone", evaluate only
    filled nulls, so a test set without lesion ids written as "" became one lesion: every lesion-bootstrap interval
    collapsed to a point. One rule now (dermray.core.ids.lesion_keys): null, "" and blank are the image alone."""
    d = study["dir"]
    table = pq.read_table(d / "predictions.parquet")
    i = table.column_names.index("group_id")
    n = table.num_rows
    results = {}
    for name, groups in {"null": pa.nulls(n, pa.string()), "empty": pa.array([""] * n),
                         "blank": pa.array([" ", ""] * (n // 2))}.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table.set_column(i, "group_id", groups), path)
        _, metrics, _ = run_eval(study, tmp_path / name, f"evaluate.predictions={path}")
        results[name] = metrics.sort_values(["task", "subset", "metric"]).reset_index(drop=True)
    auc = value(results["empty"], "mel_vs_nev", "all", "auc")
    assert auc.ci_low < auc.value < auc.ci_high, auc
    for name in ("empty", "blank"):
        pd.testing.assert_frame_equal(results[name], results["null"], obj=name)


def test_a_compared_run_with_other_training_classes_is_scored_through_its_own_membership(study, tmp_path, capsys):
    """Issue 28, finding 4: another run's probabilities (evaluate.compare, evaluate.reference) were mapped through
    this run's task membership: over another set of training classes that is another task score (AUC 0.500 where
    the other run's was 0.621). The other run is scored through the membership of its own partition (its score
    summary names it); without one, a run over another number of classes is refused in one line."""
    import json

    d, tax = study["dir"], study["tax"]
    df = study["df"]
    # The other run: its training classes in another order and one more (a second class of blue nevi), so that its
    # probabilities' columns mean other classes than this run's; its own model's probabilities.
    import dataclasses

    mine = study["classes"]
    classes = [dataclasses.replace(c, class_index=i) for i, c in enumerate(reversed(mine))]
    classes.append(dataclasses.replace(mine[0], class_index=len(mine)))
    own = np.zeros(len(tax), np.int64)
    for lab in df["label"]:
        own[tax.index[lab]] += 1
    rows, _ = task_membership(tax, classes, parse_tasks(TASKS, tax), own)
    other_dir = tmp_path / "other"
    (other_dir / "partition").mkdir(parents=True)
    pq.write_table(pa.table({"task": [r[0] for r in rows], "task_class": [r[1] for r in rows],
                             "class_index": pa.array([r[2] for r in rows], pa.int32()),
                             "node_id": [classes[r[2]].node_id for r in rows]}),
                   other_dir / "partition" / "task_membership.parquet")
    rng = np.random.default_rng(5)
    truth = len(mine) - 1 - node_to_class(tax, mine)[[tax.index[x] for x in df["label"]]]
    logits = rng.normal(0, 1.0, (len(df), len(classes)))
    logits[np.arange(len(df)), truth] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    (other_dir / "predictions").mkdir()
    pq.write_table(pa.Table.from_pandas(df.assign(model_id="m2"), preserve_index=False).append_column(
        "probs", pa.array(list(probs.astype(np.float32)), pa.list_(pa.float32()))),
        other_dir / "predictions" / "part-0.parquet")
    (other_dir / "score_summary.json").write_text(json.dumps({"partition": str(other_dir / "partition")}))

    def under(node_id, prefix):
        return node_id == prefix or node_id.startswith(prefix + ":")

    pos = sum(probs[:, c.class_index] for c in classes if under(c.node_id, "Malignant:Melanoma"))
    neg = sum(probs[:, c.class_index] for c in classes if under(c.node_id, "Benign:Nevus"))
    in_task = (df["label"].str.startswith("Malignant:Melanoma") | df["label"].str.startswith("Benign:Nevus")).to_numpy()
    y = df["label"].str.startswith("Malignant").to_numpy()
    theirs = roc_auc_score(y[in_task], (pos / (pos + neg))[in_task])
    _, metrics, _ = run_eval(study, tmp_path, f"evaluate.reference={other_dir / 'predictions'}")
    internal = value(metrics, "mel_vs_nev", "cohort=internal:all", "auc")
    assert abs(internal.value - theirs) < 1e-9, (internal.value, theirs)
    # The paired comparison: this run's AUC minus theirs, on the same images.
    ours = independent_score(study, "mel_vs_nev", "Malignant:Melanoma", "Benign:Nevus")
    m = in_task & ~np.isnan(ours)
    _, metrics, _ = run_eval(study, tmp_path, f"evaluate.compare={other_dir / 'predictions'}")
    diff = value(metrics, "mel_vs_nev", "all", "delong_auc_diff").value
    assert abs(diff - (roc_auc_score(y[m], ours[m]) - roc_auc_score(y[m], (pos / (pos + neg))[m]))) < 1e-9
    # Without a score summary naming its partition, another number of classes cannot be mapped: refused.
    (other_dir / "score_summary.json").unlink()
    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(d / "predictions.parquet"), "--tasks", str(d / "tasks.yaml"),
                 "--taxonomy", str(d / "taxonomy.parquet"), "--partition", str(d / "partition"), "--compare",
                 str(other_dir / "predictions"), "--output", str(tmp_path / "refused"), "--run-id", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"over {len(classes)} training classes" in err[0], err


def test_a_task_with_a_class_no_training_class_lies_under_is_not_estimable_with_the_reason(study, tmp_path, capsys):
    """Issue 28, finding 6: when no training class lies under one of a task's classes (here: the partition's
    membership holds no melanoma class), the task's score is 0 by construction, and its AUC read 0.500 [0.500,
    0.500] with a locked threshold of 0.0. It is not estimable: null, with the reason, in every subset."""
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(study["dir"], d)
    tm = pd.read_parquet(d / "partition" / "task_membership.parquet")
    kept = tm[~((tm.task == "mel_vs_nev") & (tm.task_class == "melanoma"))]
    pq.write_table(pa.Table.from_pandas(kept, preserve_index=False), d / "partition" / "task_membership.parquet")
    summary, metrics, _ = run_eval(dict(study, dir=d), tmp_path)
    mel = metrics[(metrics.task == "mel_vs_nev") & (metrics.metric == "auc")]
    assert len(mel) and mel["value"].isna().all(), mel
    assert mel["note"].str.startswith("not estimable: no training class lies under task class melanoma").all(), mel
    assert metrics[(metrics.task == "mel_vs_nev") & metrics.metric.str.contains("@")].empty  # no rates, no points
    (h,) = [h for h in summary["headline"] if h["task"] == "mel_vs_nev" and h["subset"] == "all"]
    assert h["value"] is None and h["note"].startswith("not estimable")
    assert "not estimable" in evaluate.format_summary(summary)
    report = (tmp_path / "out" / "metrics" / "r1" / "report.md").read_text()
    assert "AUC — (not estimable: no training class lies under task class melanoma" in report
    # The other tasks are evaluated as before.
    assert value(metrics, "three", "all", "accuracy").value is not None


def test_a_locked_point_that_does_not_carry_over_to_the_test_set_is_flagged_with_the_reason(study, tmp_path):
    """Issue 28, finding 1 (the flag): each locked point's out-of-fold rates beside its test rates, and a point whose
    test rate leaves its out-of-fold interval or the floor flagged, on the console, in the report and the headline
    (so on the model card). Here: one point locked at a threshold that calls every image positive while its card
    says it gave specificity 0.60 out of fold; one locked where the test data give what the card says."""
    import json
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(study["dir"], d)
    df = study["df"]
    score = independent_score(study, "mel_vs_nev", "Malignant:Melanoma", "Benign:Nevus")
    in_task = (df["label"].str.startswith("Malignant:Melanoma") | df["label"].str.startswith("Benign:Nevus")).to_numpy()
    y = df["label"].str.startswith("Malignant").to_numpy()[in_task & ~np.isnan(score)]
    s = score[in_task & ~np.isnan(score)]
    thr = float(np.quantile(s[~y], 0.5))  # specificity ~0.5 on these data
    sens, spec = float((s[y] >= thr).mean()), float((s[~y] < thr).mean())
    points = [{"task": "mel_vs_nev", "name": "sens0.95", "threshold": 0.0, "sensitivity": 0.95, "specificity": 0.60,
               "n": 500, "n_positive": 100, "n_negative": 400, "chosen_on": "out-of-fold predictions"},
              {"task": "mel_vs_nev", "name": "youden", "threshold": thr, "sensitivity": sens, "specificity": spec,
               "n": 500, "n_positive": 100, "n_negative": 400, "chosen_on": "out-of-fold predictions"}]
    (d / "score_summary.json").write_text(json.dumps({"operating_points": points}))
    summary, metrics, base = run_eval(dict(study, dir=d), tmp_path)
    flag = value(metrics, "mel_vs_nev", "all", "carries_over@locked:sens0.95")
    assert flag.value == 0 and flag.note.startswith("does not carry over: "), flag.note
    assert "test specificity 0.000 outside its out-of-fold interval [0.551, 0.647] (0.600 of 400)" in flag.note
    assert "test specificity 0.000 below the floor 0.1" in flag.note
    oof = value(metrics, "mel_vs_nev", "all", "specificity_oof@locked:sens0.95")
    assert oof.value == 0.60 and oof.ci_low < 0.60 < oof.ci_high and oof.n == 400
    assert value(metrics, "mel_vs_nev", "all", "carries_over@locked:youden").value == 1
    assert [h["metric"] for h in summary["headline"] if h["metric"].startswith("carries_over")] == [
        "carries_over@locked:sens0.95"] * len([h for h in summary["headline"] if h["metric"].startswith("carries")])
    assert "warning: mel_vs_nev: locked sens0.95 do not carry over" in evaluate.format_summary(
        summary)
    report = (base / "report.md").read_text()
    assert "(out of fold: sensitivity 0.950" in report and "WARNING: this point does not carry over" in report
