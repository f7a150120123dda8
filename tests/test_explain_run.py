"""What a Score-CAM run explains and records: the ground-truth class when labels are given (also
when the prediction is wrong), the class name in every figure title, all-zero maps counted,
trivial-map baselines and the tolerance beside the localisation scores, the target layer
choice, and deletion / insertion areas per method."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_explain import TINY_VIT, tiny_vit

from usfmae_fast.explain import ScoreCAM, localise, run
from usfmae_fast.explain.localization import summarise
from usfmae_fast.models.classifier import load_finetuned, write_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["benign", "cyst", "solid"]


@pytest.fixture
def case(tmp_path):
    """A 3-class tiny ViT checkpoint naming its classes, two 32 x 32 images, their model input
    and predicted classes."""
    ckpt = write_classifier(tmp_path / "c.safetensors", tiny_vit().state_dict(),
                            arch="vit_base_patch16_224", model_kwargs=dict(TINY_VIT),
                            classes=CLASSES, mean=(0.5,) * 3, std=(0.5,) * 3)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{name}.png")
    loaded = load_finetuned(ckpt)
    paths = sorted(folder.glob("*.png"))
    x = run.model_batch(paths, 3, (32, 32), loaded.mean, loaded.std)
    predicted = loaded.model(x).argmax(1).tolist()
    return ckpt, folder, loaded.model, x, predicted


def write_labels(tmp_path, names):
    path = tmp_path / "labels.csv"
    path.write_text("path,label\n" + "".join(f"images/{stem}.png,{label}\n"
                                             for stem, label in zip("ab", names)))
    return path


def capture_titles(monkeypatch) -> list:
    """The titles every grid figure of the run gets."""
    titles, save_grid = [], run.save_grid

    def spy(*args, **kwargs):
        titles.extend(kwargs["titles"])
        return save_grid(*args, **kwargs)
    monkeypatch.setattr(run, "save_grid", spy)
    return titles


def test_labels_explain_the_true_class_when_the_prediction_is_wrong(case, tmp_path, monkeypatch):
    ckpt, folder, model, x, predicted = case
    wrong = [(p + 1) % 3 for p in predicted]  # every prediction wrong
    labels = write_labels(tmp_path, [CLASSES[w] for w in wrong])
    titles = capture_titles(monkeypatch)
    summary = run.explain_images(ckpt, [folder], tmp_path / "out", labels=str(labels),
                                 faithfulness=False)
    assert summary["class_explained"] == "label" and summary["correct_predictions"] == 0
    records = summary["images"]
    assert [r["target"] for r in records] == wrong
    assert [r["class"] for r in records] == [r["label"] for r in records]
    assert [r["predicted"] for r in records] == [CLASSES[p] for p in predicted]
    expected = ScoreCAM(model)(x, wrong).maps.numpy()
    for r, heat in zip(records, expected):
        np.testing.assert_allclose(np.load(tmp_path / "out" / "heatmaps" / f"{r['name']}.npy"),
                                   heat, atol=1e-5)
    assert titles == [f"{r['name']}: {r['class']} (label, pred {r['predicted']})"
                      for r in records]

    titles.clear()  # the flag chooses the prediction; titles follow
    summary = run.explain_images(ckpt, [folder], tmp_path / "out", labels=str(labels),
                                 class_source="predicted", faithfulness=False)
    assert summary["class_explained"] == "predicted"
    assert [r["target"] for r in summary["images"]] == predicted
    assert titles == [f"{r['name']}: {CLASSES[p]} (predicted)"
                      for r, p in zip(summary["images"], predicted)]
    titles.clear()
    summary = run.explain_images(ckpt, [folder], tmp_path / "out", faithfulness=False)
    assert summary["class_explained"] == "predicted" and summary["correct_predictions"] is None


def test_label_errors_name_the_argument(case, tmp_path):
    ckpt, folder, *_ = case
    explain = lambda **kw: run.explain_images(ckpt, [folder], tmp_path / "o",  # noqa: E731
                                              faithfulness=False, **kw)
    with pytest.raises(ValueError, match=r"labels: \['tumour'\] are not classes"):
        explain(labels=str(write_labels(tmp_path, ["cyst", "tumour"])))
    with pytest.raises(ValueError, match="labels: 1 image"):
        explain(labels={folder / "a.png": "cyst"})
    with pytest.raises(ValueError, match="class_source: 'label' needs labels"):
        explain(class_source="label")
    with pytest.raises(ValueError, match="class_source: 'predicted' contradicts class_idx"):
        explain(class_source="predicted", class_idx=1)
    with pytest.raises(FileNotFoundError, match="labels"):
        explain(labels=str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match=r"labels: \['images'\] are not classes"):
        explain(labels="folder")  # each image's folder name


def test_summary_records_zero_maps_baselines_tolerance_layer_and_faithfulness(
        case, tmp_path, monkeypatch):
    ckpt, folder, *_ = case
    masks = tmp_path / "masks"
    masks.mkdir()
    lesions = {"a": np.zeros((32, 32), bool), "b": np.zeros((32, 32), bool)}
    lesions["a"][:21, :21] = True     # holds the corner (0, 0) and the centre (16, 16)
    lesions["b"][24:, 24:] = True     # 11.3 px from the centre
    for name, lesion in lesions.items():
        Image.fromarray(lesion.astype(np.uint8) * 255).save(masks / f"{name}.png")
    cam = run.ScoreCAM._cam

    def first_map_negative(self, *args):  # image a's map is zero after the ReLU
        out = cam(self, *args)
        out[0] = -out[0].abs() - 1
        return out
    monkeypatch.setattr(run.ScoreCAM, "_cam", first_map_negative)
    summary = run.explain_images(ckpt, [folder], tmp_path / "out", masks=str(masks),
                                 target_layer="last_mlp_act", deletion_steps=4)
    assert summary["target_layer"] == "blocks.1.mlp.act"
    assert summary["target_layer_choice"] == "last_mlp_act"
    a, b = summary["images"]
    assert a["zero_map"] and not b["zero_map"]
    assert not np.load(tmp_path / "out" / "heatmaps" / "a.npy").any()
    assert summary["zero_maps"] == summary["zero_maps_with_masks"] == 1
    assert a["pointing_game"] is False and a["energy_in_mask"] == 0.0  # a miss in both
    assert summary["pointing_game"] == b["pointing_game"] / 2
    assert summary["energy_in_mask"] == pytest.approx(b["energy_in_mask"] / 2)
    assert summary["tolerance"] == pytest.approx(15 * 32 / 224)
    assert "15 px at 224" in summary["tolerance_rule"]
    assert summary["pointing_game_centre_pointer"] == 0.5
    assert summary["energy_in_mask_centre_pointer"] == 0.5
    assert summary["energy_in_mask_uniform_map"] == pytest.approx((21 * 21 + 8 * 8) / 2 / 1024)
    heats = [np.load(tmp_path / "out" / "heatmaps" / f"{n}.npy") for n in "ab"]
    expected = summarise([localise(h, lesions[n], summary["tolerance"])
                          for h, n in zip(heats, "ab")])
    assert {k: summary[k] for k in expected if k != "zero_maps"} == \
        {k: v for k, v in expected.items() if k != "zero_maps"}

    faith = summary["faithfulness"]
    assert set(faith["methods"]) == {"scorecam", "gradcam", "eigencam", "random"}
    assert (faith["images"], faith["steps"], faith["baseline"]) == (2, 4, "blur")
    assert "softmax probability" in faith["score"]
    for method, scores in faith["methods"].items():
        for kind in ("deletion_auc", "insertion_auc"):
            assert 0 <= scores[kind] <= 1
            assert scores[kind] == pytest.approx(np.mean([r[kind][method] for r in (a, b)]))
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["faithfulness"] == faith and written["zero_maps"] == 1


def test_cli_flags_reach_the_run(case, tmp_path):
    from usfmae_fast.cli import main
    ckpt, folder, _, _, predicted = case
    labels = write_labels(tmp_path, [CLASSES[p] for p in predicted])
    out = tmp_path / "out"
    base = ["scorecam", "--ckpt", str(ckpt), "--images", str(folder), "--out", str(out)]
    assert main(base + ["--labels", str(labels), "--class-source", "predicted",
                        "--no-faithfulness", "--tolerance", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["class_explained"], summary["faithfulness"], summary["tolerance"],
            summary["tolerance_rule"], summary["correct_predictions"]) == \
        ("predicted", None, 0.0, "given", 2)
    assert main(base + ["--labels", str(labels), "--layer", "last_mlp_act", "--deletion-steps",
                        "3", "--deletion-baseline", "mean", "--seed", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    faith = summary["faithfulness"]
    assert (summary["class_explained"], summary["target_layer"]) == ("label", "blocks.1.mlp.act")
    assert (faith["steps"], faith["baseline"], faith["seed"]) == (3, "mean", 5)
    assert main(base + ["--set", "deletion_baseline=zero"]) == 2
    assert main(base + ["--class-source", "label"]) == 2
