"""The labelled images of a fine-tuning or evaluation run, read from a labels CSV or from a
folder-per-class directory.

A CSV has the columns ``path,label`` and optionally a patient / study id column (the first of
:data:`GROUP_COLUMNS` it has); paths are relative to the CSV's folder, and one that leads out
of it (``../../etc/passwd``, an absolute path elsewhere) is an error naming its line unless
``allow_outside_root`` (``--allow-outside-root``) says the CSV may point anywhere. The check is
on the path as written: links inside the folder are the folder owner's business and are
followed. Other columns (a lesion ``mask``, say) are ignored. A directory holds one folder
per class, ``root/<class>/**/*.png|jpg|jpeg``, and no patient ids.

Everything that would make a run meaningless stops it with a :class:`LabelError` naming the
argument, file and line: a listed file that does not exist, an empty label, a path listed twice
with different labels, a class outside the model's ``classes``, fewer than two classes. Files
that exist but cannot be decoded are left out with one ``BadImageWarning`` (the same check
every loader runs), so a few damaged scans do not stop a study.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.load.image_files import (ImageList, ImageRecord, check_images, image_records_in,
                                sort_class_names)

GROUP_COLUMNS = ("patient_id", "patient", "study_id", "study", "group")
_SHOWN = 5  # how many offending paths or lines an error message lists


class LabelError(ValueError):
    """The labels given cannot define a classification task; the message says where."""


@dataclass
class LabelledSet:
    paths: list[str]            # absolute image paths
    labels: np.ndarray          # int64 [N], index into classes
    classes: list[str]
    groups: np.ndarray | None   # str [N] patient / study ids; None when the source has none
    root: str | None = None     # the CSV's folder or the class folders' parent, for short names

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=str)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> LabelledSet:
        """The images at ``indices`` (e.g. one fold), same class list."""
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledSet([self.paths[i] for i in indices], self.labels[indices],
                           list(self.classes),
                           None if self.groups is None else self.groups[indices], self.root)

    def to_image_list(self) -> ImageList:
        """The loaders' view; records are named relative to :attr:`root` (for messages)."""
        names = [Path(p if self.root is None else os.path.relpath(p, self.root)).as_posix()
                 for p in self.paths]
        return ImageList([ImageRecord(path, name, label=int(label))
                          for path, name, label in zip(self.paths, names, self.labels)],
                         list(self.classes))

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(count) for name, count in zip(self.classes, counts)}


@dataclass(frozen=True)
class _Row:
    path: str               # absolute
    name: str               # as the CSV lists it, or relative to the class folders' parent
    label: str
    group: str | None
    line: int | None        # in the CSV; None for a folder-per-class source


def _where(rows: Sequence[_Row], source: Path) -> str:
    """``labels.csv line(s) 3, 7`` or ``folder data/benign`` for messages."""
    if rows[0].line is None:
        return f"folder {source / rows[0].label}"
    shown = ", ".join(str(r.line) for r in rows[:_SHOWN])
    more = f" (and {len(rows) - _SHOWN} more)" if len(rows) > _SHOWN else ""
    return f"{source.name} line{'s' if len(rows) > 1 else ''} {shown}{more}"


def listed_path(csv_path: Path, text: str, line: int, allow_outside_root: bool = False) -> str:
    """The absolute, resolved path of ``text`` as listed on ``line`` of ``csv_path`` (relative
    to its folder); :class:`LabelError` naming the line when it leads out of that folder and
    not ``allow_outside_root``."""
    folder = Path(os.path.abspath(csv_path.parent))
    if not allow_outside_root and not Path(os.path.normpath(folder / text)).is_relative_to(folder):
        raise LabelError(f"labels: {csv_path} line {line}: {text!r} leads outside the CSV's "
                         f"folder {folder}; pass --allow-outside-root (allow_outside_root=True) "
                         "to read images elsewhere")
    return str((csv_path.parent / text).resolve())


def _rows_from_csv(csv_path: Path, allow_outside_root: bool = False) -> list[_Row]:
    try:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            if not columns:
                raise LabelError(f"labels: {csv_path} is empty")
            if missing := [c for c in ("path", "label") if c not in columns]:
                raise LabelError(f"labels: {csv_path} has no {missing} column(s) "
                                 f"(columns: {columns})")
            group = next((c for c in GROUP_COLUMNS if c in columns), None)
            raw = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise LabelError(f"labels: {csv_path} is not a text CSV ({exc})") from exc
    rows = []
    for line, row in raw:
        values = {c: (row.get(c) or "").strip() for c in ("path", "label", group) if c}
        if empty := [c for c, v in values.items() if not v]:
            raise LabelError(f"labels: {csv_path} line {line} has an empty {empty[0]!r}")
        rows.append(_Row(listed_path(csv_path, values["path"], line, allow_outside_root),
                         Path(values["path"]).as_posix(), values["label"], values.get(group),
                         line))
    if not rows:
        raise LabelError(f"labels: {csv_path} has a header but no rows")
    return rows


def _rows_from_folders(root: Path) -> list[_Row]:
    records = image_records_in(root)
    if loose := [r.name for r in records if "/" not in r.name]:
        raise LabelError(f"labels: {root} is read as one folder per class, but "
                         f"{len(loose)} image(s) lie outside a class folder, e.g. {loose[:3]}")
    if not records:
        raise LabelError(f"labels: {root} has no class subfolders with PNG / JPEG images")
    return [_Row(r.path, r.name, r.name.split("/", 1)[0], None, None) for r in records]


def _described(row: _Row) -> str:
    return repr(row.label) if row.group is None else f"{row.label!r} of patient {row.group!r}"


def _merge_duplicates(rows: list[_Row], source: Path) -> list[_Row]:
    """One row per image; the same image listed with different labels or patients is an error."""
    first: dict[str, _Row] = {}
    for row in rows:
        seen = first.setdefault(row.path, row)
        if (seen.label, seen.group) != (row.label, row.group):
            raise LabelError(f"labels: {row.name} is listed twice with different labels or "
                             f"patients ({_where([seen, row], source)}: {_described(seen)} vs "
                             f"{_described(row)})")
    if len(first) < len(rows):
        warnings.warn(f"labels: {len(rows) - len(first)} duplicate row(s) of the same image "
                      f"and label in {source} merged", stacklevel=3)
    return list(first.values())


def _class_list(rows: Sequence[_Row], classes: Sequence[str] | None, source: Path) -> list[str]:
    if classes is None:
        found = sort_class_names({r.label for r in rows})
        if len(found) < 2:
            raise LabelError(f"labels: a classification needs at least 2 classes, "
                             f"{source} has {found}")
        return found
    classes = [str(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise LabelError(f"classes: expected at least 2 distinct names, got {classes}")
    for label in sorted({r.label for r in rows} - set(classes)):
        unknown = [r for r in rows if r.label == label]
        raise LabelError(f"labels: unknown class {label!r} in {_where(unknown, source)}; "
                         f"the model knows {classes}")
    return classes


def read_labels(source, classes: Sequence[str] | None = None, check: str = "header",
                allow_outside_root: bool = False) -> LabelledSet:
    """The labelled images of ``source`` (a labels CSV or a folder-per-class directory).

    Classes are sorted (numerically when every name is an integer) unless ``classes`` is given,
    e.g. a trained model's class list, in which case every label must be one of them.
    ``check`` is the image check of :func:`usfmae_fast.data.load.image_files.check_images`.
    ``allow_outside_root``: a CSV may list images outside its own folder.
    """
    source = Path(source)
    if source.is_dir():
        rows = _rows_from_folders(source)
    elif source.is_file():
        rows = _rows_from_csv(source, allow_outside_root)
    else:
        raise LabelError(f"labels: {source} is neither a CSV file nor a directory")
    rows = _merge_duplicates(rows, source)
    if missing := [r for r in rows if not Path(r.path).is_file()]:
        shown = "; ".join(f"{r.path} ({_where([r], source)})" for r in missing[:_SHOWN])
        raise LabelError(f"labels: {len(missing)} image(s) listed in {source} do not exist: "
                         f"{shown}" + (" ..." if len(missing) > _SHOWN else ""))
    class_list = _class_list(rows, classes, source)
    good = {r.path for r in check_images([ImageRecord(r.path, r.name) for r in rows], check)}
    if not good:
        raise LabelError(f"labels: no image listed in {source} can be decoded")
    if len(good) < len(rows):
        rows = [r for r in rows if r.path in good]
        class_list = _class_list(rows, classes, source)  # a class may have lost every image
    index = {name: i for i, name in enumerate(class_list)}
    groups = None if rows[0].group is None else np.array([r.group for r in rows], dtype=str)
    root = (source if source.is_dir() else source.parent).resolve()
    return LabelledSet([r.path for r in rows], np.array([index[r.label] for r in rows]),
                       class_list, groups, str(root))


# Binary class names whose meaning is plain: a task named by one of each pair has that positive
# class without being told. Anything else (cyst / solid, 0 / 1 is fine) must be told.
NEGATIVE_NAMES = frozenset({"normal", "benign", "negative", "neg", "no", "absent", "healthy",
                            "control", "false", "0", "none", "non-referable"})
POSITIVE_NAMES = frozenset({"abnormal", "malignant", "positive", "pos", "yes", "present",
                            "disease", "diseased", "case", "true", "1", "anomaly", "lesion",
                            "referable"})


def positive_class(classes: Sequence[str], positive: str | None = None,
                   explicit_order: bool = False) -> str | None:
    """The positive class of a binary task (None for more classes): ``positive`` when given;
    else ``classes[1]`` when the caller set the class order (``explicit_order``); else the
    one of two plain names (``normal`` / ``abnormal``, ``benign`` / ``malignant``, ``no`` /
    ``yes``, ``0`` / ``1``, ... see :data:`POSITIVE_NAMES`). A binary task named otherwise
    (``cyst`` / ``solid``) is a :class:`LabelError` saying how to choose."""
    classes = [str(c) for c in classes]
    if len(classes) != 2:
        if positive is not None:
            raise LabelError(f"positive: {positive!r} is only for binary tasks; this one has "
                             f"{len(classes)} classes {classes} (macro averages are reported)")
        return None
    if positive is not None:
        if positive not in classes:
            raise LabelError(f"positive: {positive!r} is not a class of this task {classes}")
        return positive
    if explicit_order:
        return classes[1]
    lowered = [c.lower() for c in classes]
    for neg, pos in ((0, 1), (1, 0)):
        if lowered[neg] in NEGATIVE_NAMES and lowered[pos] in POSITIVE_NAMES:
            return classes[pos]
    raise LabelError(f"positive: the binary task {classes} has no obvious positive class; "
                     f"name it: --positive {classes[1]} (finetune), or positive: "
                     f"{classes[1]} in the config, or --set positive={classes[1]}. "
                     "Sensitivity, precision and the threshold are those of that class.")


def with_positive_last(data: LabelledSet, positive: str | None) -> LabelledSet:
    """``data`` with its two classes ordered ``[negative, positive]`` (the convention of
    :mod:`.metrics`: index 1 is positive); unchanged when already so or not binary."""
    if positive is None or data.classes[1] == positive:
        return data
    return LabelledSet(list(data.paths), 1 - data.labels, data.classes[::-1],
                       None if data.groups is None else data.groups.copy(), data.root)
