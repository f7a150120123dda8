"""The evaluation report: report.json and report.md written, figures on disk, and every number
of report.md equal to its value in report.json written by fmt()."""
import json
import re

import numpy as np
import pytest

from usfmae_fast.finetune.assessment import assess, fit_rules
from usfmae_fast.finetune.comparisons import compare_models
from usfmae_fast.runtime.provenance import provenance
from usfmae_fast.finetune.metrics import (SCALAR_METRICS, bootstrap_ci, classification_metrics,
                                          summarize)
from usfmae_fast.finetune.report import (COMPARED_METRICS, METRIC_LABELS, fmt, parse_report_numbers,
                                         plot_confusion, plot_roc, write_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_probs(rng, y, n_classes):
    logits = rng.normal(size=(len(y), n_classes)) + np.eye(n_classes)[y]
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def random_report(rng, out_dir, classes, folds=3):
    """What the protocol assembles, from random predictions through the metrics functions."""
    n_classes = len(classes)
    y_test = rng.integers(0, n_classes, size=int(rng.integers(40, 90)))
    groups = np.arange(len(y_test)) // 2            # two images per patient
    models, ensembles, rules = {}, {}, {}
    for name in ("usfmae_vit", "densenet169"):
        cv, y_oof, oof = [], [], []
        for _ in range(folds):
            y_val = rng.integers(0, n_classes, size=30)
            val_probs = random_probs(rng, y_val, n_classes)
            y_oof.append(y_val)
            oof.append(val_probs)
            cv.append(classification_metrics(y_val, val_probs, classes))
        y_oof, oof = np.concatenate(y_oof), np.concatenate(oof)
        rules[name] = fit_rules(y_oof, oof, classes, temperature=name == "densenet169",
                                fitted_on="pooled out-of-fold predictions")
        fold_probs = [random_probs(rng, y_test, n_classes) for _ in range(folds)]
        ensemble = ensembles[name] = np.mean(fold_probs, axis=0)
        test_folds = [classification_metrics(y_test, p, classes) for p in fold_probs]
        metrics = classification_metrics(y_test, ensemble, classes)
        figures = {
            "roc": plot_roc(y_test, ensemble, classes, out_dir / name / "roc.png", title=name),
            "confusion": plot_confusion(metrics["confusion_matrix"], classes,
                                        out_dir / name / "confusion.png")}
        models[name] = {
            "description": f"{name}, fine-tuned per fold",
            "config": {"epochs": 3, "lr": float(rng.random()), "backbone": name},
            "cv": {"folds": cv, "summary": summarize(cv),
                   "pooled": classification_metrics(y_oof, oof, classes),
                   "pooled_ci": bootstrap_ci(y_oof, oof, classes, n_boot=100)},
            "test": {"folds": test_folds, "summary": summarize(test_folds), "ensemble": metrics,
                     "ensemble_ci": bootstrap_ci(y_test, ensemble, classes, n_boot=100,
                                                 groups=groups),
                     "assessment": assess(y_test, ensemble, classes, rules[name],
                                          groups=groups, n_boot=100)},
            "figures": {k: str(p.relative_to(out_dir)) for k, p in figures.items()}}
    counts = rng.integers(10, 60, size=n_classes)
    return {
        "title": "Random predictions: 2 models",
        "task": {"classes": classes, "n_images": int(counts.sum()), "n_patients": None,
                 "class_counts": dict(zip(classes, counts)), "folds": folds,
                 "test_size": 0.2, "seed": 0, "data": "/data/2024/labels_v2.csv"},
        "models": models,
        "comparisons": compare_models(y_test, ensembles,
                                      {n: rules[n].predict(p) for n, p in ensembles.items()},
                                      groups=groups, n_boot=200),
        "provenance": provenance(config={"seed": 0}, seed=0, device="cpu"),
        "figures": {"roc of usfmae_vit": models["usfmae_vit"]["figures"]["roc"]},
        "sections": [{"title": "Score-CAM pointing game", "text": "Hits over lesion masks.",
                      "numbers": {"pointing_game": float(rng.random()), "images": 12,
                                  "energy_in_mask": np.float32(rng.random())}}],
    }


def json_numbers(value):
    """Every number and None in a JSON value, as fmt() writes it."""
    if isinstance(value, dict):
        return {s for v in value.values() for s in json_numbers(v)}
    if isinstance(value, list):
        return {s for v in value for s in json_numbers(v)}
    return {fmt(value)} if value is None or type(value) in (int, float) else set()


def json_strings(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in json_strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.fixture(scope="module", params=[["benign", "malignant"], ["0", "1", "10"]],
                ids=["binary", "3-classes"])
def written(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report")
    report = random_report(np.random.default_rng(len(request.param)), out_dir, request.param)
    json_path, md_path = write_report(report, out_dir)
    return out_dir, json_path, md_path


def test_files_and_figures_are_written(written):
    out_dir, json_path, md_path = written
    assert json_path == out_dir / "report.json" and md_path == out_dir / "report.md"
    assert not list(out_dir.glob(".*.tmp"))  # atomic writes left no temporary file
    report = json.loads(json_path.read_text())
    for model in report["models"].values():
        for figure in model["figures"].values():
            data = (out_dir / figure).read_bytes()
            assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
            assert f"({figure})" in md_path.read_text()
    assert report["sections"][0]["numbers"]["images"] == 12
    assert isinstance(report["sections"][0]["numbers"]["energy_in_mask"], float)


def test_every_number_in_the_markdown_is_a_json_value_written_by_fmt(written):
    _, json_path, md_path = written
    report, md = json.loads(json_path.read_text()), md_path.read_text()
    tables = parse_report_numbers(md)
    allowed = json_numbers(report)
    tokens = [t for rows in tables.values() for numbers in rows.values() for t in numbers]
    assert len(tokens) > 100
    assert not set(tokens) - allowed
    assert all(re.fullmatch(r"n/a|-?\d+(\.\d{4})?", t) for t in tokens)
    # outside table bodies no number at all: strip tables, images, code spans and JSON text
    prose = "\n".join(line for line in md.splitlines() if not line.startswith("|"))
    prose = re.sub(r"!\[[^\]]*\]\([^)]*\)|`[^`]*`", "", prose)
    for text in sorted(json_strings(report), key=len, reverse=True):
        prose = prose.replace(text, "")
    assert not re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", prose)


def test_each_table_row_holds_the_values_it_names(written):
    _, json_path, md_path = written
    md_text = md_path.read_text()
    report, tables = json.loads(json_path.read_text()), parse_report_numbers(md_text)
    task = report["task"]
    assert tables["Task"]["images"] == [fmt(task["n_images"])]
    assert tables["Task"]["patients"] == ["n/a"]
    assert tables["Task"]["held-out test fraction"] == ["0.2000"]
    for name, count in task["class_counts"].items():
        assert tables["Task"][f"images of class {name}"] == [fmt(count)]
    for name, model in report["models"].items():
        test, cv = model["test"], model["cv"]["summary"]
        ensemble, ci, summary = test["ensemble"], test["ensemble_ci"], test["summary"]
        assert tables["Comparison on the held-out test set"][name] == [
            fmt(v) for m in COMPARED_METRICS for v in (ensemble[m], *ci[m])]
        for m in SCALAR_METRICS:
            label = METRIC_LABELS[m]
            pooled, pooled_ci = model["cv"]["pooled"][m], model["cv"]["pooled_ci"][m]
            assert tables[f"Model {name} / Cross-validation"][label] == [
                fmt(cv[m]["mean"]), fmt(cv[m]["sd"]), *map(fmt, cv[m]["ci"]), fmt(cv[m]["n"]),
                fmt(pooled), *map(fmt, pooled_ci)]
            assert tables[f"Model {name} / Held-out test set"][label] == [
                fmt(ensemble[m]), *map(fmt, ci[m]), fmt(summary[m]["mean"]),
                fmt(summary[m]["sd"])]
        for row, cls in zip(ensemble["confusion_matrix"], task["classes"]):
            assert tables[f"Model {name} / Confusion matrix (test-set ensemble)"][cls] == \
                [fmt(v) for v in row]
            values = ensemble["per_class"][cls]
            assert tables[f"Model {name} / Per class (test-set ensemble)"][cls] == [
                fmt(values[k]) for k in ("precision", "recall", "f1", "specificity", "auc",
                                         "support")]
        for kind in ("precision", "recall", "specificity", "f1"):
            row = tables[f"Model {name} / Macro and weighted averages (test-set ensemble)"]
            assert row[METRIC_LABELS[kind]] == [fmt(ensemble[f"{kind}_macro"]),
                                                fmt(ensemble[f"{kind}_weighted"])]
        assessment = test["assessment"]
        calibration = tables[f"Model {name} / Calibration (test-set ensemble)"]
        if assessment["rules"]["temperature"] is None:
            assert calibration["Brier score"] == [fmt(assessment["calibration"]["brier"])]
        else:
            assert calibration["temperature"] == [fmt(assessment["rules"]["temperature"])]
            assert calibration["expected calibration error (raw)"] == [
                fmt(assessment["calibration_uncalibrated"]["ece"])]
        if len(task["classes"]) == 2:
            point = assessment["operating_point"]
            rows = tables[f"Model {name} / Operating point (test-set ensemble)"]
            assert rows["threshold"] == [fmt(assessment["rules"]["threshold"])]
            assert rows["sensitivity"] == [fmt(point["sensitivity"]),
                                           *map(fmt, point["ci"]["sensitivity"])]
            assert rows["TP"] == [fmt(point["tp"])]
        else:
            assert "operating_point" not in assessment
    pair = report["comparisons"]["pairs"][0]
    from usfmae_fast.finetune.claims import difference_sentence
    assert difference_sentence(pair["a"], pair["b"], "test AUC", pair["ci"]) in md_text
    assert tables["Paired comparisons"]["usfmae_vit vs densenet169"] == [
        fmt(pair["auc_a"]), fmt(pair["auc_b"]), fmt(pair["difference"]), *map(fmt, pair["ci"]),
        fmt(pair["p_delong"]), fmt(pair["accuracy_a"]), fmt(pair["accuracy_b"]),
        fmt(pair["mcnemar"]["a_right_b_wrong"]), fmt(pair["mcnemar"]["a_wrong_b_right"]),
        fmt(pair["mcnemar"]["p_value"])]
    section = report["sections"][0]
    assert tables[section["title"]] == {k: [fmt(v)] for k, v in section["numbers"].items()}


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_fmt_and_undefined_values(tmp_path):
    assert fmt(0.5) == "0.5000" and fmt(np.float32(0.25)) == "0.2500" and fmt(1 / 3) == "0.3333"
    assert fmt(3) == "3" and fmt(np.int64(7)) == "7" and fmt(None) == "n/a"
    for bad in ("0.5", True, [1]):
        with pytest.raises(TypeError):
            fmt(bad)
    metrics = classification_metrics(np.zeros(6, int), np.full((6, 2), 0.5), ["a", "b"])
    report = {"title": "t", "task": {"classes": ["a", "b"], "test_size": np.float64(0.25),
                                     "n_images": np.int64(6)},
              "models": {"m": {"test": {"ensemble": metrics,
                                        "ensemble_ci": {"auc": [float("nan"), None]}}}}}
    json_path, md_path = write_report(report, tmp_path)
    written = json.loads(json_path.read_text())
    assert written["models"]["m"]["test"]["ensemble_ci"]["auc"] == [None, None]
    assert written["task"]["test_size"] == 0.25 and written["task"]["n_images"] == 6
    rows = parse_report_numbers(md_path.read_text())["Model m / Held-out test set"]
    assert rows["AUC"] == ["n/a"] * 5
    cv_only = {"title": "t", "task": {"classes": ["a", "b"]},
               "models": {"m": {"cv": {"summary": summarize([metrics])}}}}
    md = write_report(cv_only, tmp_path / "cv_only")[1].read_text()
    assert "Comparison" not in md and "Held-out test set" not in md
    assert parse_report_numbers(md)["Model m / Cross-validation"]["accuracy"] == [
        fmt(metrics["accuracy"]), "0.0000", "n/a", "n/a", "1", "n/a", "n/a", "n/a"]
    with pytest.warns(UserWarning, match="1 figure"):
        write_report({**report, "figures": {"loss": "missing.png"}}, tmp_path)
