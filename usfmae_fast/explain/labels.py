"""Which class each map explains: the image's ground-truth label (read from a labels CSV, the
image's folder, or a mapping), the model's prediction, or one fixed class.

A labels CSV has the columns ``path,label`` with paths relative to the CSV, as fine-tuning reads
it (:func:`usfmae_fast.data.load.image_files.load_image_list`); ``"folder"`` takes the name of
the folder each image lies in. Label values are class names of the checkpoint (``"0"``,
``"1"``, ... when it names none)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..data.load.image_files import load_image_list
from .config import CLASS_SOURCES


def explained_by(class_source: str, class_idx: int | None, labels) -> str:
    """``"fixed"`` (``class_idx``), ``"label"`` or ``"predicted"``; ``"auto"`` is the label
    when labels are given, else the prediction."""
    if class_source not in CLASS_SOURCES:
        raise ValueError(f"class_source: {class_source!r} is not one of {CLASS_SOURCES}")
    if class_idx is not None:
        if class_source != "auto":
            raise ValueError(f"class_source: {class_source!r} contradicts class_idx "
                             f"(--class) {class_idx}, which explains one fixed class; give one")
        return "fixed"
    if class_source == "label" and labels is None:
        raise ValueError("class_source: 'label' needs labels (--labels CSV or folder)")
    if class_source == "auto":
        return "label" if labels is not None else "predicted"
    return class_source


def read_labels(labels, paths: Sequence[Path]) -> list[str | None]:
    """The label name of each image in ``paths`` (None where ``labels`` has none): ``labels`` a
    CSV path, ``"folder"``, or a mapping of image path to name."""
    if labels == "folder":
        return [Path(p).parent.name for p in paths]
    if isinstance(labels, Mapping):
        by_path = {str(Path(p).resolve()): str(name) for p, name in labels.items()}
    else:
        if not Path(labels).is_file():
            raise FileNotFoundError(f"labels: {str(labels)!r} is neither a CSV file nor 'folder'")
        listed = load_image_list(Path(labels), labels=Path(labels), check="none")
        by_path = {r.path: listed.classes[r.label] for r in listed.records}
    return [by_path.get(str(Path(p).resolve())) for p in paths]


def label_indices(names: Sequence[str | None], paths: Sequence[Path],
                  classes: Sequence[str]) -> list[int]:
    """Class indices of label ``names``; ``ValueError`` naming ``labels`` for an image without
    a label or a label that is not one of the model's ``classes``."""
    missing = [str(p) for p, n in zip(paths, names) if n is None]
    if missing:
        raise ValueError(f"labels: {len(missing)} image(s) have no label, e.g. {missing[:3]}")
    unknown = sorted({n for n in names if n not in classes})
    if unknown:
        raise ValueError(f"labels: {unknown} are not classes of the model {list(classes)}")
    return [list(classes).index(n) for n in names]
