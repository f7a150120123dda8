"""What a run does when its inputs are bad (issue 15, items 2, 3, 5 and 10), through the CLI as
a user meets it: exit 2 with one line naming the file or field and why, never a traceback, and
nothing of an earlier run overwritten.

- ``pretrain --resume auto`` over checkpoints none of which loads, and ``--resume PATH`` /
  ``--init-from PATH`` / ``finetune --weights`` / ``--init`` given an empty, truncated or
  malicious (``__reduce__`` payload) file;
- the NaN guard names a checkpoint with finite weights whose next step was finite, and a run
  resumed from it at a sane lr finishes;
- every config value is checked where the config is read, the accepted range in the message.
"""
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from _finetune_data import make_labelled_set, tiny_mae_checkpoint
from usfmae_fast.cli import main
from usfmae_fast.pretrain import checkpointing as ckpt
from usfmae_fast.pretrain.config import build_config
from usfmae_fast.pretrain.engine import TrainingDiverged, pretrain
from usfmae_fast.pretrain.monitor import read_history

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model.img_size": 32, "model.patch_size": 8, "model.embed_dim": 32, "model.depth": 2,
        "model.num_heads": 2, "model.decoder_embed_dim": 32, "model.decoder_depth": 1,
        "model.decoder_num_heads": 1, "data.backend": "torch", "data.workers": 0,
        "data.heldout": 2, "optim.batch_size": 8, "optim.blr": 0.1, "optim.warmup_steps": 0,
        "system.num_threads": 1, "output.progress": False, "output.figures": False,
        "output.tensorboard": False}


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(26):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def tiny_config(images, out, **overrides):
    return build_config("demo", overrides={**TINY, "data.source": str(images),
                                           "output.out_dir": str(out), **overrides})


def pretrain_cli(images, out, *extra) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    return ["pretrain", "--preset", "demo", "--data", str(images), "--out", str(out), "--quiet",
            *sets, *extra]


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    return make_labelled_set(tmp_path_factory.mktemp("labelled"), per_class=8)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """An empty, a truncated, a junk and a malicious file (``marker`` appears if it runs)."""
    folder = tmp_path_factory.mktemp("bad")
    good = folder / "good.pt"
    torch.save({"model": {"w": torch.ones(1000)}}, good)
    files = {"empty": folder / "empty.pt", "truncated": folder / "truncated.pt",
             "junk": folder / "junk.pt", "malicious": folder / "evil.pth"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    files["junk"].write_bytes(np.random.default_rng(0).bytes(300))
    torch.save({"model": {"w": torch.ones(3)}, "payload": Exploit(folder / "pwned")},
               files["malicious"])
    return files


EXPECTED = {"empty": r"cannot read checkpoint '{path}': the file is empty \(0 bytes\)",
            "truncated": r"cannot read checkpoint '{path}': the file \(\d+ bytes\) is truncated",
            "junk": r"cannot read checkpoint '{path}': the file \(300 bytes\) is truncated",
            "malicious": r"refusing to load untrusted checkpoint '{path}': .*GLOBAL posix.system"}


def assert_one_line_refusal(err: str, command: str, kind: str, path: Path) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    pattern = f"usfmae-fast {command}: .*" + EXPECTED[kind].format(path=re.escape(str(path)))
    assert re.match(pattern, err), err


# ------------------------------------------------------------------ item 2: resume, unreadable
def test_resume_auto_over_unreadable_checkpoints_exits_2_and_keeps_them(images, tmp_path,
                                                                        capsys):
    run = tmp_path / "run"
    pretrain(tiny_config(images, run, **{"optim.steps": 4, "output.save_every": 2}))
    (_, second), (_, fourth) = ckpt.list_checkpoints(run)
    second.write_bytes(b"")  # e.g. the disk filled up
    fourth.write_bytes(fourth.read_bytes()[:1000])
    evidence = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(pretrain_cli(images, run, "--resume", "auto", "--steps", "6")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(r"usfmae-fast pretrain: resume=auto: none of the 2 checkpoint\(s\) in .* can "
                    r"be read, so nothing was resumed or changed", err), err
    assert f"cannot read checkpoint '{fourth}': the file (1000 bytes) is truncated" in err
    assert f"cannot read checkpoint '{second}': the file is empty (0 bytes)" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == evidence
    assert len(read_history(run / "history.csv")) == 4


@pytest.mark.parametrize("kind", ["empty", "truncated", "junk", "malicious"])
def test_resume_or_init_from_a_bad_file_exits_2_with_one_line(images, tmp_path, capsys,
                                                              bad_files, kind):
    path = bad_files[kind]
    for flag in ("--resume", "--init-from"):
        assert main(pretrain_cli(images, tmp_path / flag, flag, str(path), "--steps", "2")) == 2
        assert_one_line_refusal(capsys.readouterr().err, "pretrain", kind, path)
    assert not (path.parent / "pwned").exists()  # the payload never ran


@pytest.mark.parametrize("kind", ["empty", "truncated", "malicious"])
def test_finetune_weights_or_init_from_a_bad_file_exits_2_with_one_line(tmp_path, capsys, labels,
                                                                        bad_files, kind):
    path = bad_files[kind]
    for extra in (["--models", "test_resnet", "--weights", f"test_resnet={path}"],
                  ["--models", "usfmae", "--init", str(path)]):
        out = tmp_path / "out"
        assert main(["finetune", "--labels", str(labels), "--out", str(out), "--quick",
                     "--quiet", *extra]) == 2
        assert_one_line_refusal(capsys.readouterr().err, "finetune", kind, path)
        assert not out.exists()
    assert not (path.parent / "pwned").exists()


# ------------------------------------------------------------------ item 3: the NaN guard
def test_nan_guard_names_a_checkpoint_that_a_lower_lr_trains_on_from(images, tmp_path):
    run = tmp_path / "run"
    divergent = {"optim.steps": 12, "optim.lr": 300.0, "optim.clip_grad": None,
                 "optim.max_bad_steps": 3, "output.save_every": 1, "output.keep_last": 1}
    with pytest.raises(TrainingDiverged, match="3 steps in a row") as info:
        pretrain(tiny_config(images, run, **divergent))
    named = re.search(r"last good checkpoint.* is (\S+\.pt)\.", str(info.value)).group(1)
    rows, payload = read_history(run / "history.csv"), ckpt.load_training_state(named)

    summary = pretrain(tiny_config(images, run, **{**divergent, "optim.lr": 1e-4,
                                                   "output.resume": named}))
    good_step = summary["start_step"]
    assert summary["steps"] == 12 and summary["resumed_from"] == named
    resumed = read_history(run / "history.csv")[good_step:]
    assert len(resumed) == 12 - good_step and all(math.isfinite(r["loss"]) for r in resumed)

    assert ckpt.all_finite(payload["model"], payload["optimizer"])
    next_step = rows[good_step]  # the step after it, on its (finite) weights
    assert math.isfinite(next_step["loss"]) and math.isfinite(next_step["grad_norm"])
    assert good_step < rows[-1]["step"] - 3  # not the newest checkpoint (keep_last 1 kept it)


def test_non_finite_weights_are_never_written_as_a_checkpoint(images, tmp_path):
    from usfmae_fast.pretrain.distributed import DistContext
    from usfmae_fast.pretrain.engine import PretrainEngine

    engine = PretrainEngine(tiny_config(images, tmp_path, **{"optim.steps": 2}), DistContext())
    assert engine.save() is not None
    with torch.no_grad():
        engine.model.cls_token[0, 0, 0] = math.inf
    engine.state.step += 1
    assert engine.save() is None and [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [0]
    assert "step 1: the weights or optimizer state are not finite" in engine.monitor.notes[-1]


# ------------------------------------------------------------------ item 5: config values
@pytest.mark.parametrize("setting, message", [
    ("optim.mask_ratio=0", "optim.mask_ratio must be in (0, 0.984375]: at least one of the 64 "
                           "patches (64 px / patch 8) masked and one kept, got 0.0"),
    ("optim.mask_ratio=0.99", "optim.mask_ratio must be in (0, 0.984375]"),
    ("model.img_size=60", "model.img_size = 60 must be a multiple of model.patch_size = 8"),
    ("model.num_heads=5", "model.embed_dim = 192 must be a multiple of model.num_heads = 5"),
    ("optim.lr=inf", "optim.lr must be > 0 (finite) or null, got inf"),
    ("optim.weight_decay=nan", "optim.weight_decay must be >= 0 (finite), got nan"),
    ("data.rotate=-5", "data.rotate must be [r] with r in [0, 180] or [low, high] with -180 <= "
                       "low <= high <= 180 degrees, got [-5.0]"),
    ("data.crop_scale=1.5,2", "data.crop_scale must be [low, high] with 0 < low <= 1"),
    ("data.workers=-1", "data.workers must be >= 0 or null, got -1"),
    ("system.seed=-1", "system.seed must be in [0, 2**63), got -1"),
    ("system.compile_mode=fastest", "system.compile_mode must be one of"),
    ("system.device=cudax", "system.device must be auto, cpu, cuda or cuda:N, got 'cudax'"),
])
def test_pretrain_config_values_are_checked_with_their_range(setting, message, images, tmp_path,
                                                            capsys):
    out = tmp_path / "out"
    argv = ["pretrain", "--preset", "demo", "--data", str(images), "--out", str(out), "--quiet",
            "--steps", "2", "--set", "data.backend=torch", "--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usfmae-fast pretrain: {message}") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--rotate", "-1"], "rotate: -1.0 is out of range; accepted: in [0, 180] degrees"),
    (["--layer-decay", "2"], "layer_decay: 2.0 is out of range; accepted: in (0, 1], 1 = off"),
    (["--lr", "inf"], "lr: inf is out of range; accepted: > 0, or unset"),
    (["--mixup", "nan"], "mixup: nan is out of range; accepted: >= 0, 0 = off"),
    (["--vit-size", "giant"], "vit_size: 'giant' is out of range; accepted: one of"),
    (["--folds", "1"], "folds: must be >= 2, got 1"),
    (["--seed", "-1"], "seed: must be >= 0, got -1"),
])
def test_finetune_config_values_are_checked_with_their_range(extra, message, tmp_path, capsys,
                                                             labels):
    out = tmp_path / "out"
    assert main(["finetune", "--labels", str(labels), "--out", str(out), "--models",
                 "vit_scratch", "--quick", "--quiet", "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usfmae-fast finetune: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_demo_settings_are_checked_before_any_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet", "--steps", "0"]) == 2
    assert capsys.readouterr().err == ("usfmae-fast demo: pretrain_steps: 0 is out of range; "
                                       "accepted: >= 1\n")
    assert not out.exists()


def test_an_mae_checkpoint_that_does_not_fit_init_from_exits_2(images, tmp_path, capsys):
    mae = tiny_mae_checkpoint(tmp_path)  # 32 px / patch 8, embed 32; the demo preset's is 192
    assert main(pretrain_cli(images, tmp_path / "out", "--init-from", str(mae), "--steps", "1",
                             "--set", "model.embed_dim=64")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usfmae-fast pretrain: model.init_from '{mae}': state_dict does not "
                          f"match the model: mis-shaped keys"), err


def test_pretrain_without_a_data_source_exits_2_naming_it(tmp_path, capsys):
    # the mae / usfmae recipes no longer fall back to the in-memory pydicom-data frames
    assert main(["pretrain", "--preset", "mae", "--out", str(tmp_path / "run"), "--quiet",
                 "--steps", "1"]) == 2
    assert "data.source is not set" in capsys.readouterr().err
