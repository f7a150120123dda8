"""Fine-tuning and evaluation with the clinical papers' protocol: labelled image sets,
stratified patient-grouped splits, classification metrics with bootstrap intervals, and the
report (JSON, markdown, ROC and confusion-matrix figures); classifiers from USF-MAE / MAE
checkpoints and timm baselines, one fold's training, the k-fold + test-set protocol, and
prediction / feature extraction on images and DICOMs; paired model comparisons (DeLong,
clustered bootstrap, McNemar); operating points and calibration fitted out of fold."""
from ..runtime.lazy import lazy_exports

_EXPORTS = {
    "labels": ("LabelError", "LabelledSet", "read_labels"),
    "metrics": ("ALL_METRICS", "AVERAGED_METRICS", "SCALAR_METRICS", "bootstrap_ci",
                "classification_metrics", "fold_mean_ci", "summarize"),
    "calibration": ("apply_temperature", "brier_score", "choose_threshold",
                    "expected_calibration_error", "fit_temperature", "operating_point",
                    "reliability_diagram"),
    "assessment": ("Rules", "assess", "fit_rules"),
    "comparisons": ("compare_models",),
    "claims": ("difference_sentence",),
    "report": ("fmt", "plot_confusion", "plot_roc", "render_markdown", "write_report"),
    "splits": ("SplitError", "check_splits", "holdout_split", "kfold_splits"),
    "config": ("ProtocolConfig", "TrainConfig"),
    "engine": ("FoldResult", "train_fold"),
    "inference": ("embed_images", "predict_images"),
    "label_efficiency": ("extract_features", "label_subsets", "measure_label_efficiency",
                         "plot_label_efficiency"),
    "models": ("LoadedClassifier", "ModelSpec", "build_classifier", "load_finetuned",
               "model_spec", "save_classifier"),
    "protocol": ("evaluate_checkpoints", "quick_config", "run_protocol"),
    "stats": ("compare_auc", "delong", "mcnemar"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)
__getattr__ = lazy_exports(__name__, {name: f".{module}" for name, module in _MODULE_OF.items()})
