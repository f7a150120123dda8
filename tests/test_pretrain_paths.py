"""The GPU user's training paths, run for real on the CPU with a tiny ViT-MAE on the
pydicom-data frames: bf16 autocast, fp16 autocast with a (CPU) GradScaler, torch.compile
(inductor, bf16) and FSDP2 over two gloo processes. Each run must learn (finite losses that
fall) and match the fp32 eager run: FSDP2 to rounding (same arithmetic, other summation
order), the low-precision runs within LOW_PRECISION_RTOL.

LOW_PRECISION_RTOL: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %) and fp16 11,
but the loss is the mean of ~6000 squared errors and AdamW's update barely depends on the
gradient's size, so over these 10 steps the low-precision losses stay within 0.07 % of fp32
(measured: bf16 0.035 %, fp16 0.015 %, compiled bf16 0.064 %). A path that is broken rather
than rounded moves a loss by far more than 2 %: one skipped or doubled update shifts the curve
by a step, and the loss falls 10-20 % per step at the start."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom.data")

from test_pretrain import (TINY, child_env, decode_the_dicoms_once,  # noqa: E402,F401
                           final_weights, tiny_config)
from usfmae_fast.pretrain.distributed import DistContext  # noqa: E402
from usfmae_fast.pretrain.engine import PretrainEngine  # noqa: E402
from usfmae_fast.pretrain.monitor import read_history  # noqa: E402

STEPS = 10
LOW_PRECISION_RTOL = 0.02
SHORT = {"optim.steps": STEPS, "output.save_every": STEPS, "output.figures": False,
         "output.tensorboard": False}


def config(out_dir, **overrides):
    return tiny_config(out_dir, **{k.replace(".", "__"): v for k, v in SHORT.items()},
                       **overrides)


def train(out_dir, **overrides):
    """``(engine, history rows, dtypes of the decoder's prediction in the training steps)`` of
    a whole run (the held-out loss is evaluated without autocast and without gradients)."""
    engine = PretrainEngine(config(out_dir, **overrides), DistContext())
    dtypes = set()

    def record(module, inputs, output):
        if torch.is_grad_enabled():
            dtypes.add(output.dtype)

    engine.model.decoder_pred.register_forward_hook(record)  # torch.compile traces it too
    engine.run()
    return engine, read_history(out_dir / "history.csv"), dtypes


def assert_learns(values):
    assert len(values) == STEPS and all(math.isfinite(x) for x in values), values
    assert np.mean(values[-3:]) < 0.85 * np.mean(values[:3]), values


def losses(rows):
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    _, rows, dtypes = train(out)
    assert dtypes == {torch.float32}
    assert_learns(losses(rows))
    return out, rows


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    return train(out, system__precision="bf16")


def test_bf16_autocast_matches_fp32(fp32_run, bf16_run):
    engine, rows, dtypes = bf16_run
    assert dtypes == {torch.bfloat16}  # autocast is on: the linear layers ran in bf16
    assert not engine.scaler.is_enabled()
    assert_learns(losses(rows))
    assert losses(rows) != losses(fp32_run[1])  # really another arithmetic
    np.testing.assert_allclose(losses(rows), losses(fp32_run[1]), rtol=LOW_PRECISION_RTOL)


# "auto" runs the fused loss (cpu backend): its gradient must survive the GradScaler's 65536
@pytest.mark.parametrize("ops_backend", ["torch", "auto"])
def test_fp16_autocast_with_grad_scaler_matches_fp32(fp32_run, tmp_path, ops_backend):
    engine, rows, dtypes = train(tmp_path, system__precision="fp16",
                                 system__ops_backend=ops_backend)
    assert dtypes == {torch.float16}
    assert engine.scaler.is_enabled()  # a CUDA-only scaler would have disabled itself here
    assert_learns(losses(rows))
    # no step was an overflow: the scaler never skipped one nor lowered its scale
    assert all(math.isfinite(r["grad_norm"]) for r in rows), [r["grad_norm"] for r in rows]
    assert engine.scaler.get_scale() == 2.0 ** 16
    np.testing.assert_allclose(losses(rows), losses(fp32_run[1]), rtol=LOW_PRECISION_RTOL)


@pytest.mark.slow
def test_torch_compile_inductor_bf16_matches_eager(fp32_run, bf16_run, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # no worker pool; config.patch, not monkeypatch, whose undo deletes inductor config entries
    with torch._inductor.config.patch(compile_threads=1):
        engine, rows, dtypes = train(tmp_path, system__precision="bf16", system__compile=True)
    assert isinstance(engine.train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert counters["stats"]["unique_graphs"] >= 1
    # the whole MAE forward (masking, attention, loss ops included) is one graph on a GPU too
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert dtypes == {torch.bfloat16}
    assert_learns(losses(rows))
    np.testing.assert_allclose(losses(rows), losses(bf16_run[1]), rtol=LOW_PRECISION_RTOL)
    np.testing.assert_allclose(losses(rows), losses(fp32_run[1]), rtol=LOW_PRECISION_RTOL)


FSDP_CHILD = """
import json, sys
from usfmae_fast.pretrain.config import build_config
from usfmae_fast.pretrain.distributed import is_sharded, setup, teardown
from usfmae_fast.pretrain.engine import PretrainEngine

cfg = build_config("demo", overrides=json.loads(sys.argv[1]))
ctx = setup(cfg.system.device)
engine = PretrainEngine(cfg, ctx)
rows, step = [], engine.train_step
engine.train_step = lambda batches: rows.append(step(batches)) or rows[-1]
engine.run()
params = list(engine.model.parameters())
report = {"rank": ctx.rank, "world_size": ctx.world_size, "sharded": is_sharded(engine.model),
          "local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                       for p in params),
          "full": sum(p.numel() for p in params), "rows": rows}
teardown(ctx)
with open(f"{cfg.output.out_dir}/rank{ctx.rank}.json", "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow
def test_fsdp2_two_gloo_processes_equal_one_process(fp32_run, tmp_path):
    out, single = fp32_run
    run_dir = tmp_path / "fsdp"
    run_dir.mkdir()
    script = tmp_path / "fsdp_child.py"
    script.write_text(FSDP_CHILD)
    overrides = {**TINY, **SHORT, "output.out_dir": str(run_dir), "system.distributed": "fsdp",
                 "output.progress": False}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), json.dumps(overrides)],
                         env=child_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["world_size"] == 2 and report["sharded"], report
        assert report["local"] < 0.6 * report["full"], report  # each rank holds about half
        assert [r["step"] for r in report["rows"]] == list(range(1, STEPS + 1))
        assert_learns(losses(report["rows"]))
        # the same arithmetic as one process, summed in another order
        np.testing.assert_allclose(losses(report["rows"]), losses(single), rtol=1e-4)
        np.testing.assert_allclose([r["grad_norm"] for r in report["rows"]],
                                   [r["grad_norm"] for r in single], rtol=1e-3)
    assert losses(ranks[0]["rows"]) == losses(ranks[1]["rows"])  # one all-reduced loss
    assert losses(read_history(run_dir / "history.csv")) == losses(ranks[0]["rows"])
    a, b = final_weights(out), final_weights(run_dir)  # gathered from the shards by rank 0
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("attn.qkv.bias"):  # not the key bias: see test_pretrain's DDP test
            a[name], b[name] = (torch.cat([t.chunk(3)[i] for i in (0, 2)])
                                for t in (a[name], b[name]))
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
