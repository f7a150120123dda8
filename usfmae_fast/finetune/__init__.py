"""Fine-tuning and evaluation with the clinical papers' protocol: labelled image sets,
stratified patient-grouped splits, classification metrics with bootstrap intervals, and the
report (JSON, markdown, ROC and confusion-matrix figures); classifiers from USF-MAE / MAE
checkpoints and timm baselines, one fold's training, the k-fold + test-set protocol, and
prediction / feature extraction on images and DICOMs."""
from .labels import LabelError, LabelledSet, read_labels
from .metrics import SCALAR_METRICS, bootstrap_ci, classification_metrics, summarize
from .report import fmt, plot_confusion, plot_roc, render_markdown, write_report
from .splits import SplitError, check_splits, holdout_split, kfold_splits
from .engine import FoldResult, TrainConfig, train_fold
from .inference import embed_images, predict_images
from .models import (LoadedClassifier, ModelSpec, build_classifier, load_finetuned, model_spec,
                     save_classifier)
from .protocol import ProtocolConfig, evaluate_checkpoints, quick_config, run_protocol

__all__ = ["LabelError", "LabelledSet", "SCALAR_METRICS", "SplitError", "bootstrap_ci",
           "check_splits", "classification_metrics", "fmt", "holdout_split", "kfold_splits",
           "plot_confusion", "plot_roc", "read_labels", "render_markdown", "summarize",
           "write_report",
           "FoldResult", "LoadedClassifier", "ModelSpec", "ProtocolConfig", "TrainConfig",
           "build_classifier", "embed_images", "evaluate_checkpoints", "load_finetuned",
           "model_spec", "predict_images", "quick_config", "run_protocol", "save_classifier",
           "train_fold"]
