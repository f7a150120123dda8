"""``usfmae-fast finetune / evaluate / predict / embed`` through ``cli.main``: a quick run and
its report, bad input -> exit code 2 with the reason on stderr before training, predictions
for PNGs and a multi-frame DICOM, features from MAE and classifier checkpoints, and Score-CAM
on a fold's best checkpoint."""
import csv
import json
import shutil

import numpy as np
import pytest

from _finetune_data import TINY_MAE, make_labelled_set, tiny_mae_checkpoint
from usfmae_fast.cli import main
from usfmae_fast.models import MaskedAutoencoderViT

QUICK = ["--quick", "--quiet", "--epochs", "1", "--backend", "torch", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    return make_labelled_set(tmp_path_factory.mktemp("data"), per_class=8)


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    return tiny_mae_checkpoint(tmp_path_factory.mktemp("mae"))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, labels, mae_ckpt):
    out = tmp_path_factory.mktemp("finetune")
    code = main(["finetune", "--labels", str(labels), "--out", str(out), "--models",
                 "usfmae,test_resnet_linprobe", "--init", str(mae_ckpt), "--seed", "1",
                 "--imbalance", "weights", *QUICK])
    assert code == 0
    return out


def test_finetune_quick_run_reports(finetuned, capsys):
    report = json.loads((finetuned / "report.json").read_text())
    assert list(report["models"]) == ["usfmae", "test_resnet_linprobe"]
    assert report["config"]["train"]["imbalance"] == "weights"
    assert report["config"]["train"]["epochs"] == 1 and report["config"]["seed"] == 1
    assert (finetuned / "usfmae" / "fold1" / "best.safetensors").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--classes", "normal,cyst"], "labels: unknown class 'solid'"),
    (["--folds", "5", "--test-size", "0"], "class 'cyst' has 4 patients, fewer than the 5"),
    (["--models", "usfmae"], "init: model 'usfmae' starts from a pretrained MAE"),
    (["--weights", "densenet169"], "weights: 'densenet169' is not NAME=PATH"),
    (["--layer-decay", "2"], "layer_decay: 2.0 is out of range"),
    (["--positive", "cyst"], "positive: 'cyst' is only for binary tasks"),
    (["--selection", "inner"], "selection: fold 0's training part cannot spare"),
    (["--target-sensitivity", "0.9"], "target_sensitivity: give it"),
    (["--threshold", "sensitivity", "--target-sensitivity", "1.5"],
     "target_sensitivity: must lie in (0, 1]"),
])
def test_bad_input_exits_2_before_training(tmp_path, labels, capsys, extra, message):
    out = tmp_path / "out"
    args = ["finetune", "--labels", str(labels), "--out", str(out), "--models", "test_resnet"]
    assert main(args + QUICK + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("usfmae-fast finetune: ") and message in err
    assert not out.exists()


def test_statistics_flags_reach_the_config(labels):
    from usfmae_fast.cli import build_parser
    from usfmae_fast.cli.finetune import config_from_args

    args = build_parser().parse_args([
        "finetune", "--labels", str(labels), "--positive", "solid", "--selection", "fixed",
        "--inner-size", "0.25", "--threshold", "sensitivity", "--target-sensitivity", "0.9",
        "--temperature"])
    cfg = config_from_args(args)
    assert (cfg.positive, cfg.selection, cfg.inner_size, cfg.threshold, cfg.target_sensitivity,
            cfg.temperature) == ("solid", "fixed", 0.25, "sensitivity", 0.9, True)


def test_missing_image_exits_2(tmp_path, labels, capsys):
    bad = tmp_path / "labels.csv"
    shutil.copytree(labels.parent / "images", tmp_path / "images")
    bad.write_text(labels.read_text() + "images/solid/lost.png,solid,solid-p9\n")
    assert main(["finetune", "--labels", str(bad), "--out", str(tmp_path / "o"), "--models",
                 "test_resnet", *QUICK]) == 2
    assert "lost.png" in capsys.readouterr().err


def _outside_csv(tmp_path, labels):
    """A labels CSV beside a link to the real images, with one line that leaves its folder."""
    bad = tmp_path / "labels.csv"
    (tmp_path / "images").symlink_to(labels.parent / "images")
    bad.write_text(labels.read_text() + "../../../../../../../../etc/passwd,solid,solid-p9\n")
    return bad


def test_finetune_refuses_paths_outside_the_labels_folder(tmp_path, labels, capsys):
    """Issue 15 item 9: the line that leaves the CSV's folder is named, exit 2, unless
    --allow-outside-root (then the run goes on to its next check: here too many folds)."""
    bad = _outside_csv(tmp_path, labels)
    args = ["finetune", "--labels", str(bad), "--out", str(tmp_path / "o"), "--models",
            "test_resnet", *QUICK, "--folds", "9", "--test-size", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "labels.csv line 26: '../../../../../../../../etc/passwd' leads outside" in err
    assert "--allow-outside-root" in err
    with pytest.warns(UserWarning, match="passwd"):  # allowed, then left out: not an image
        assert main(args + ["--allow-outside-root"]) == 2
    assert "fewer than the 9 folds" in capsys.readouterr().err


def test_evaluate_refuses_paths_outside_the_labels_folder(finetuned, labels, tmp_path, capsys):
    ckpts = [str(finetuned / "usfmae" / f"fold{k}" / "best.safetensors") for k in range(2)]
    bad = _outside_csv(tmp_path, labels)
    args = ["evaluate", "--ckpt", *ckpts, "--labels", str(bad), "--out", str(tmp_path / "e"),
            "--n-boot", "20", "--backend", "torch"]
    assert main(args) == 2
    assert "line 26: '../../../../../../../../etc/passwd' leads outside" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="passwd"):  # allowed, then left out: not an image
        assert main(args + ["--allow-outside-root"]) == 0
    assert json.loads(capsys.readouterr().out.split("report:")[0])["n"] == 24


def test_evaluate_and_scorecam_on_fold_checkpoints(finetuned, labels, tmp_path, capsys):
    ckpts = [str(finetuned / "usfmae" / f"fold{k}" / "best.safetensors") for k in range(2)]
    out = tmp_path / "eval"
    assert main(["evaluate", "--ckpt", *ckpts, "--labels", str(labels), "--out", str(out),
                 "--n-boot", "20", "--name", "usfmae", "--backend", "torch"]) == 0
    printed = json.loads(capsys.readouterr().out.split("report:")[0])
    assert printed["n"] == 24
    report = json.loads((out / "report.json").read_text())
    assert len(report["models"]["usfmae"]["test"]["folds"]) == 2
    assert (out / "usfmae" / "roc.png").is_file()
    assert main(["evaluate", "--ckpt", str(tmp_path / "none.safetensors"), "--labels",
                 str(labels), "--out", str(out)]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    # the best-epoch checkpoint is what usfmae-fast scorecam explains
    images = labels.parent / "images" / "cyst"
    assert main(["scorecam", "--ckpt", ckpts[0], "--images", str(images), "--out",
                 str(tmp_path / "cam")]) == 0
    assert len(list((tmp_path / "cam" / "heatmaps").glob("*.npy"))) == 8


def test_predict_images_and_dicom_frames(finetuned, labels, tmp_path, capsys):
    folder = tmp_path / "inputs"
    shutil.copytree(labels.parent / "images" / "solid", folder)
    try:
        from pydicom.data import get_testdata_file
        dicom = get_testdata_file("OBXXXX1A_rle_2frame.dcm")
    except ImportError:
        dicom = None
    if dicom:
        shutil.copy(dicom, folder / "scan")  # no extension: recognised by content
    (folder / "notes.txt").write_text("not an image")
    ckpt = finetuned / "test_resnet_linprobe" / "fold0" / "best.safetensors"
    out = tmp_path / "pred.csv"
    assert main(["predict", "--ckpt", str(ckpt), "--images", str(folder), "--out",
                 str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["frames"] == 8 + (2 if dicom else 0)
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in ("cyst", "normal", "solid")]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert row["predicted"] == ("cyst", "normal", "solid")[int(np.argmax(probs))]
    if dicom:
        assert [r["frame"] for r in rows if r["path"].endswith("scan")] == ["0", "1"]
    assert main(["predict", "--ckpt", str(ckpt), "--images", str(tmp_path / "nothing"),
                 "--out", str(out)]) == 2


def test_embed_from_mae_and_classifier(finetuned, labels, mae_ckpt, tmp_path, capsys):
    out = tmp_path / "mae_features"
    assert main(["embed", "--ckpt", str(mae_ckpt), "--images", str(labels), "--out",
                 str(out)]) == 0
    features = np.load(out / "features.npy")
    assert features.shape == (24, 32) and features.dtype == np.float32
    with (out / "index.csv").open() as f:
        index = list(csv.DictReader(f))
    assert index[0].keys() >= {"row", "path", "frame", "label", "patient_id"}
    assert [r["label"] for r in index[:8]] == ["normal"] * 8
    # the MAE encoder's pooled features: the final norm on every token, then the mean
    encoder = MaskedAutoencoderViT(in_chans=1, **TINY_MAE)
    import safetensors.torch
    encoder.load_state_dict(safetensors.torch.load_file(mae_ckpt))
    from usfmae_fast.finetune.inference import find_inputs, iter_input_frames
    from usfmae_fast.data.load.torch_loader import eval_transform
    _, _, pixels = next(iter_input_frames(find_inputs([labels]), 1))
    x = eval_transform(32, 0.15, 0.2)(pixels)[None]
    expected = encoder.forward_features(x)[:, 1:].mean(dim=1)
    np.testing.assert_allclose(features[0], expected[0].detach().numpy(), atol=1e-5)

    ckpt = finetuned / "usfmae" / "fold0" / "best.safetensors"
    assert main(["embed", "--ckpt", str(ckpt), "--images", str(labels.parent / "images"),
                 "--out", str(tmp_path / "cls_features")]) == 0
    assert np.load(tmp_path / "cls_features" / "features.npy").shape == (24, 32)
    capsys.readouterr()
    assert main(["embed", "--ckpt", str(tmp_path / "missing.pth"), "--images", str(labels),
                 "--out", str(tmp_path / "x")]) == 2
    assert "ckpt: " in capsys.readouterr().err
