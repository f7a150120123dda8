"""The evaluation report: ``report.json`` (everything) and ``report.md`` (the tables a paper
shows), plus the ROC and confusion-matrix figures.

Every number in ``report.md`` is a value of ``report.json`` written by :func:`fmt`, and numbers
appear only in table bodies; names (classes, models, paths) are set in code spans, so
:func:`parse_report_numbers` can read the numbers back and a test can match each one to the
JSON. The markdown is rendered from the JSON-ready copy of the report, never from anything else.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from ..runtime.files import atomic_write
from ..runtime.figures import pyplot, save_figure
from ..runtime.provenance import provenance_markdown
from .claims import difference_sentence
from .metrics import checked_scores

METRIC_LABELS = {"auc": "AUC", "auc_weighted": "AUC (weighted)", "f1": "F1",
                 "f1_weighted": "F1 (weighted)", "accuracy": "accuracy",
                 "balanced_accuracy": "balanced accuracy", "precision": "precision",
                 "recall": "recall (sensitivity)", "specificity": "specificity"}
HEADLINE_METRICS = tuple(METRIC_LABELS)   # the rows of the main tables
AVERAGED_KINDS = ("precision", "recall", "specificity", "f1")  # the macro / weighted table
COMPARED_METRICS = ("auc", "f1", "accuracy", "balanced_accuracy")
_NUMBER = re.compile(r"(?<![\w.])(?:-?\d+(?:\.\d+)?|n/a)(?![\w.])")
_CODE = re.compile(r"`[^`]*`")


def plot_roc(y_true, probs, classes, path, title: str = "") -> Path:
    """One-vs-rest ROC curve of every class (binary: of the positive class), AUC in the legend;
    a class absent from ``y_true`` has no curve and says so in the legend."""
    y_true, probs = checked_scores(y_true, probs, classes)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    for c in [1] if len(classes) == 2 else range(len(classes)):
        is_class = y_true == c
        if 0 < is_class.sum() < len(is_class):
            RocCurveDisplay.from_predictions(is_class, probs[:, c], name=str(classes[c]), ax=ax)
        else:
            ax.plot([], [], " ", label=f"{classes[c]}: no ROC, one side is empty")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="gray", label="chance")
    ax.set(xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title=title, aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def plot_confusion(confusion, classes, path, title: str = "") -> Path:
    """The confusion matrix as counts (rows: true class, columns: predicted class)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion: expected {len(classes)}x{len(classes)} for classes "
                         f"{list(classes)}, got shape {confusion.shape}")
    plt = pyplot()
    side = 2.5 + 0.7 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=120)
    long_names = max(len(str(c)) for c in classes) > 6
    ConfusionMatrixDisplay(confusion, display_labels=[str(c) for c in classes]).plot(
        ax=ax, cmap="Blues", values_format="d", xticks_rotation=45 if long_names else "horizontal")
    ax.set_title(title)
    return save_figure(fig, path)


def fmt(value) -> str:
    """The one number format of report.md: 4 decimals for floats, ints as they are, ``n/a``
    for None (an undefined metric)."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    raise TypeError(f"fmt formats numbers and None, got {type(value).__name__} {value!r}")


def _plain(value):
    """A JSON-ready copy: numpy values as Python ones, paths as text, NaN / inf as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _code(name) -> str:
    return f"`{name}`"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *map(line, rows), ""]


def _with_ci(value, interval) -> str:
    return f"{fmt(value)} {_interval(interval)}"


def _mean_sd(stats: dict | None) -> str:
    stats = stats or {}
    return f"{fmt(stats.get('mean'))} ± {fmt(stats.get('sd'))}"


def _figures(figures: dict | None) -> list[str]:
    return [f"![{name}]({path})\n" for name, path in (figures or {}).items()]


def _task_lines(task: dict) -> list[str]:
    classes = task.get("classes", [])
    rows = [("images", fmt(task.get("n_images"))), ("patients", fmt(task.get("n_patients")))]
    rows += [(f"images of class {_code(name)}", fmt(count))
             for name, count in task.get("class_counts", {}).items()]
    rows += [("cross-validation folds", fmt(task.get("folds"))),
             ("held-out test fraction", fmt(task.get("test_size"))),
             ("seed", fmt(task.get("seed"))), ("data", _code(task.get("data", "")))]
    if len(classes) == 2:
        how = "chosen by the user" if task.get("positive") else "by the class order"
        note = (f"Positive class: {_code(classes[1])} ({how}, recorded as `positive` in "
                f"report.json). F1, precision, recall (sensitivity) and the threshold are those "
                f"of {_code(classes[1])}; specificity is the recall of {_code(classes[0])}.")
    else:
        note = ("F1, precision, recall, specificity and AUC (one-vs-rest) are macro averages "
                "over the classes; the weighted rows weight each class by its images.")
    return ["## Task", "", *_table(("", ""), rows), note, ""]


def _comparison_lines(models: dict) -> list[str]:
    rows = []
    for name, model in models.items():
        test = model.get("test", {})
        rows.append([_code(name)] + [_with_ci(test.get("ensemble", {}).get(m),
                                              test.get("ensemble_ci", {}).get(m))
                                     for m in COMPARED_METRICS])
    header = ["model"] + [f"{METRIC_LABELS[m]} [95 % CI]" for m in COMPARED_METRICS]
    return ["## Comparison on the held-out test set", "",
            "The ensemble of each model's fold models; intervals by percentile bootstrap over "
            "the test patients (images when there are no patient ids).", "",
            *_table(header, rows)]


def _pair_lines(comparisons: dict | None) -> list[str]:
    """The paired tests of every two models (see ``finetune.comparisons``)."""
    if not comparisons or not comparisons.get("pairs"):
        return []
    rows, skipped = [], []
    for pair in comparisons["pairs"]:
        mc = pair["mcnemar"]
        rows.append([f"{_code(pair['a'])} vs {_code(pair['b'])}", fmt(pair.get("auc_a")),
                     fmt(pair.get("auc_b")), _with_ci(pair.get("difference"), pair.get("ci")),
                     fmt(pair.get("p_delong")), fmt(pair["accuracy_a"]),
                     fmt(pair["accuracy_b"]), f"{fmt(mc['a_right_b_wrong'])} / "
                     f"{fmt(mc['a_wrong_b_right'])}", fmt(mc["p_value"])])
        skipped += [f"{_code(pair['a'])} vs {_code(pair['b'])}: {why}"
                    for why in pair.get("not_computed", {}).values()]
    header = ["a vs b", "AUC a", "AUC b", "AUC a - b [95 % CI]", "DeLong p", "accuracy a",
              "accuracy b", "McNemar a only / b only right", "McNemar p"]
    text = (f"Both models of a pair scored on the same images ({comparisons['on']}). The "
            f"interval of the AUC difference is a paired percentile bootstrap resampling "
            f"{comparisons['resampled']}; DeLong's test treats images as independent. McNemar "
            "compares the accuracies at each model's operating point (the threshold fitted "
            "out of fold for binary tasks, the most probable class otherwise). The p-values "
            "are not adjusted for the number of pairs (see `n_pairs` in report.json); an "
            "interval that contains zero means the data cannot tell the two models apart.")
    what = "test AUC" if "test" in comparisons["on"] else "out-of-fold AUC"
    claims = [f"- {difference_sentence(p['a'], p['b'], what, p.get('ci'))}"
              for p in comparisons["pairs"]]
    return ["## Paired comparisons", "", text, "", *_table(header, rows), *claims, "",
            *[f"- not computed: {line}" for line in skipped], *([""] if skipped else [])]


def _cv_lines(cv: dict) -> list[str]:
    summary, pooled, pooled_ci = cv["summary"], cv.get("pooled", {}), cv.get("pooled_ci", {})
    rows = [(METRIC_LABELS[m], _mean_sd(summary.get(m)),
             _interval(summary.get(m, {}).get("ci")), fmt(summary.get(m, {}).get("n")),
             _with_ci(pooled.get(m), pooled_ci.get(m))) for m in HEADLINE_METRICS]
    return ["### Cross-validation", "",
            "Each fold's model scored on its own validation split, which chose nothing. Mean "
            "± sd over the folds with a Student-t interval of the mean (approximate: the "
            "folds share training data), and the metrics of all out-of-fold predictions pooled "
            "with a bootstrap interval over patients.", "",
            *_table(("metric", "mean ± sd", "95 % CI of the mean", "folds",
                     "pooled out-of-fold [95 % CI]"), rows)]


def _interval(ci) -> str:
    low, high = ci if ci else (None, None)
    return f"[{fmt(low)}, {fmt(high)}]"


def _averages_lines(title: str, metrics: dict) -> list[str]:
    rows = [(METRIC_LABELS[m], fmt(metrics.get(f"{m}_macro")), fmt(metrics.get(f"{m}_weighted")))
            for m in AVERAGED_KINDS]
    return [f"### {title}", "", *_table(("metric", "macro", "weighted"), rows)]


def _per_class_lines(title: str, metrics: dict) -> list[str]:
    keys = ("precision", "recall", "f1", "specificity", "auc", "support")
    return [f"### {title}", "",
            *_table(("class", "precision", "recall", "F1", "specificity", "AUC", "images"),
                    [[_code(c)] + [fmt(values[k]) for k in keys]
                     for c, values in metrics["per_class"].items()])]


def _assessment_lines(assessment: dict | None, where: str) -> list[str]:
    if not assessment:
        return []
    rules, lines = assessment["rules"], []
    if point := assessment.get("operating_point"):
        rule = (f"Youden's J" if rules["rule"] == "youden" else
                "the highest threshold reaching the target sensitivity `"
                f"{rules['target_sensitivity']}`" if rules["rule"] == "sensitivity" else
                "a fixed threshold")
        rows = [("threshold", fmt(rules["threshold"]))]
        rows += [(label, _with_ci(point.get(key), point.get("ci", {}).get(key)))
                 for key, label in (("sensitivity", "sensitivity"),
                                    ("specificity", "specificity"), ("ppv", "PPV"),
                                    ("npv", "NPV"), ("accuracy", "accuracy"))]
        rows += [(key.upper(), fmt(point.get(key))) for key in ("tp", "fp", "tn", "fn")]
        lines += [f"### Operating point ({where})", "",
                  f"Threshold on the positive class's probability chosen by {rule} on "
                  f"{rules['fitted_on']} and applied unchanged here (positive when the "
                  "probability is at or above it); bootstrap intervals.", "",
                  *_table(("quantity", "value [95 % CI]"), rows)]
    calibration = assessment["calibration"]
    rows = [("Brier score", fmt(calibration["brier"])),
            ("expected calibration error", fmt(calibration["ece"]))]
    text = "Of the probabilities as the model gives them."
    if raw := assessment.get("calibration_uncalibrated"):
        rows = [("temperature", fmt(rules["temperature"])),
                ("Brier score (calibrated)", fmt(calibration["brier"])),
                ("Brier score (raw)", fmt(raw["brier"])),
                ("expected calibration error (calibrated)", fmt(calibration["ece"])),
                ("expected calibration error (raw)", fmt(raw["ece"]))]
        text = (f"Temperature scaling fitted on {rules['fitted_on']}; AUC and the other "
                "metrics above use the raw probabilities.")
    return lines + [f"### Calibration ({where})", "", text, "",
                    *_table(("quantity", "value"), rows)]


def _model_lines(name: str, model: dict, classes: Sequence[str]) -> list[str]:
    lines = [f"## Model {_code(name)}", "", model.get("description", ""), ""]
    if cv := model.get("cv"):
        lines += _cv_lines(cv)
        if pooled := cv.get("pooled"):
            lines += _averages_lines("Macro and weighted averages (pooled out-of-fold)", pooled)
            lines += _per_class_lines("Per class (pooled out-of-fold)", pooled)
        lines += _assessment_lines(cv.get("assessment"), "pooled out-of-fold, fitted on itself")
    test = model.get("test", {})
    if ensemble := test.get("ensemble"):
        lines += ["### Held-out test set", "",
                  *_table(("metric", "ensemble [95 % CI]", "fold models mean ± sd"),
                          [(METRIC_LABELS[m], _with_ci(ensemble.get(m),
                                                       test.get("ensemble_ci", {}).get(m)),
                            _mean_sd(test.get("summary", {}).get(m))) for m in HEADLINE_METRICS])]
        lines += _averages_lines("Macro and weighted averages (test-set ensemble)", ensemble)
        lines += _per_class_lines("Per class (test-set ensemble)", ensemble)
        lines += ["### Confusion matrix (test-set ensemble)", "",
                  "Rows: true class; columns: predicted class (the most probable).", "",
                  *_table(["true \\ predicted"] + [_code(c) for c in classes],
                          [[_code(c)] + [fmt(v) for v in row]
                           for c, row in zip(classes, ensemble["confusion_matrix"])])]
        lines += _assessment_lines(test.get("assessment"), "test-set ensemble")
    return lines + _figures(model.get("figures"))


def render_markdown(report: dict) -> str:
    """report.md of a JSON-ready report (see :func:`write_report`)."""
    task = report.get("task", {})
    models = report.get("models", {})
    lines = [f"# {report.get('title', 'Evaluation report')}", "", *_task_lines(task)]
    if any(model.get("test", {}).get("ensemble") for model in models.values()):
        lines += _comparison_lines(models)
    lines += _pair_lines(report.get("comparisons"))
    for name, model in models.items():
        lines += _model_lines(name, model, task.get("classes", []))
    for section in report.get("sections", []):
        lines += [f"## {section['title']}", "", section.get("text", ""), ""]
        if numbers := section.get("numbers"):
            lines += _table(("quantity", "value"),
                            [(_code(k), fmt(v)) for k, v in numbers.items()])
    if figures := report.get("figures"):
        lines += ["## Figures", "", *_figures(figures)]
    if record := report.get("provenance"):
        lines += provenance_markdown(record)
    return "\n".join(lines).rstrip() + "\n"


def _warn_missing_figures(report: dict, out_dir: Path) -> None:
    paths = [*report.get("figures", {}).values(),
             *(p for m in report.get("models", {}).values() for p in m.get("figures", {}).values())]
    if missing := [p for p in paths if not (out_dir / p).is_file()]:
        warnings.warn(f"report: {len(missing)} figure(s) it links do not exist under {out_dir}: "
                      f"{missing[:5]}", stacklevel=3)


def write_report(report: dict, out_dir) -> tuple[Path, Path]:
    """Writes ``out_dir/report.json`` and ``out_dir/report.md`` (each atomically); figure
    paths in ``report`` are relative to ``out_dir``. Returns both paths."""
    report, out_dir = _plain(report), Path(out_dir)
    _warn_missing_figures(report, out_dir)
    json_text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    md_text = render_markdown(report)
    json_path = atomic_write(out_dir / "report.json",
                             lambda tmp: Path(tmp).write_text(json_text, encoding="utf-8"))
    md_path = atomic_write(out_dir / "report.md",
                           lambda tmp: Path(tmp).write_text(md_text, encoding="utf-8"))
    return json_path, md_path


def parse_report_numbers(md_text: str) -> dict[str, dict[str, list[str]]]:
    """The numbers of report.md's table bodies as written: ``{heading path: {row label:
    [number, ...]}}``, the heading path of level-2 and deeper headings joined by `` / ``,
    code-span backticks dropped from headings and row labels; numbers inside code spans are
    names and are not read."""
    tables: dict[str, dict[str, list[str]]] = {}
    headings: list[str] = []
    lines = md_text.splitlines()
    for i, line in enumerate(lines):
        if match := re.match(r"(#{2,})\s+(.*)", line):
            headings = headings[:len(match.group(1)) - 2] + [match.group(2).replace("`", "")]
            continue
        is_header = i + 1 < len(lines) and re.fullmatch(r"\|(---\|)+", lines[i + 1])
        if not line.startswith("| ") or is_header or re.fullmatch(r"\|(---\|)+", line):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        numbers = [n for cell in cells[1:] for n in _NUMBER.findall(_CODE.sub("", cell))]
        tables.setdefault(" / ".join(headings), {})[cells[0].replace("`", "")] = numbers
    return tables
