"""A checkpoint in the layout the USF-MAE authors release: their notebook saves
``torch.save(model.state_dict(), "USF-MAE_....pt")`` of fb/mae's
``models_mae.mae_vit_base_patch16_dec512d8b`` (RGB, 224 px, 512-wide 8-deep decoder), a raw
state dict with no "model" wrapper. Built here key by key at the real ViT-B size, with random
values, it loads into pretraining (the ``usfmae`` preset's ``model.init_from``), fine-tuning
(``model_spec("usfmae", init=...)``) and timm's own ``vit_base_patch16_224``."""
import pytest
import safetensors.torch
import torch

from usfmae_fast.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, export_timm, load_model
from usfmae_fast.pretrain.config import build_config
from usfmae_fast.pretrain.engine import build_model, init_from_checkpoint

WIDTH, DEPTH, DEC_WIDTH, DEC_DEPTH, TOKENS = 768, 12, 512, 8, 1 + 14 * 14


def _block(prefix: str, width: int) -> dict:
    """timm ``Block`` parameter shapes (fb/mae's timm 0.3.2 names, which timm still uses)."""
    return {f"{prefix}.norm1.weight": (width,), f"{prefix}.norm1.bias": (width,),
            f"{prefix}.attn.qkv.weight": (3 * width, width),
            f"{prefix}.attn.qkv.bias": (3 * width,),
            f"{prefix}.attn.proj.weight": (width, width), f"{prefix}.attn.proj.bias": (width,),
            f"{prefix}.norm2.weight": (width,), f"{prefix}.norm2.bias": (width,),
            f"{prefix}.mlp.fc1.weight": (4 * width, width), f"{prefix}.mlp.fc1.bias": (4 * width,),
            f"{prefix}.mlp.fc2.weight": (width, 4 * width), f"{prefix}.mlp.fc2.bias": (width,)}


def released_layout() -> dict:
    """``mae_vit_base_patch16_dec512d8b().state_dict()`` shapes, in its order: the module's
    own parameters first, then its submodules as ``__init__`` creates them."""
    shapes = {"cls_token": (1, 1, WIDTH), "pos_embed": (1, TOKENS, WIDTH),
              "mask_token": (1, 1, DEC_WIDTH), "decoder_pos_embed": (1, TOKENS, DEC_WIDTH),
              "patch_embed.proj.weight": (WIDTH, 3, 16, 16), "patch_embed.proj.bias": (WIDTH,)}
    for i in range(DEPTH):
        shapes.update(_block(f"blocks.{i}", WIDTH))
    shapes.update({"norm.weight": (WIDTH,), "norm.bias": (WIDTH,),
                   "decoder_embed.weight": (DEC_WIDTH, WIDTH), "decoder_embed.bias": (DEC_WIDTH,)})
    for i in range(DEC_DEPTH):
        shapes.update(_block(f"decoder_blocks.{i}", DEC_WIDTH))
    shapes.update({"decoder_norm.weight": (DEC_WIDTH,), "decoder_norm.bias": (DEC_WIDTH,),
                   "decoder_pred.weight": (16 * 16 * 3, DEC_WIDTH),
                   "decoder_pred.bias": (16 * 16 * 3,)})
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in shapes.items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    state = released_layout()
    path = tmp_path_factory.mktemp("usfmae") / "USF-MAE_fold1_lr0.0003_wd0.05_epochs100.pt"
    torch.save(state, path)  # raw, as their notebook saves it
    return path, state


def test_the_release_loads_into_usfmae_pretraining(release):
    path, state = release
    cfg = build_config("usfmae", overrides={"model.init_from": str(path)})
    model = init_from_checkpoint(build_model(cfg), path, cfg.data.mean, cfg.data.std)
    loaded = model.state_dict()
    assert set(loaded) == set(state)  # the whole model, decoder included: the same layout
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize("in_chans", [3, 1])
def test_the_release_loads_for_fine_tuning(release, in_chans):
    from usfmae_fast.finetune.models import build_classifier, model_spec

    path, state = release
    spec = model_spec("usfmae", init=str(path))
    # a raw file records no normalisation: RGB input gets the release's (ImageNet) by default
    clf = build_classifier(spec, 2, img_size=224, in_chans=in_chans)
    if in_chans == 3:
        assert clf.mean == list(IMAGENET_MEAN) and clf.std == list(IMAGENET_STD)
    weights = clf.model.state_dict()
    for name in ("cls_token", "pos_embed", "blocks.11.mlp.fc2.weight", "blocks.0.attn.qkv.bias"):
        assert torch.equal(weights[name], state[name]), name
    assert weights["head.weight"].shape == (2, WIDTH)
    if in_chans == 3:
        assert torch.equal(weights["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    else:  # folded for gray input with the ImageNet statistics the release was trained with
        assert any("to_grayscale" in note for note in clf.notes)


def test_the_release_exports_to_timms_vit_base(release, tmp_path):
    import timm

    path, _ = release
    encoder = load_model(path).eval()
    assert (encoder.config["embed_dim"], encoder.config["depth"], encoder.config["in_chans"],
            encoder.config["decoder_embed_dim"], encoder.config["decoder_depth"]) == (
        WIDTH, DEPTH, 3, DEC_WIDTH, DEC_DEPTH)
    exported = export_timm(encoder, tmp_path / "usfmae_encoder.safetensors")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    vit.load_state_dict(safetensors.torch.load_file(str(exported)), strict=True)
    imgs = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), encoder.forward_features(imgs),
                                   rtol=1e-4, atol=1e-4)
