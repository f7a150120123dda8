"""Hugging Face interop (usfmae_fast.models.hf): ours -> HF -> ours is exact, HF's models
compute what ours compute, HF folders load into pretraining and fine-tuning, bad folders are
named."""
import json

import pytest
import safetensors.torch
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'usfmae_fast[hf]')")

from _finetune_data import TINY_MAE, tiny_mae_checkpoint  # noqa: E402
from usfmae_fast.finetune.models import build_classifier, model_spec, save_classifier  # noqa: E402
from usfmae_fast.models import MaskedAutoencoderViT, save_safetensors  # noqa: E402
from usfmae_fast.models.checkpoint import read_checkpoint  # noqa: E402
from usfmae_fast.models.classifier import load_finetuned  # noqa: E402
from usfmae_fast.models.hf import export_hf, read_hf_folder  # noqa: E402

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True)


@pytest.fixture(scope="module")
def mae(tmp_path_factory):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**TINY).eval()
    with torch.no_grad():  # non-trivial biases / norms, so a swapped name cannot pass
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = save_safetensors(model, tmp_path_factory.mktemp("mae") / "checkpoint.safetensors")
    return model, path


@pytest.fixture(scope="module")
def mae_folder(mae, tmp_path_factory):
    return export_hf(mae[1], tmp_path_factory.mktemp("hf") / "mae")


def test_round_trip_is_bit_identical(mae, mae_folder):
    model, _ = mae
    assert json.loads((mae_folder / "config.json").read_text())["model_type"] == "vit_mae"
    state, config = read_hf_folder(mae_folder)
    ours = model.state_dict()
    assert sorted(state) == sorted(ours)
    for key, value in ours.items():
        assert torch.equal(state[key], value), key
    assert {k: config[k] for k in TINY} == {**TINY, "norm_pix_loss": True}
    assert read_checkpoint(mae_folder)[0].keys() == state.keys()  # the one reader finds folders


def test_hf_pretraining_model_computes_our_loss_and_prediction(mae, mae_folder):
    model, _ = mae
    hf = transformers.ViTMAEForPreTraining.from_pretrained(mae_folder).eval()
    torch.manual_seed(1)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.testing.assert_close(hf.vit.embeddings.position_embeddings, model.pos_embed,
                               rtol=0, atol=0)
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75, noise)
        out = hf(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(out.mask, mask, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)


def test_encoder_only_export_is_a_vit_model_with_our_tokens(mae, tmp_path):
    model, path = mae
    folder = export_hf(path, tmp_path / "enc", encoder_only=True)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "vit"
    vit = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(pixel_values=imgs).last_hidden_state,
                                   model.forward_features(imgs), rtol=1e-5, atol=1e-5)
    state, config = read_hf_folder(folder)
    assert "decoder_embed.weight" not in state and config["embed_dim"] == 64
    for key, value in state.items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_encoder_only_checkpoint_needs_encoder_only(mae, tmp_path):
    encoder = {k: v for k, v in mae[0].state_dict().items() if not k.startswith(("decoder",
                                                                                   "mask"))}
    torch.save({"model": encoder}, tmp_path / "mae_pretrain.pth")
    with pytest.raises(ValueError, match="mae_pretrain.pth.*encoder_only"):
        export_hf(tmp_path / "mae_pretrain.pth", tmp_path / "out")


def _classifier(tmp_path, global_pool="token"):
    init = tiny_mae_checkpoint(tmp_path)
    built = build_classifier(model_spec("usfmae", str(init)), 3, img_size=32, in_chans=1,
                             global_pool=global_pool)
    with torch.no_grad():
        built.model.head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return save_classifier(built, tmp_path / f"{global_pool}.safetensors",
                           ["normal", "cyst", "solid"])


def test_classifier_exports_to_vit_for_image_classification(tmp_path):
    path = _classifier(tmp_path)
    folder = export_hf(path, tmp_path / "cls")
    ours = load_finetuned(path)
    hf = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    assert hf.config.id2label == {0: "normal", 1: "cyst", 2: "solid"}
    assert hf.config.label2id == {"normal": 0, "cyst": 1, "solid": 2}
    imgs = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=imgs).logits, ours.model(imgs),
                                   rtol=1e-5, atol=1e-5)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pytest.approx(ours.mean) and pre["image_std"] == pytest.approx(
        ours.std)
    assert pre["size"] == {"height": 32, "width": 32} and pre["do_normalize"] and pre["do_resize"]
    state, _ = read_hf_folder(folder)  # its encoder initialises another fine-tuning
    assert torch.equal(state["blocks.1.attn.qkv.weight"],
                       ours.model.state_dict()["blocks.1.attn.qkv.weight"])


def test_avg_pooled_and_cnn_classifiers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="avg.*onnx or timm"):
        export_hf(_classifier(tmp_path, "avg"), tmp_path / "avg")
    cnn = build_classifier(model_spec("resnet18"), 2, img_size=32, in_chans=1)
    path = save_classifier(cnn, tmp_path / "cnn.safetensors", ["a", "b"])
    with pytest.raises(ValueError, match="cnn.safetensors.*onnx or timm"):
        export_hf(path, tmp_path / "cnn")


def test_hf_folder_initialises_pretraining(mae, mae_folder):
    from usfmae_fast.pretrain.config import build_config
    from usfmae_fast.pretrain.engine import build_model, init_from_checkpoint, run_provenance

    overrides = {f"model.{k}": v for k, v in TINY.items() if k != "norm_pix_loss"}
    cfg = build_config("demo", overrides={**overrides, "model.init_from": str(mae_folder)})
    model = init_from_checkpoint(build_model(cfg), cfg.model.init_from, 0.0, 1.0)
    for key, value in mae[0].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    record = run_provenance(cfg, "cpu")["files"]["init_checkpoint"]  # hashes the weights file
    assert record["path"] == str(mae_folder / "model.safetensors")


def test_hf_folder_initialises_finetuning(mae, mae_folder):
    spec = model_spec("usfmae", init=str(mae_folder))
    built = build_classifier(spec, 2, img_size=32, in_chans=3, global_pool="token")
    state = built.model.state_dict()
    for key, value in mae[0].state_dict().items():
        if not key.startswith(("decoder", "mask")):
            assert torch.equal(state[key], value), key


def _copy(folder, dest):
    dest.mkdir()
    for item in folder.iterdir():
        (dest / item.name).write_bytes(item.read_bytes())
    return dest


def test_malformed_folders_are_named(mae_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*config.json"):
        read_hf_folder(empty)

    bert = _copy(mae_folder, tmp_path / "bert")
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="bert.config.json.*'bert'"):
        read_checkpoint(bert)

    weights = safetensors.torch.load_file(mae_folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("layernorm.weight"))
    for name, edit in (("missing", lambda w: w.pop(key)),
                       ("shape", lambda w: w.__setitem__(key, torch.zeros(3)))):
        bad = _copy(mae_folder, tmp_path / name)
        changed = dict(weights)
        edit(changed)
        safetensors.torch.save_file(changed, bad / "model.safetensors", {"format": "pt"})
        with pytest.raises(ValueError, match=rf"{name}.model.safetensors.*layernorm"):
            read_hf_folder(bad)


def test_missing_transformers_says_how_to_install(monkeypatch):
    from usfmae_fast.models.hf import require_transformers

    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(RuntimeError, match=r"pip install 'usfmae_fast\[hf\]'"):
        require_transformers()


def test_non_square_images_export_the_encoder_only(tmp_path):
    model = MaskedAutoencoderViT(**{**TINY, "img_size": (32, 48)}).eval()
    path = save_safetensors(model, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="square.*encoder_only"):
        export_hf(path, tmp_path / "mae")
    folder = export_hf(path, tmp_path / "enc", encoder_only=True)
    vit = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    imgs = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(vit(pixel_values=imgs).last_hidden_state,
                                   model.forward_features(imgs), rtol=1e-5, atol=1e-5)
    assert read_hf_folder(folder)[1]["img_size"] == [32, 48]
