"""Score-CAM / Grad-CAM / Eigen-CAM against the grad-cam package (the reference) on tiny timm
ViTs and a tiny DenseNet, plus error messages, localisation scores, figures and the CLI."""
import json
from functools import partial

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from PIL import Image

from usfmae_fast.explain import (EigenCAM, GradCAM, ScoreCAM, energy_in_mask, overlay,
                                 pointing_game, save_grid, vit_reshape)

try:  # the reference implementation (requirements-dev.txt, extra "explain")
    import pytorch_grad_cam as gradcam
    from pytorch_grad_cam.utils.model_targets import (ClassifierOutputSoftmaxTarget,
                                                      ClassifierOutputTarget)
    from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform
except ImportError:  # the rest of this file still runs
    gradcam = vit_reshape_transform = None
needs_gradcam = pytest.mark.skipif(gradcam is None, reason="grad-cam (the reference) missing")

TINY_VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
ATOL = 2e-4  # maps in [0, 1]; fp32 forward passes of different batch sizes differ by ~1e-6


@pytest.fixture(autouse=True)
def quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # grad-cam's ScoreCAM shows a bar per image


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with the spread of a trained model. Default LayerNorm affines (1, 0) make
    the channels of a norm output sum to zero per token, and a default head gives nearly equal
    scores: either makes every CAM ill-conditioned noise, which no comparison can check."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape,
                                                            generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape,
                                                          generator=gen))
        head = model.get_classifier() if hasattr(model, "get_classifier") else model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / head.in_features ** 0.25)
    return model.eval()


def tiny_vit(img_size=32, seed=0, **overrides):
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=img_size,
                              num_classes=3, **{**TINY_VIT, **overrides})
    return trained_like(model, seed)


def tiny_densenet(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8,
                                        bn_size=2, num_classes=3)
    return trained_like(model, seed)


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vit_case():
    model = tiny_vit()
    return model, model.blocks[-1].norm1, "blocks.1.norm1", partial(
        vit_reshape_transform, height=4, width=4)


def cnn_case():
    model = tiny_densenet()
    return model, model.features.denseblock2, "features.denseblock2", None


CASES = {"vit": vit_case, "densenet": cnn_case}


# ------------------------------------------------------------------------- vs grad-cam
@needs_gradcam
@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("score", ["logit", "softmax"])
def test_scorecam_matches_gradcam(arch, score):
    model, layer, name, reshape = CASES[arch]()
    x = images()
    target = ClassifierOutputTarget if score == "logit" else ClassifierOutputSoftmaxTarget
    cam = gradcam.ScoreCAM(model, [layer], reshape_transform=reshape)
    cam.batch_size = 7  # its chunks do not divide the channel count either
    expected = cam(x, [target(2), target(0)])
    ours = ScoreCAM(model, name, score=score, batch_size=5)(x, [2, 0])
    assert ours.targets.tolist() == [2, 0]
    assert ours.maps.shape == (2, 32, 32) and ours.maps.dtype == torch.float32
    np.testing.assert_allclose(ours.maps.numpy(), expected, atol=ATOL)
    assert expected.std() > 0.1  # a map with structure, not a constant


@needs_gradcam
@pytest.mark.parametrize("arch", CASES)
def test_gradcam_matches_gradcam(arch):
    model, layer, name, reshape = CASES[arch]()
    x = images(3)
    expected = gradcam.GradCAM(model, [layer], reshape_transform=reshape)(
        x, [ClassifierOutputTarget(t) for t in (0, 1, 2)])
    ours = GradCAM(model, name)(x, [0, 1, 2])
    np.testing.assert_allclose(ours.maps.numpy(), expected, atol=ATOL)


@needs_gradcam
@pytest.mark.parametrize("arch", CASES)
def test_eigencam_matches_gradcam(arch, monkeypatch):
    """grad-cam's EigenCAM with its own sign-corrected projection (the SVD's sign is arbitrary
    and differs between numpy's OpenBLAS and torch's MKL / cuSOLVER)."""
    from pytorch_grad_cam import eigen_cam
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction
    monkeypatch.setattr(eigen_cam, "get_2d_projection", get_2d_projection_with_sign_correction)
    model, layer, name, reshape = CASES[arch]()
    x = images(3)
    expected = gradcam.EigenCAM(model, [layer], reshape_transform=reshape)(x, None)
    ours = EigenCAM(model, name)(x)
    np.testing.assert_allclose(ours.maps.numpy(), expected, atol=ATOL)
    raw = EigenCAM(model, name, sign_correction=False)(x).maps
    flipped = [i for i in range(3) if not torch.allclose(raw[i], ours.maps[i], atol=ATOL)]
    for i in flipped:  # without the correction a map is the ReLU of the other side
        assert torch.corrcoef(torch.stack([raw[i].flatten(), ours.maps[i].flatten()]))[0, 1] < 0.9


# ------------------------------------------------------------------------- our own options
def reference_scorecam(model, x, acts, target, score, weights, align_corners):
    """The definition, one channel at a time."""
    scores = []
    for a in acts[0]:
        up = torch.nn.functional.interpolate(a[None, None], size=x.shape[-2:], mode="bilinear",
                                             align_corners=align_corners)[0, 0]
        mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
        out = model(x * mask)[0]
        scores.append((out.softmax(0) if score == "softmax" else out)[target])
    scores = torch.stack(scores)
    w = scores.softmax(0) if weights == "softmax" else scores
    cam = torch.relu((w[:, None, None] * acts[0]).sum(0))
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
    cam = torch.nn.functional.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear",
                                          align_corners=False)[0, 0]
    return (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)


@pytest.mark.parametrize("weights, score, align_corners",
                         [("raw", "softmax", True), ("raw", "logit", False),
                          ("softmax", "softmax", False)])
@torch.no_grad()
def test_scorecam_options_match_definition(weights, score, align_corners):
    model = tiny_vit(img_size=40)  # 5 x 5 grid: awkward upsampling factors
    x = images(1, 40)
    cam = ScoreCAM(model, "blocks.-1.norm1", score=score, weights=weights,
                   align_corners=align_corners)
    with cam.capture() as store:
        model(x)
    expected = reference_scorecam(model, x, cam.reshape(store[0]), 1, score, weights,
                                  align_corners)
    torch.testing.assert_close(cam(x, 1).maps[0], expected, atol=ATOL, rtol=0)


def test_scorecam_chunking_and_memory_budget():
    model, x = tiny_vit(), images(3)
    whole = ScoreCAM(model, batch_size=96)
    expected = whole(x, 1).maps
    assert whole.last_batch_size == 96
    small = ScoreCAM(model, memory_budget=1 << 20)  # 1 MiB: a few masked inputs per chunk
    torch.testing.assert_close(small(x, 1).maps, expected, atol=ATOL, rtol=0)
    assert 1 <= small.last_batch_size < 96
    default = ScoreCAM(model)
    default(x, 1)
    assert default.last_batch_size == 96  # 3 images x 32 channels fit in the default budget


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_close_to_fp32(dtype):
    model, x = tiny_vit(), images(2)
    expected = ScoreCAM(model)(x, [0, 1]).maps
    try:
        low = ScoreCAM(model, dtype=dtype)(x, [0, 1]).maps
    except RuntimeError as exc:  # a CPU without autocast kernels for this dtype
        pytest.skip(str(exc).splitlines()[0])
    assert low.dtype == torch.float32
    for a, b in zip(low, expected):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.97


def test_gradcam_of_frozen_model_and_inside_no_grad():
    model, x = tiny_vit(), images(2)
    expected = GradCAM(model)(x, 1).maps
    model.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(GradCAM(model)(x, 1).maps, expected)
    assert x.grad is None and not x.requires_grad and model.head.weight.grad is None


def test_default_target_is_prediction_and_logits_reported():
    model, x = tiny_vit(), images(4)
    out = GradCAM(model)(x)
    torch.testing.assert_close(out.logits, model(x))
    assert out.targets.tolist() == model(x).argmax(1).tolist()
    assert ScoreCAM(model).layer_name == "blocks.1.norm1"
    assert ScoreCAM(tiny_densenet()).layer_name == "features.norm5"


def test_capture_survives_inplace_relu_after_layer():
    """torchvision's DenseNet applies ReLU in place to norm5's output; the CAM must see the
    layer's own (pre-ReLU) output, negative values included."""
    model = tiny_densenet()
    cam = GradCAM(model, "features.norm5")
    with cam.capture() as store:
        model(images(1))
    expected = model.features(images(1))  # ends with norm5, before the in-place ReLU
    torch.testing.assert_close(store[0], expected)
    assert store[0].min() < 0


def test_vit_reshape_layout_and_prefix_tokens():
    tokens = torch.arange(2 * (2 + 6) * 3, dtype=torch.float32).view(2, 8, 3)
    grid = vit_reshape(tokens, (2, 3), num_prefix_tokens=2)
    assert grid.shape == (2, 3, 2, 3)
    assert torch.equal(grid[1, :, 1, 2], tokens[1, 2 + 1 * 3 + 2])  # row-major patches
    assert vit_reshape(torch.zeros(1, 17, 4)).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="prefix tokens do not fill a 3x3"):
        vit_reshape(torch.zeros(1, 17, 4), (3, 3))


# ------------------------------------------------------------------------- bad input
def test_unknown_layer_names_argument_and_suggests():
    with pytest.raises(ValueError, match=r"target_layer: .*'blocks.1.norm3'.*blocks.1.norm1"):
        ScoreCAM(tiny_vit(), "blocks.1.norm3")
    with pytest.raises(ValueError, match="target_layer"):
        GradCAM(tiny_vit(), "blocks.5.norm1")
    with pytest.raises(ValueError, match="target_layer: no default"):
        ScoreCAM(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))


@pytest.mark.parametrize("cls", [ScoreCAM, GradCAM, EigenCAM])
def test_bad_targets_and_images_name_the_argument(cls):
    cam = cls(tiny_vit())
    with pytest.raises(ValueError, match=r"targets: class index 3 is out of range .* 3 classes"):
        cam(images(2), [0, 3])
    with pytest.raises(ValueError, match="targets: class index -1"):
        cam(images(1), -1)
    with pytest.raises(ValueError, match="targets: expected None, one class index or 2"):
        cam(images(2), [0, 1, 2])
    with pytest.raises(ValueError, match=r"images: expected shape \[N, 3, 32, 32\].*48, 48\)"):
        cam(images(1, 48))
    with pytest.raises(ValueError, match="images"):
        cam(torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="images"):
        cam(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bad_options_name_the_argument():
    model = tiny_vit()
    for kwargs, name in ((dict(score="prob"), "score"), (dict(weights="mean"), "weights"),
                         (dict(dtype="fp8"), "dtype"), (dict(batch_size=0), "batch_size"),
                         (dict(memory_budget=-1), "memory_budget")):
        with pytest.raises(ValueError, match=name):
            ScoreCAM(model, **kwargs)


# ------------------------------------------------------------------------- localisation
def test_pointing_game_and_energy():
    heat = np.zeros((2, 8, 8))
    heat[0, 2, 3], heat[0, 6, 6] = 1.0, 0.5
    heat[1, 7, 7], heat[1, 0, 0] = 1.0, 1.0  # tie: the first maximum (0, 0) counts
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, 1:4, 2:5] = True
    mask[1, 0, 0] = True
    assert pointing_game(heat, mask).tolist() == [True, True]
    mask[1, 0, 0] = False
    assert pointing_game(heat[1], mask[1]) is False
    assert pointing_game(heat[1], mask[1], tolerance=1.5) is False  # (0,0) -> (1,2): 2.24 px
    assert pointing_game(heat[1], mask[1], tolerance=2.5) is True
    assert pointing_game(torch.tensor(heat[1]), torch.tensor(mask[1]), tolerance=2.0) is False
    np.testing.assert_allclose(energy_in_mask(heat, mask), [1 / 1.5, 0.0])
    assert energy_in_mask(np.zeros((8, 8)), mask[0]) == 0.0  # all zero: no energy inside
    with pytest.raises(ValueError, match="mask: image 0 has an empty mask"):
        energy_in_mask(heat[0], np.zeros((8, 8)))
    with pytest.raises(ValueError, match="mask: shape"):
        pointing_game(heat, mask[0])
    with pytest.raises(ValueError, match="heatmap"):
        energy_in_mask(-heat, mask)


# ------------------------------------------------------------------------- figures
def test_overlay_blends_with_colormap(tmp_path):
    import matplotlib
    image = np.linspace(0, 1, 12).reshape(3, 4)
    heat = np.full((3, 4), 0.25)
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0)[..., 0],
                                  np.round(255 * image).astype(np.uint8))
    jet = np.round(255 * np.array(matplotlib.colormaps["jet"](0.25)[:3])).astype(np.uint8)
    assert (overlay(image, heat, alpha=1.0) == jet).all()
    with pytest.raises(ValueError, match="heatmap: shape"):
        overlay(image, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, heat, alpha=1.5)
    tiles = save_grid([image] * 5, np.stack([heat] * 5), tmp_path / "tiles.png", columns=2)
    pair = save_grid([image] * 2, {"ViT": np.stack([heat] * 2), "DenseNet": np.stack([heat] * 2)},
                     tmp_path / "pair.png", masks=[heat > 0, None])
    assert Image.open(tiles).size[1] > Image.open(pair).size[1]  # 3 rows vs 2
    with pytest.raises(ValueError, match=r"maps\['ViT'\]: 1 maps for 2 images"):
        save_grid([image] * 2, {"ViT": heat[None]}, tmp_path / "bad.png")


# ------------------------------------------------------------------------- CLI
def test_cli_scorecam_writes_maps_overlays_grid_and_scores(tmp_path):
    from usfmae_fast.cli import main
    from usfmae_fast.explain.run import load_image
    from usfmae_fast.models import MaskedAutoencoderViT, to_timm_state_dict

    torch.manual_seed(0)  # a USF-MAE encoder exported to timm names + a 2-class head
    encoder = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                   decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    state = dict(to_timm_state_dict(encoder), **{"head.weight": torch.randn(2, 32),
                                                 "head.bias": torch.zeros(2)})
    ckpt = tmp_path / "classifier.safetensors"
    kwargs = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, ckpt,
                                {"arch": "usfmae_vit_tiny_patch16_224",
                                 "model_kwargs": json.dumps(kwargs)})
    folder, masks = tmp_path / "images", tmp_path / "masks"
    folder.mkdir()
    (masks / "cyst").mkdir(parents=True)  # masks may mirror the images' class folders
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(folder / f"{name}.png")
    lesion = np.zeros((40, 48), dtype=np.uint8)
    lesion[10:30, 12:36] = 255
    Image.fromarray(lesion).save(masks / "cyst" / "a_mask.png")
    out = tmp_path / "out"
    assert main(["scorecam", "--ckpt", str(ckpt), "--images", str(folder), "--class", "1",
                 "--masks", str(masks), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["images"]] == ["a", "b"]
    assert summary["images_with_masks"] == 1 and summary["target_layer"] == "blocks.1.norm1"
    assert 0 <= summary["energy_in_mask"] <= 1 and summary["pointing_game"] in (0.0, 1.0)
    assert (out / "grid.png").is_file() and (out / "overlays" / "b.png").is_file()
    heat = np.load(out / "heatmaps" / "a.npy")
    assert heat.shape == (32, 32) and Image.open(out / "overlays" / "a.png").size == (32, 32)

    from usfmae_fast.models.classifier import load_classifier
    model = load_classifier(ckpt)
    pixels = torch.from_numpy(load_image(folder / "a.png", 3, (32, 32))).permute(2, 0, 1)[None]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.pretrained_cfg["mean"],
                                                             model.pretrained_cfg["std"]))
    expected = ScoreCAM(model)((pixels - mean) / std, 1).maps[0].numpy()
    np.testing.assert_allclose(heat, expected, atol=1e-5)

    assert main(["scorecam", "--ckpt", str(ckpt), "--images", str(folder), "--class", "2",
                 "--out", str(out)]) == 2
    assert main(["scorecam", "--ckpt", str(ckpt), "--images", str(folder), "--layer", "nope",
                 "--out", str(out)]) == 2


def test_scorecam_and_evaluation_feed_the_model_the_same_tensors(tmp_path):
    from usfmae_fast.data.load.loader import make_loader
    from usfmae_fast.explain.run import load_image, model_batch

    rng = np.random.default_rng(1)  # not square: a stretch and a resize + centre crop differ
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    loader = make_loader(str(tmp_path), "eval", batch_size=1, img_size=32, channels=3,
                         device="cpu", rank=0, world_size=1, mean=mean, std=std,
                         backend="torch", workers=0)
    evaluated, _ = next(iter(loader))
    explained = model_batch([tmp_path / "a.png"], 3, (32, 32), mean, std)
    assert torch.equal(explained, evaluated)
    shown = torch.from_numpy(load_image(tmp_path / "a.png", 3, (32, 32))).permute(2, 0, 1)
    normalised = (shown - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(normalised[None], evaluated, atol=1e-5, rtol=0)


def test_load_classifier_formats_and_errors(tmp_path):
    import argparse

    from usfmae_fast.models.classifier import load_classifier
    source = tiny_vit(img_size=40)  # img_size is read off the position embedding
    kwargs = dict(TINY_VIT)
    path = tmp_path / "checkpoint-7.pth.tar"  # what timm's train.py saves
    torch.save({"epoch": 7, "arch": "vit_base_patch16_224", "model_kwargs": kwargs,
                "state_dict": {"module." + k: v for k, v in source.state_dict().items()},
                "args": argparse.Namespace(lr=0.1)}, path)
    model = load_classifier(path)
    x = images(2, 40)
    torch.testing.assert_close(model(x), source(x))
    bare = tmp_path / "bare.pt"
    torch.save(source.state_dict(), bare)
    with pytest.raises(ValueError, match="model: .* does not name its architecture"):
        load_classifier(bare)
    torch.testing.assert_close(load_classifier(bare, "vit_base_patch16_224", **kwargs)(x), source(x))
    with pytest.raises(ValueError, match="model: 'no_such_net' is not a timm model"):
        load_classifier(bare, "no_such_net")
    headless = tmp_path / "headless.pt"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("head")}, headless)
    with pytest.raises(ValueError, match=r"ckpt: .* has no classification head \('head.weight'\)"):
        load_classifier(headless, "vit_base_patch16_224", **kwargs)
    with pytest.raises(FileNotFoundError, match="ckpt"):
        load_classifier(tmp_path / "missing.pt", "vit_base_patch16_224")


def test_mask_index_finds_masks_below_the_folder_plain_stem_first(tmp_path):
    from usfmae_fast.explain.run import mask_index
    for rel in ("x/a_mask.png", "y/a.png", "b_mask.jpg", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    index = mask_index(tmp_path)
    assert index == {"a": tmp_path / "y" / "a.png", "b": tmp_path / "b_mask.jpg"}
    assert mask_index(None) == {}
    with pytest.raises(FileNotFoundError, match="masks"):
        mask_index(tmp_path / "missing")
