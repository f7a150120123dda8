"""One configuration style for every command (issue 16): a validated dataclass behind each of
finetune, evaluate, scorecam, ingest and demo, filled from its defaults <- --config FILE.yaml
<- the flags given <- --set key=value, with every default shown by --help from the dataclass."""
from __future__ import annotations

import pytest
import yaml

from usfmae_fast.cli import build_parser, main
from usfmae_fast.cli import demo as demo_cli
from usfmae_fast.cli import finetune as finetune_cli
from usfmae_fast.cli import ingest as ingest_cli
from usfmae_fast.cli import scorecam as scorecam_cli
from usfmae_fast.runtime.config import ConfigError, build, help_for

# command: (required arguments, parse-only helper, YAML values, a flag over the file, the field
# that flag sets, a --set over both, how to read a field, a sample field of --help and its default)
COMMANDS = {
    "finetune": (["--labels", "l.csv"], finetune_cli.config_from_args,
                 {"folds": 3, "train": {"epochs": 7, "batch_size": 8}},
                 ["--epochs", "9"], "train.epochs", "train.batch_size=4",
                 "--epochs", "(default: 50)"),
    "evaluate": (["--ckpt", "a.pth", "--labels", "l.csv"], finetune_cli.evaluate_config_from_args,
                 {"title": "T", "n_boot": 300, "batch_size": 8},
                 ["--n-boot", "400"], "n_boot", "batch_size=4", "--n-boot", "(default: 1000)"),
    "scorecam": (["--ckpt", "c.pth", "--images", "x.png"], scorecam_cli.config_from_args,
                 {"colormap": "gray", "tolerance": 2.0, "alpha": 0.2},
                 ["--tolerance", "3"], "tolerance", "alpha=0.7", "--alpha", "(default: 0.5)"),
    "ingest": (["src", "--out", "o"], ingest_cli.config_from_args,
               {"frame_stride": 2, "max_side": 300, "jpeg_quality": 80},
               ["--max-side", "256"], "max_side", "jpeg_quality=70", "--max-side",
               "(default: 512)"),
    "demo": ([], demo_cli.config_from_args,
             {"folds": 4, "finetune_epochs": 4, "finetune_lr": 0.01},
             ["--epochs", "6"], "finetune_epochs", "finetune_lr=0.002", "--epochs",
             "(default: 8)"),
}
SET_FIELD = {"finetune": ("train.batch_size", 4), "evaluate": ("batch_size", 4),
             "scorecam": ("alpha", 0.7), "ingest": ("jpeg_quality", 70),
             "demo": ("finetune_lr", 0.002)}
FILE_ONLY = {"finetune": ("folds", 3), "evaluate": ("title", "T"),
             "scorecam": ("colormap", "gray"), "ingest": ("frame_stride", 2),
             "demo": ("folds", 4)}
FLAG_VALUE = {"finetune": 9, "evaluate": 400, "scorecam": 3.0, "ingest": 256, "demo": 6}
FILE_VALUE = {"finetune": 7, "evaluate": 300, "scorecam": 2.0, "ingest": 300, "demo": 4}


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _config(command, tmp_path, *extra):
    required, helper, values, *_ = COMMANDS[command]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    args = build_parser().parse_args([command, *required, "--config", str(path), *extra])
    return helper(args)


@pytest.mark.parametrize("command", COMMANDS)
def test_file_flags_and_set_reach_the_dataclass(command, tmp_path):
    _, _, _, flag, flag_field, override, *_ = COMMANDS[command]
    cfg = _config(command, tmp_path, *flag, "--set", override)
    key, value = FILE_ONLY[command]
    assert _get(cfg, key) == value                                   # the file
    assert _get(cfg, flag_field) == FLAG_VALUE[command]              # a flag over the file
    key, value = SET_FIELD[command]
    assert _get(cfg, key) == value                                   # --set over the file
    assert _get(_config(command, tmp_path), flag_field) == FILE_VALUE[command]  # file alone


@pytest.mark.parametrize("command", COMMANDS)
def test_set_wins_over_a_flag(command, tmp_path):
    _, _, _, flag, flag_field, *_ = COMMANDS[command]
    cfg = _config(command, tmp_path, *flag, "--set", f"{flag_field}={FILE_VALUE[command] + 1}")
    assert _get(cfg, flag_field) == FILE_VALUE[command] + 1


def test_flags_alone_keep_their_defaults():
    """No --config, no --set: the same values as before the config style."""
    args = build_parser().parse_args(["finetune", "--labels", "l.csv"])
    cfg = finetune_cli.config_from_args(args)
    assert (cfg.out_dir, cfg.train.epochs, cfg.folds, cfg.models) == \
        ("outputs/finetune", 50, 5, ["usfmae"])
    args = build_parser().parse_args(["finetune", "--labels", "l.csv", "--quick", "--patience",
                                      "0", "--out", "o"])
    cfg = finetune_cli.config_from_args(args)
    assert (cfg.out_dir, cfg.train.epochs, cfg.train.patience, cfg.folds) == ("o", 3, None, 2)
    cfg = scorecam_cli.config_from_args(build_parser().parse_args(
        ["scorecam", "--ckpt", "c", "--images", "x"]))
    assert (cfg.out_dir, cfg.score, cfg.weights, cfg.dtype, cfg.device) == \
        ("outputs/scorecam", "logit", "softmax", "fp32", None)
    cfg = ingest_cli.config_from_args(build_parser().parse_args(
        ["ingest", "s", "--out", "o", "--no-crop", "--color"]))
    assert (cfg.crop, cfg.keep_color, cfg.remove_text, cfg.shard_size) == (False, True, True, 0)
    cfg = demo_cli.config_from_args(build_parser().parse_args(["demo", "--quick", "--quiet"]))
    assert (cfg.folds, cfg.progress, cfg.out_dir) == (2, False, "outputs/demo")


BAD = {  # command: (unknown key, bad value, what the message names)
    "finetune": ("train.nope=1", "train.epochs=0", "epochs"),
    "evaluate": ("nope=1", "n_boot=0", "n_boot"),
    "scorecam": ("nope=1", "alpha=2", "alpha"),
    "ingest": ("nope=1", "workers=0", "workers"),
    "demo": ("nope=1", "folds=1", "folds"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_key_and_bad_value_exit_2_naming_the_key(command, tmp_path, capsys):
    required = COMMANDS[command][0]
    unknown, bad, name = BAD[command]
    out = ["--out", str(tmp_path / "o")] if command != "ingest" else []
    assert main([command, *required, *out, "--set", unknown]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([command, *required, *out, "--set", bad]) == 2
    err = capsys.readouterr().err
    assert name in err and ("accepted" in err or "must" in err)
    path = tmp_path / "bad.yaml"
    path.write_text("nope: 1\n")
    assert main([command, *required, *out, "--config", str(path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_the_dataclass_default(command, capsys):
    *_, flag, shown = COMMANDS[command]
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{flag} " in text and shown in text
    assert "--config" in text and "--set" in text


def test_help_for_and_build():
    from usfmae_fast.finetune.config import TrainConfig
    assert help_for(TrainConfig, "epochs", "epochs") == "epochs (default: 50)"
    cfg = build(TrainConfig(), None, {"epochs": 3}, ["lr=1e-3", "clip_grad=none", "mixup=0.2"])
    assert (cfg.epochs, cfg.lr, cfg.clip_grad, cfg.mixup) == (3, 1e-3, None, 0.2)
    with pytest.raises(ConfigError, match="epochs must be int"):
        build(TrainConfig(), None, {}, ["epochs=many"])
    with pytest.raises(ConfigError, match="key=value"):
        build(TrainConfig(), None, {}, ["epochs"])


def test_pretrain_config_error_is_the_shared_one():
    from usfmae_fast.pretrain import config as pretrain_config
    from usfmae_fast.runtime import config as shared
    assert pretrain_config.ConfigError is shared.ConfigError
    assert pretrain_config.parse_override is shared.parse_override
