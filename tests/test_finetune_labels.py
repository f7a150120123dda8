"""Labelled image sets: labels CSVs (relative paths, patient columns, line-numbered errors),
folder-per-class directories, a trained model's class list, missing and undecodable files."""
import csv
import re

import numpy as np
import pytest
from PIL import Image

from usfmae_fast.data.load.image_files import BadImageWarning
from usfmae_fast.finetune.labels import GROUP_COLUMNS, LabelError, read_labels


def _png(path, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(path)
    return path


def _csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_csv_paths_are_relative_to_it_with_patients_and_extra_columns(tmp_path, rng):
    images = [_png(tmp_path / "scans" / f"p{i // 2}" / f"{i}.png", rng) for i in range(6)]
    outside = _png(tmp_path / "elsewhere" / "x.png", rng)
    rows = [(f"../scans/p{i // 2}/{i}.png", ("cyst", "solid")[i % 2], f"P{i // 2}", "m.png")
            for i in range(6)] + [(str(outside), "cyst", "P9", "")]
    labels_csv = _csv(tmp_path / "meta" / "labels.csv", ("path", "label", "patient_id", "mask"),
                      rows)
    with pytest.raises(LabelError, match=r"labels.csv line 2: '../scans/p0/0.png' leads outside"):
        read_labels(labels_csv)  # ../ and absolute paths elsewhere only when allowed
    data = read_labels(labels_csv, allow_outside_root=True)
    assert data.paths == [str(p.resolve()) for p in images + [outside]]
    assert data.classes == ["cyst", "solid"]
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert data.groups.tolist() == ["P0", "P0", "P1", "P1", "P2", "P2", "P9"]
    assert data.class_counts() == {"cyst": 4, "solid": 3}
    assert len(data) == 7
    part = data.subset([5, 1])
    assert part.paths == [data.paths[5], data.paths[1]] and part.groups.tolist() == ["P2", "P0"]
    assert part.labels.tolist() == [1, 1] and part.classes == data.classes
    image_list = part.to_image_list()
    assert image_list.classes == ["cyst", "solid"]
    assert [(r.path, r.name, r.label) for r in image_list.records] == [
        (data.paths[5], "../scans/p2/5.png", 1), (data.paths[1], "../scans/p0/1.png", 1)]


def test_paths_leaving_the_csv_folder_are_refused_with_their_line(tmp_path, rng):
    """Issue 15 item 9: ``../../etc/passwd`` in a labels CSV was read silently."""
    root = tmp_path / "study"
    for i in range(4):
        _png(root / "images" / f"{i}.png", rng)
    secret = _png(tmp_path / "private" / "secret.png", rng)
    (root / "linked").symlink_to(tmp_path / "private")  # a link inside the folder: its owner's
    inside = [(f"images/{i}.png", "ab"[i % 2]) for i in range(3)]
    inside += [("images/../images/3.png", "b"), ("linked/secret.png", "a")]
    assert len(read_labels(_csv(root / "ok.csv", ("path", "label"), inside))) == 5
    for bad in ("../../../../../../../../etc/passwd", "../private/secret.png", str(secret),
                "images/../../private/secret.png"):
        labels_csv = _csv(root / "labels.csv", ("path", "label"), inside + [(bad, "a")])
        with pytest.raises(LabelError, match=rf"labels.csv line 7: '{re.escape(bad)}' leads "
                                             r"outside the CSV's folder .*--allow-outside-root"):
            read_labels(labels_csv)
    with pytest.warns(UserWarning, match="duplicate"):  # linked/secret.png: the same image
        allowed = read_labels(_csv(root / "labels.csv", ("path", "label"),
                                   inside + [("../private/secret.png", "a")]),
                              allow_outside_root=True)
    assert str(secret.resolve()) in allowed.paths and len(allowed) == 5


@pytest.mark.parametrize("column", GROUP_COLUMNS)
def test_patient_column_is_detected_first_found(tmp_path, rng, column):
    paths = [_png(tmp_path / f"{i}.png", rng).name for i in range(4)]
    later = [c for c in GROUP_COLUMNS if GROUP_COLUMNS.index(c) > GROUP_COLUMNS.index(column)]
    header = ("label", column, *later, "path")
    rows = [("b" if i % 2 else "a", f"id{i}", *(["other"] * len(later)), p)
            for i, p in enumerate(paths)]
    data = read_labels(_csv(tmp_path / "labels.csv", header, rows))
    assert data.groups.tolist() == [f"id{i}" for i in range(4)]
    no_groups = read_labels(_csv(tmp_path / "plain.csv", ("path", "label"),
                                 [(p, "ab"[i % 2]) for i, p in enumerate(paths)]))
    assert no_groups.groups is None


def test_numeric_class_names_sort_as_numbers_and_model_classes_set_the_order(tmp_path, rng):
    rows = [(_png(tmp_path / f"{i}.png", rng).name, label) for i, label in enumerate(
        ["10", "2", "10", "1"])]
    labels_csv = _csv(tmp_path / "labels.csv", ("path", "label"), rows)
    data = read_labels(labels_csv)
    assert data.classes == ["1", "2", "10"] and data.labels.tolist() == [2, 1, 2, 0]
    ordered = read_labels(labels_csv, classes=["10", "2", "1", "99"])
    assert ordered.classes == ["10", "2", "1", "99"] and ordered.labels.tolist() == [0, 1, 0, 2]
    assert ordered.class_counts() == {"10": 2, "2": 1, "1": 1, "99": 0}


def test_folder_per_class(tmp_path, rng):
    for name, count in (("malignant", 2), ("benign", 3)):
        for i in range(count):
            _png(tmp_path / "data" / name / "sub" / f"{i}.png", rng)
    (tmp_path / "data" / "benign" / "notes.txt").write_text("not an image")
    data = read_labels(tmp_path / "data")
    assert data.classes == ["benign", "malignant"] and data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.groups is None
    assert [r.name for r in data.to_image_list().records][-1] == "malignant/sub/1.png"
    assert read_labels(tmp_path / "data", classes=["malignant", "benign"]).labels.tolist() == \
        [1, 1, 1, 0, 0]
    with pytest.raises(LabelError, match="unknown class 'benign' in folder .*benign.*the model "
                                         r"knows \['malignant', 'normal'\]"):
        read_labels(tmp_path / "data", classes=["malignant", "normal"])
    _png(tmp_path / "data" / "loose.png", rng)
    with pytest.raises(LabelError, match="outside a class folder"):
        read_labels(tmp_path / "data")
    (tmp_path / "empty" / "benign").mkdir(parents=True)
    with pytest.raises(LabelError, match="no class subfolders"):
        read_labels(tmp_path / "empty")


def test_unknown_class_names_the_class_the_file_and_the_lines(tmp_path, rng):
    rows = [(_png(tmp_path / f"{i}.png", rng).name, label)
            for i, label in enumerate(["a", "x", "b", "x", "a"])]
    labels_csv = _csv(tmp_path / "labels.csv", ("path", "label"), rows)
    with pytest.raises(LabelError, match=r"unknown class 'x' in labels.csv lines 3, 5; "
                                         r"the model knows \['a', 'b'\]"):
        read_labels(labels_csv, classes=["a", "b"])
    with pytest.raises(LabelError, match="classes: expected at least 2"):
        read_labels(labels_csv, classes=["a"])


def test_missing_images_are_listed_with_their_count(tmp_path, rng):
    rows = [(_png(tmp_path / "a.png", rng).name, "a"), ("gone/1.png", "b")] + \
        [(f"gone/{i}.png", "b") for i in range(2, 9)]
    with pytest.raises(LabelError, match=r"8 image\(s\) listed in .*labels.csv do not exist: "
                                         r".*gone/1.png \(labels.csv line 3\)") as error:
        read_labels(_csv(tmp_path / "labels.csv", ("path", "label"), rows))
    assert str(error.value).count("gone/") == 5


def test_undecodable_images_are_skipped_with_a_warning_and_good_ones_kept(tmp_path, rng):
    good = [_png(tmp_path / f"ok{i}.png", rng) for i in range(4)]
    data = good[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    rows = [(p.name, "ab"[i % 2]) for i, p in enumerate(good)] + \
        [("truncated.png", "a"), ("text.png", "b")]
    with pytest.warns(BadImageWarning, match="skipped 2 unreadable .*truncated.png.*text.png"):
        labelled = read_labels(_csv(tmp_path / "labels.csv", ("path", "label"), rows))
    assert labelled.paths == [str(p.resolve()) for p in good]
    assert labelled.labels.tolist() == [0, 1, 0, 1]
    rows = [(good[0].name, "a"), ("truncated.png", "b")]
    with pytest.warns(BadImageWarning), pytest.raises(LabelError, match="at least 2 classes"):
        read_labels(_csv(tmp_path / "one_left.csv", ("path", "label"), rows))


def test_bad_label_files_raise_naming_the_problem(tmp_path, rng):
    a, b = (_png(tmp_path / f"{n}.png", rng).name for n in "ab")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(LabelError, match="empty.csv is empty"):
        read_labels(tmp_path / "empty.csv")
    with pytest.raises(LabelError, match="header but no rows"):
        read_labels(_csv(tmp_path / "header.csv", ("path", "label"), []))
    with pytest.raises(LabelError, match=r"no \['label'\] column"):
        read_labels(_csv(tmp_path / "nolabel.csv", ("path", "class"), [(a, "x")]))
    with pytest.raises(LabelError, match="line 3 has an empty 'label'"):
        read_labels(_csv(tmp_path / "blank.csv", ("path", "label"), [(a, "x"), (b, " ")]))
    with pytest.raises(LabelError, match="line 2 has an empty 'patient'"):
        read_labels(_csv(tmp_path / "nopatient.csv", ("path", "label", "patient"),
                         [(a, "x", ""), (b, "y", "p")]))
    with pytest.raises(LabelError, match=r"at least 2 classes, .*\['x'\]"):
        read_labels(_csv(tmp_path / "single.csv", ("path", "label"), [(a, "x"), (b, "x")]))
    with pytest.raises(LabelError, match="a.png is listed twice .*lines 2, 4"):
        read_labels(_csv(tmp_path / "conflict.csv", ("path", "label"),
                         [(a, "x"), (b, "y"), (a, "y")]))
    with pytest.warns(UserWarning, match="1 duplicate row"):
        merged = read_labels(_csv(tmp_path / "dup.csv", ("path", "label"),
                                  [(a, "x"), (b, "y"), (a, "x")]))
    assert len(merged) == 2
    with pytest.raises(LabelError, match="neither a CSV file nor a directory"):
        read_labels(tmp_path / "nowhere.csv")
