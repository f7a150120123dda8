"""``usfmae-fast export`` (issue "Interop beyond timm"): a fine-tuned ViT and a CNN baseline as
ONNX files whose onnxruntime logits equal PyTorch's (<= 1e-4 fp32) at batch 1 and 3, with their
preprocessing in the metadata; a parity failure writes nothing; ``--format timm`` through the
same command; a missing extra names what to install."""
import importlib
import json
import sys

import numpy as np
import pytest
import torch

from _finetune_data import tiny_mae_checkpoint
from usfmae_fast.cli import main
from usfmae_fast.finetune.models import build_classifier, model_spec, save_classifier
from usfmae_fast.models.classifier import load_finetuned

onnx = pytest.importorskip("onnx", reason="the [onnx] extra (onnx) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnxruntime) is not installed")
pytest.importorskip("onnxscript", reason="the [onnx] extra (onnxscript) is not installed")

from usfmae_fast.models import onnx as usf_onnx  # noqa: E402

CLASSES = {"vit": ["normal", "cyst", "solid"], "cnn": ["benign", "malignant"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_ckpts")
    mae = tiny_mae_checkpoint(folder)
    out = {"mae": mae}
    for kind, spec in (("vit", model_spec("usfmae", init=str(mae))),
                       ("cnn", model_spec("test_resnet"))):
        torch.manual_seed(1)
        built = build_classifier(spec, len(CLASSES[kind]), img_size=32, in_chans=1)
        out[kind] = save_classifier(built, folder / f"{kind}.safetensors", CLASSES[kind],
                                    info={"test": kind})
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_out")
    return {kind: usf_onnx.export_onnx(checkpoints[kind], folder / f"{kind}.onnx")
            for kind in ("vit", "cnn")}


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_onnxruntime_logits_equal_pytorch_at_two_batch_sizes(kind, checkpoints, exported):
    summary = exported[kind]
    assert summary["batch_sizes_checked"] == [1, 3] and summary["opset"] == 18
    assert summary["max_abs_logit_diff"] <= summary["tolerance"] == 1e-4
    model = load_finetuned(checkpoints[kind]).model
    session = ort.InferenceSession(summary["path"], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # the dynamic batch axis
    generator = torch.Generator().manual_seed(123)
    for batch in (1, 3):
        images = torch.rand((batch, 1, 32, 32), generator=generator) * 4 - 2
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(["logits"], {"image": images.numpy()})[0]
        assert got.shape == (batch, len(CLASSES[kind]))
        assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_metadata_says_how_to_prepare_images(kind, checkpoints, exported):
    proto = onnx.load(exported[kind]["path"])
    meta = {p.key: p.value for p in proto.metadata_props}
    loaded = load_finetuned(checkpoints[kind])
    assert json.loads(meta["classes"]) == CLASSES[kind]
    assert json.loads(meta["input_size"]) == [1, 32, 32] and meta["channels"] == "1"
    assert json.loads(meta["mean"]) == loaded.mean and json.loads(meta["std"]) == loaded.std
    assert meta["opset"] == "18"
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in proto.opset_import)
    assert meta["source_sha256"] == usf_onnx.sha256(checkpoints[kind])
    assert meta["usfmae_fast_version"]
    for step in ("short side to 32", "bicubic", "centre crop 32x32", "[0, 1]", "(x - mean) / std"):
        assert step in meta["preprocessing"], step
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # no custom (usfmae) ops


def test_a_parity_failure_writes_nothing(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "cnn.onnx"
    out.write_bytes(b"an older export")
    monkeypatch.setattr(usf_onnx, "_max_logit_diff", lambda *a, **k: 0.5)
    with pytest.raises(RuntimeError, match="exceeds the tolerance"):
        usf_onnx.export_onnx(checkpoints["cnn"], out)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["export", str(checkpoints["cnn"]), "--format", "onnx", "--out", str(out)]) == 1


def test_custom_operators_fail_the_export():
    node = onnx.helper.make_node("attention_packed", ["x"], ["y"], domain="usfmae")
    graph = onnx.helper.make_graph([node], "g", [], [])
    with pytest.raises(RuntimeError, match="usfmae::attention_packed"):
        usf_onnx._check_operators(onnx.helper.make_model(graph), "x.safetensors")


def test_cli_export_onnx_prints_a_json_summary(checkpoints, tmp_path, capsys):
    out = tmp_path / "vit.onnx"
    assert main(["export", str(checkpoints["vit"]), "--format", "onnx", "--out", str(out),
                 "--opset", "17"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(out) and out.is_file() and summary["opset"] == 17
    assert summary["max_abs_logit_diff"] <= 1e-4 and summary["classes"] == CLASSES["vit"]


def test_cli_export_timm_loads_into_timm(checkpoints, tmp_path, capsys):
    import timm

    from usfmae_fast.models import load_model
    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(checkpoints["mae"]), "--format", "timm", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(out) and summary["timm_name"] == "usfmae_vit_tiny_patch16_224"
    vit = timm.create_model(summary["timm_name"], checkpoint_path=str(out),
                            **summary["create_model_kwargs"]).eval()
    encoder = load_model(checkpoints["mae"], encoder_only=True)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images),
                                   encoder.forward_features(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "timm"])
def test_bad_checkpoints_exit_2_naming_the_file(fmt, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["export", str(missing), "--format", fmt, "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    assert main(["export", str(broken), "--format", fmt, "--out", str(tmp_path / "o")]) == 2
    assert str(broken) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("module", ["onnx", "onnxruntime", "onnxscript"])
def test_a_missing_extra_says_what_to_install(module, checkpoints, tmp_path, monkeypatch,
                                              capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'usfmae_fast\[onnx\]'"):
        usf_onnx.require(*usf_onnx.EXTRA_PACKAGES)
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoints["cnn"]), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert module in err and "pip install 'usfmae_fast[onnx]'" in err and not out.exists()


def _hf_available() -> bool:
    try:
        importlib.import_module("usfmae_fast.models.hf")
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("module", ["transformers", "usfmae_fast.models.hf"])
def test_hf_without_its_module_or_extra_exits_2(module, checkpoints, tmp_path, monkeypatch,
                                                capsys):
    if module == "transformers":  # as if not installed
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    else:
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["export", str(checkpoints["vit"]), "--format", "hf",
                 "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert (module == "transformers" and "pip install 'usfmae_fast[hf]'" in err) or module in err


@pytest.mark.skipif(not _hf_available(), reason="usfmae_fast.models.hf (export_hf, written "
                    "in parallel) or transformers does not import here")
def test_cli_export_hf(checkpoints, tmp_path, capsys):
    for fmt in ("hf", "hf-encoder"):  # an MAE checkpoint: ViTMAE / ViTModel folders
        out = tmp_path / fmt
        assert main(["export", str(checkpoints["mae"]), "--format", fmt, "--out", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["format"] == fmt and (out / "config.json").is_file()
    # a CNN has no Hugging Face ViT form: exit 2 with export_hf's own message
    assert main(["export", str(checkpoints["cnn"]), "--format", "hf",
                 "--out", str(tmp_path / "hf_cnn")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usfmae-fast export: ") and str(checkpoints["cnn"]) in err
