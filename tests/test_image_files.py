"""The image list both loaders read: sources (manifest, directory, tar shards), labels (CSV,
folder-per-class, .cls members), up-front checks of bad files, and the sampling plan."""
import csv
import tarfile

import numpy as np
import pytest
from PIL import Image

from usfmae_fast.data.load.image_files import (BadImageWarning, ImageRecord, epoch_batches,
                                          image_problem, load_image_list, read_bytes)


def _png(path, value=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


def _write_csv(path, rows, header=("path", "label")):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def corrupt_idat(data: bytes) -> bytes:
    """A PNG whose compressed data is damaged but whose start and end are intact."""
    middle = len(data) // 2
    return data[:middle] + bytes(40) + data[middle + 40:]


@pytest.fixture
def bad_dir(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((20, 24)) * 255).astype(np.uint8)).save(tmp_path / f"ok{i}.png")
    Image.fromarray((rng.random((20, 24)) * 255).astype(np.uint8)).save(tmp_path / "ok.jpg")
    png = (tmp_path / "ok0.png").read_bytes()
    jpg = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"this is not an image")
    (tmp_path / "crc.png").write_bytes(corrupt_idat(png))
    return tmp_path


def test_header_check_names_each_problem(bad_dir):
    reasons = {p.name: image_problem(ImageRecord(str(p), p.name)) for p in bad_dir.iterdir()}
    assert reasons["ok0.png"] is None and reasons["ok.jpg"] is None
    assert "truncated PNG" in reasons["truncated.png"]
    assert "truncated JPEG" in reasons["truncated.jpg"]
    assert reasons["empty.png"] == "empty file"
    assert reasons["text.jpg"] == "not a PNG or JPEG file"
    assert reasons["crc.png"] is None  # intact start and end: only decoding finds it
    assert image_problem(ImageRecord(str(bad_dir / "crc.png"), "crc.png"), "full") is not None
    assert "FileNotFoundError" in image_problem(ImageRecord(str(bad_dir / "gone.png"), "gone"))


@pytest.mark.parametrize("check, kept", [("header", {"ok0.png", "ok1.png", "ok2.png", "ok.jpg",
                                                     "crc.png"}),
                                         ("full", {"ok0.png", "ok1.png", "ok2.png", "ok.jpg"})])
def test_bad_files_are_left_out_with_one_warning(bad_dir, check, kept):
    with pytest.warns(BadImageWarning) as caught:
        images = load_image_list(bad_dir, check=check)
    assert {r.name for r in images.records} == kept
    assert len(caught) == 1
    for name in ("truncated.png", "truncated.jpg", "empty.png", "text.jpg"):
        assert name in str(caught[0].message)


def test_manifest_paths_are_relative_to_it_and_labels_come_from_a_csv(tmp_path):
    for i in range(4):
        _png(tmp_path / "data" / "img" / f"{i}.png", value=10 * i)
    _write_csv(tmp_path / "data" / "manifest.csv",
               [(f"img/{i}.png", f"{i}x{i}") for i in range(4)], header=("path", "size"))
    # paths relative to the labels CSV, numeric class names sorted as numbers; 3.png unlabelled
    _write_csv(tmp_path / "labels.csv", [("data/img/0.png", "10"), ("data/img/1.png", "2"),
                                         ("data/img/2.png", "10")])
    plain = load_image_list(tmp_path / "data")  # the directory's manifest.csv is used
    assert [r.name for r in plain.records] == [f"img/{i}.png" for i in range(4)]
    assert not plain.labelled and all(r.label == -1 for r in plain.records)
    with pytest.warns(UserWarning, match="1 image"):
        labelled = load_image_list(tmp_path / "data" / "manifest.csv",
                                   labels=tmp_path / "labels.csv")
    assert labelled.classes == ["2", "10"]
    assert [(r.name, r.label) for r in labelled.records] == [("img/0.png", 1), ("img/1.png", 0),
                                                             ("img/2.png", 1)]
    assert read_bytes(labelled.records[1]) == (tmp_path / "data/img/1.png").read_bytes()
    assert labelled.subset([2]).records == [labelled.records[2]]


def test_folder_per_class_labels(tmp_path):
    for cls, n in (("malignant", 2), ("benign", 3)):
        for i in range(n):
            _png(tmp_path / cls / "scans" / f"{i}.png")
    images = load_image_list(tmp_path, labels="folder")
    assert images.classes == ["benign", "malignant"]
    assert [r.label for r in images.records] == [0, 0, 0, 1, 1]
    _png(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="class folder"):
        load_image_list(tmp_path, labels="folder")


def test_tar_shards_with_cls_labels(tmp_path):
    files = [_png(tmp_path / "src" / f"{i:03d}.png", value=40 * i, size=(8 + i, 6)) for i in range(5)]
    for shard, part in (("shard-000.tar", files[:3]), ("shard-001.tar", files[3:])):
        with tarfile.open(tmp_path / shard, "w") as tar:
            for f in part:
                tar.add(f, arcname=f"scans/{f.name}")
                cls = tmp_path / "src" / f"{f.stem}.cls"
                cls.write_text("cyst" if int(f.stem) % 2 else "solid")
                tar.add(cls, arcname=f"scans/{f.stem}.cls")
    images = load_image_list(str(tmp_path / "shard-*.tar"), labels="cls")
    assert [r.name for r in images.records] == [f"scans/{f.name}" for f in files]
    assert all(read_bytes(r) == f.read_bytes() for r, f in zip(images.records, files))
    assert images.classes == ["cyst", "solid"]
    assert [r.label for r in images.records] == [1, 0, 1, 0, 1]
    # a labels CSV names shard members by their name inside the shard
    _write_csv(tmp_path / "labels.csv", [(f"scans/{f.name}", "a") for f in files])
    assert load_image_list(tmp_path / "shard-000.tar", labels=tmp_path / "labels.csv").classes == ["a"]
    # ingest's layout: <key>.png + <key>.json members, labels CSV written against the manifest
    with tarfile.open(tmp_path / "ingest.tar", "w") as tar:
        for f in files[:2]:
            tar.add(f, arcname=f.name)
            tar.add(f, arcname=f"{f.stem}.json")  # not an image: ignored
    _write_csv(tmp_path / "manifest_labels.csv", [(f"images/ab/{f.name}", f"c{f.stem}")
                                                  for f in files])
    ingested = load_image_list(tmp_path / "ingest.tar", labels=tmp_path / "manifest_labels.csv")
    assert [(r.name, ingested.classes[r.label]) for r in ingested.records] == [
        (f.name, f"c{f.stem}") for f in files[:2]]
    (tmp_path / "shards").mkdir()
    (tmp_path / "ingest.tar").rename(tmp_path / "shards" / "ingest.tar")
    assert len(load_image_list(tmp_path / "shards")) == 2  # a folder of shards
    with tarfile.open(tmp_path / "zipped.tar.gz", "w:gz") as tar:
        tar.add(files[0], arcname=files[0].name)
    (tmp_path / "zipped.tar.gz").rename(tmp_path / "zipped.tar")
    with pytest.raises(ValueError, match="uncompressed"):
        load_image_list(tmp_path / "zipped.tar")


def test_bad_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_list(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_image_list(str(tmp_path / "*.tar"))
    _write_csv(tmp_path / "list.csv", [("a.png",)], header=("file",))
    with pytest.raises(ValueError, match="'path' column"):
        load_image_list(tmp_path / "list.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable image"):
        load_image_list(tmp_path / "empty")


def test_epoch_batches_shard_by_rank_and_reshuffle_by_epoch():
    n, bs, world = 103, 8, 3
    per_rank = [epoch_batches(n, bs, epoch=2, seed=5, rank=r, world_size=world)
                for r in range(world)]
    flat = [np.concatenate(b) for b in per_rank]
    assert {len(b) for b in per_rank} == {n // world // bs}  # same step count on every rank
    assert all(len(b) == bs for batches in per_rank for b in batches)
    assert len(set(np.concatenate(flat))) == sum(len(f) for f in flat)  # disjoint shards
    again = epoch_batches(n, bs, epoch=2, seed=5, rank=1, world_size=world)
    assert all(np.array_equal(a, b) for a, b in zip(again, per_rank[1]))
    other = np.concatenate(epoch_batches(n, bs, epoch=3, seed=5, rank=1, world_size=world))
    assert not np.array_equal(other, flat[1])
    # evaluation: in order, every image exactly once over the ranks, short last batch kept
    ev = [np.concatenate(epoch_batches(n, bs, shuffle=False, drop_last=False, rank=r,
                                       world_size=world)) for r in range(world)]
    assert sorted(np.concatenate(ev).tolist()) == list(range(n))
    assert ev[0].tolist() == list(range(0, n, world))
    with pytest.raises(ValueError):
        epoch_batches(n, bs, rank=3, world_size=3)
