"""The pretraining engine on the CPU with a tiny ViT-MAE on the real pydicom-data ultrasound
frames: the loss falls; 2 gloo processes under torchrun equal 1 process with the same global
batch; a run killed after step 13 and resumed from its step-10 checkpoint reproduces the
straight run's losses bit for bit; the weights load for fine-tuning and into timm; the NaN
guard; config presets, files and errors; checkpoint retention."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom.data")

from usfmae_fast.pretrain import checkpointing as ckpt  # noqa: E402
from usfmae_fast.pretrain.config import ConfigError, build_config, validate  # noqa: E402
from usfmae_fast.pretrain.distributed import DistContext  # noqa: E402
from usfmae_fast.pretrain.engine import PretrainEngine, TrainingDiverged, pretrain  # noqa: E402
from usfmae_fast.pretrain.monitor import read_history  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
TINY = {"model.img_size": 32, "model.patch_size": 8, "model.embed_dim": 32, "model.depth": 2,
        "model.num_heads": 2, "model.decoder_embed_dim": 32, "model.decoder_depth": 1,
        "model.decoder_num_heads": 1, "data.source": "demo", "data.max_frames_per_file": 8,
        "data.heldout": 2, "optim.steps": STEPS, "optim.batch_size": 8, "optim.blr": 0.1,
        "optim.warmup_steps": 2, "system.num_threads": 1, "output.save_every": 10,
        "output.progress": False}
TINY_FLAGS = [f"--set={k}={v}" for k, v in TINY.items()]


def tiny_config(out_dir, **overrides):
    return build_config("demo", overrides={**TINY, "output.out_dir": str(out_dir),
                                           **{k.replace("__", "."): v
                                              for k, v in overrides.items()}})


def final_weights(out_dir) -> dict:
    from usfmae_fast.models.checkpoint import read_checkpoint
    return read_checkpoint(Path(out_dir) / "checkpoint.safetensors")[0]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def decode_the_dicoms_once():
    """Every in-process engine of this module loads the same frames: decode them once."""
    from usfmae_fast.data.ingest import dicom_frames

    original, cache = dicom_frames.load_frames, {}

    def load_frames_once(paths, **options):
        key = (tuple(map(str, paths)), tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = original(paths, **options)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dicom_frames, "load_frames", load_frames_once)
        yield


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, pretrain(tiny_config(out))


def test_loss_falls_on_real_frames(straight):
    out, summary = straight
    losses = [row["loss"] for row in read_history(out / "history.csv")]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert summary["heldout_loss_end"] < 0.8 * summary["heldout_loss_init"]
    # norm_pix_loss (the demo preset): predicting 0 is predicting each patch's mean
    base = summary["heldout_baselines"]
    assert base["zero"] == pytest.approx(base["patch_mean"], abs=1e-6)
    assert len(summary["heldout_per_draw"]["end"]) == summary["heldout_draws"] == 8
    assert summary["data"]["source"] == "demo" and summary["data"]["train"] >= 16
    for name in ("history.csv", "history.jsonl", "config.yaml", "summary.json",
                 "loss_curve.png", "reconstruction.png", "checkpoint.safetensors"):
        assert (out / name).stat().st_size > 0, name
    jsonl = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in jsonl] == losses
    try:
        import tensorboard  # noqa: F401  (a dev dependency; optional for users)
        assert list((out / "tensorboard").iterdir())  # the event file
    except ImportError:
        assert any("TensorBoard logging is off" in note for note in summary["notes"])
    throughput = summary["throughput"]
    assert throughput["images_per_s"] > 0 and throughput["train_flops_per_image"] > 0
    assert throughput["mfu"] is None  # no peak FLOP/s for a CPU
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [10, 20]


def test_ddp_two_gloo_processes_equal_one_process(straight, tmp_path):
    out, _ = straight
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "usfmae_fast.cli", "pretrain", "--preset", "demo", "--out", str(ddp),
           "--quiet", *TINY_FLAGS, "--set=output.figures=false", "--set=output.tensorboard=false"]
    run = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    single, double = read_history(out / "history.csv"), read_history(ddp / "history.csv")
    assert [r["step"] for r in double] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in double], [r["loss"] for r in single],
                               rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in double],
                               [r["grad_norm"] for r in single], rtol=1e-3)
    a, b = final_weights(out), final_weights(ddp)
    for name in a:
        if name.endswith("attn.qkv.bias"):
            # the key bias has a zero gradient in exact arithmetic (softmax ignores a shift
            # shared by all keys); AdamW turns its rounding noise into steps of size ~lr, so
            # it is the one tensor that two summation orders cannot agree on.
            q, _, v = a[name].chunk(3)
            a[name], b[name] = torch.cat([q, v]), torch.cat([b[name].chunk(3)[i] for i in (0, 2)])
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["throughput"]["world_size"] == 2


KILLED_CHILD = """
import os, signal, sys
from usfmae_fast.pretrain.config import build_config
from usfmae_fast.pretrain.engine import pretrain
cfg = build_config("demo", overrides=dict(__import__("json").loads(sys.argv[1])))
def kill_after_13(engine):
    if engine.state.step == 13:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint
pretrain(cfg, on_step=kill_after_13)
"""


def test_resume_after_kill_reproduces_the_straight_run(straight, tmp_path):
    out, _ = straight
    run_dir = tmp_path / "killed"
    overrides = {**TINY, "output.out_dir": str(run_dir), "output.tensorboard": False}
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, json.dumps(overrides)],
                           env=child_env(), capture_output=True, text=True, timeout=240)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [10]
    assert len(read_history(run_dir / "history.csv")) == 13
    assert not (run_dir / "checkpoint.safetensors").exists()

    summary = pretrain(tiny_config(run_dir, output__resume="auto"))
    assert summary["start_step"] == 10 and summary["resumed_from"].endswith("step_00000010.pt")
    straight_rows, resumed_rows = read_history(out / "history.csv"), \
        read_history(run_dir / "history.csv")
    assert [r["step"] for r in resumed_rows] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr", "epoch"):  # bit-exact, steps 11-20 included
        assert [r[key] for r in resumed_rows] == [r[key] for r in straight_rows], key
    a, b = final_weights(out), final_weights(run_dir)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(FileExistsError, match="resume=auto"):  # never mix two runs
        PretrainEngine(tiny_config(run_dir), DistContext())


def test_accumulation_and_activation_checkpointing_keep_the_result(straight, tmp_path):
    out, _ = straight
    engine = PretrainEngine(tiny_config(tmp_path, optim__accum_steps=2,
                                        system__activation_checkpointing=True), DistContext())
    assert engine.micro_batch == TINY["optim.batch_size"] // 2
    batches = engine.batches()
    rows = [engine.train_step(batches) for _ in range(5)]
    expected = read_history(out / "history.csv")[:5]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in expected],
                                   rtol=1e-4, err_msg=key)


def test_checkpoints_load_for_finetuning_and_into_timm(straight, tmp_path):
    import timm

    from usfmae_fast.models import export_timm, load_model

    out, _ = straight
    encoder = load_model(out / "checkpoint.safetensors", encoder_only=True)
    from_training_state = load_model(ckpt.checkpoint_path(out, STEPS), encoder_only=True)
    imgs = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = encoder.forward_features(imgs)
        torch.testing.assert_close(from_training_state.forward_features(imgs), features,
                                   rtol=0, atol=0)
    path = export_timm(encoder, tmp_path / "encoder.safetensors")
    vit = timm.create_model("usfmae_vit_tiny_patch16_224", checkpoint_path=str(path),
                            img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2,
                            num_heads=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), features, rtol=1e-5, atol=1e-5)


def test_init_from_an_rgb_encoder_only_mae_checkpoint(tmp_path):
    from usfmae_fast.models.checkpoint import gray_patch_embed
    from usfmae_fast.models.mae import mae_vit

    sizes = {k.split(".")[1]: v for k, v in TINY.items() if k.startswith("model.")}
    rgb = mae_vit("tiny", **{**sizes, "in_chans": 3})
    encoder = {k: v for k, v in rgb.state_dict().items() if not k.startswith(("decoder", "mask"))}
    torch.save({"model": encoder}, tmp_path / "mae_pretrain.pth")  # as fb/mae releases them
    cfg = tiny_config(tmp_path / "run", model__init_from=str(tmp_path / "mae_pretrain.pth"))
    engine = PretrainEngine(cfg, DistContext())
    state = engine.model.state_dict()
    for name in ("blocks.1.mlp.fc2.weight", "norm.bias", "cls_token"):
        assert torch.equal(state[name], encoder[name]), name
    weight, bias = gray_patch_embed(encoder["patch_embed.proj.weight"],
                                    encoder["patch_embed.proj.bias"], (0.485, 0.456, 0.406),
                                    (0.229, 0.224, 0.225), engine.data.mean, engine.data.std)
    torch.testing.assert_close(state["patch_embed.proj.weight"], weight)
    torch.testing.assert_close(state["patch_embed.proj.bias"], bias)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path, optim__steps=12, optim__max_bad_steps=3, output__save_every=2,
                      output__figures=False, output__tensorboard=False)
    engine = PretrainEngine(cfg, DistContext())
    bad_steps = {4} | set(range(7, 13))  # one isolated bad step, then a run of them
    forward_loss = engine.model.forward_loss
    engine.model.forward_loss = lambda *args: forward_loss(*args) * (
        math.nan if engine.state.step + 1 in bad_steps else 1.0)
    snapshots = {}
    engine.on_step = lambda e: snapshots.__setitem__(
        e.state.step, [p.detach().clone() for p in e.model.parameters()])
    # checkpoint 6 is followed by the bad step 7, so the last good one is 2 (step 3 was finite)
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row up to step 9.*step_00000002"):
        engine.run()
    rows = read_history(tmp_path / "history.csv")
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 3, 4]
    assert all(math.isnan(r["loss"]) == (r["step"] in bad_steps) for r in rows)
    for bad in (4, 7, 8):  # a skipped step leaves the weights as they were
        assert all(torch.equal(a, b) for a, b in zip(snapshots[bad - 1], snapshots[bad]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[5]))
    # no checkpoint is written while steps are being skipped (4, 8)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 6]


def test_presets_follow_the_recipes():
    mae = build_config("mae")
    assert (mae.optim.beta1, mae.optim.beta2, mae.optim.weight_decay) == (0.9, 0.95, 0.05)
    assert mae.peak_lr() == pytest.approx(1.5e-4 * 4096 / 256)
    assert mae.model.norm_pix_loss and mae.optim.mask_ratio == 0.75
    assert mae.system.precision == "bf16"
    with pytest.warns(UserWarning, match="init_from"):
        usf = build_config("usfmae")
    # the authors' code: lr = 3e-4 * 128 / 256 on DataLoader batches of 64
    assert usf.optim.batch_size == 64 and usf.peak_lr() == pytest.approx(3e-4 * 128 / 256)
    assert not usf.model.norm_pix_loss and usf.optim.warmup_fraction == 0.1
    assert (usf.optim.min_lr, usf.optim.clip_grad, usf.system.precision) == (1e-5, 1.0, "bf16")
    assert (usf.optim.beta1, usf.optim.beta2, usf.optim.epochs) == (0.9, 0.999, 100)
    assert (usf.model.in_chans, usf.model.img_size, usf.system.seed) == (3, 224, 42)
    d = usf.data
    assert (d.mean, d.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (d.resize, d.rotate, d.rotate_interpolation) == ("nearest", [0.0, 90.0], "nearest")
    assert (d.crop_scale, d.crop_interpolation, d.hflip, d.vflip) == ([0.5, 2.0], "bilinear",
                                                                       0.5, 0.5)
    assert (mae.data.crop_scale, mae.data.vflip, mae.data.resize) == ([0.2, 1.0], 0.0, None)


@pytest.mark.parametrize("key, value, message", [
    ("data.mean", "0.1,0.2", "data.mean must be 1 or 3"), ("data.std", "0", "data.std"),
    ("data.rotate", "10,5", "data.rotate"), ("data.rotate", "200", "data.rotate"),
    ("data.resize", "lanczos", "data.resize"), ("data.crop_scale", "0.5", "data.crop_scale"),
    ("data.crop_scale", "0,1", "data.crop_scale"), ("data.vflip", "1.5", "data.vflip"),
    ("data.crop_interpolation", "area", "data.crop_interpolation")])
def test_augmentation_fields_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config("mae", overrides={"model.in_chans": 3, key: value})


def test_the_usfmae_augmentation_runs_on_rgb_files(tmp_path):
    with pytest.warns(UserWarning, match="init_from"):
        cfg = build_config("usfmae", overrides={
            **TINY, "data.source": str(_png_folder(tmp_path / "images", 10)),
            "data.backend": "torch", "data.workers": 0, "optim.steps": 2, "optim.batch_size": 4,
            "system.precision": "fp32", "system.device": "cpu", "output.tensorboard": False,
            "output.out_dir": str(tmp_path / "run")})
    summary = pretrain(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert summary["data_mean"] == [0.485, 0.456, 0.406] and summary["model_config"][
        "in_chans"] == 3


def test_yaml_file_overrides_and_clear_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: usfmae\nmodel: {init_from: mae.pth}\n"
                    "optim: {lr: 1e-3, steps: 50}\nsystem: {precision: fp16}\n")
    cfg = build_config(config_file=path, overrides=["optim.steps=70", "output.resume=null"])
    assert cfg.preset == "usfmae" and not cfg.model.norm_pix_loss  # preset, then the file
    assert (cfg.optim.lr, cfg.optim.steps, cfg.system.precision) == (1e-3, 70, "fp16")
    assert cfg.model.init_from == "mae.pth" and cfg.output.resume is None
    with pytest.raises(ConfigError, match="unknown field optim.lrr"):
        build_config(overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.steps must be int"):
        build_config(overrides=["optim.steps=many"])
    with pytest.raises(ConfigError, match="system.precision must be one of"):
        build_config(overrides={"system.precision": "fp8"})
    with pytest.raises(ConfigError, match="section.field=value"):
        build_config(overrides=["steps=3"])
    with pytest.raises(ConfigError, match="batch_size = 100 must be divisible by world size 2"):
        validate(build_config(overrides={"optim.batch_size": 100, "optim.accum_steps": 4}), 2)


def test_cli_reports_config_errors(capsys):
    from usfmae_fast.cli import main

    assert main(["pretrain", "--preset", "demo", "--set", "optim.mask_ratio=1.5"]) == 2
    assert "optim.mask_ratio must be in (0, 0.984375]" in capsys.readouterr().err


def test_checkpoints_are_pruned_and_a_damaged_newest_is_skipped(tmp_path):
    payload = {k: {} for k in ckpt.REQUIRED if k != "format"}
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(tmp_path, step, {**payload, "train_state": {"step": step}}, 3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 15, 20]
    newest = ckpt.checkpoint_path(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:40])  # e.g. the disk filled up mid-write
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
        path, state = ckpt.find_resume(tmp_path)
    assert path.name == "step_00000015.pt" and state["train_state"]["step"] == 15
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(ValueError, match="not a usfmae-fast training checkpoint"):
        torch.save({"model": {}}, tmp_path / "weights.pt")
        ckpt.load_training_state(tmp_path / "weights.pt")


def test_rng_states_round_trip():
    import random

    state = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def _png_folder(folder: Path, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loaders_start_mid_epoch(tmp_path, backend):
    from usfmae_fast.data.load.dali import dali_available
    from usfmae_fast.data.load.loader import make_loader

    if backend == "dali" and not dali_available()[0]:
        pytest.skip(dali_available()[1])
    loader = make_loader(_png_folder(tmp_path, 12), batch_size=3, img_size=16, device="cpu",
                         backend=backend, workers=1 if backend == "dali" else 0, seed=1)
    loader.set_epoch(1)
    full = [x for x, _ in loader]
    loader.set_epoch(1, start_batch=2)
    tail = [x for x, _ in loader]
    assert len(full) == 4 and len(tail) == 2
    if backend == "torch":  # DALI's augmentation is not a function of (epoch, index)
        assert all(torch.equal(a, b) for a, b in zip(full[2:], tail))
    assert len([x for x, _ in loader]) == 4  # the next pass: epoch 2 from its beginning


def test_image_folder_source(tmp_path):
    cfg = tiny_config(tmp_path / "run", data__source=str(_png_folder(tmp_path / "images", 22)),
                      data__backend="torch", data__workers=0, optim__steps=3,
                      optim__batch_size=4, output__tensorboard=False)
    summary = pretrain(cfg)
    data = summary["data"]
    assert (data["images"], data["train"], data["heldout"], data["loader"]) == (22, 20, 2, "torch")
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert Path(summary["artefacts"]["reconstruction"]).stat().st_size > 0
    assert [summary["data_mean"]] == cfg.data.mean  # files are normalised with data.mean / std


def test_an_engine_leaves_the_process_wide_ops_backend_alone(tmp_path, backend):
    from usfmae_fast import ops
    backend("auto")
    engine = PretrainEngine(tiny_config(tmp_path, system__ops_backend="torch",
                                        optim__steps=1), DistContext())
    assert ops.get_backend() == "auto"
    engine.run()
    assert ops.get_backend() == "auto"


def test_the_run_records_its_provenance(tmp_path):
    import hashlib

    from usfmae_fast.models.mae import mae_vit

    images = _png_folder(tmp_path / "images", 12)
    manifest = images / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{i}.png\n" for i in range(12)))
    sizes = {k.split(".")[1]: v for k, v in TINY.items() if k.startswith("model.")}
    torch.save(mae_vit("tiny", **sizes, in_chans=1).state_dict(), tmp_path / "init.pt")
    cfg = tiny_config(tmp_path / "run", data__source=str(images), data__backend="torch",
                      data__workers=0, optim__steps=2, optim__batch_size=4,
                      model__init_from=str(tmp_path / "init.pt"), output__figures=False,
                      output__tensorboard=False)
    summary = pretrain(cfg)
    record = summary["provenance"]
    assert json.loads((tmp_path / "run" / "provenance.json").read_text()) == record
    assert record["config"] == cfg.to_dict() and record["seed"] == cfg.system.seed
    assert record["device"] == "cpu" and record["versions"]["torch"] == torch.__version__
    for name, path in (("init_checkpoint", tmp_path / "init.pt"), ("data_manifest", manifest)):
        assert record["files"][name] == {"path": str(path), "bytes": path.stat().st_size,
                                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    from usfmae_fast.models.checkpoint import read_file
    _, metadata = read_file(tmp_path / "run" / "checkpoint.safetensors")
    assert json.loads(metadata["provenance"]) == record
    assert ckpt.load_training_state(ckpt.checkpoint_path(tmp_path / "run", 2))[
        "provenance"] == record
