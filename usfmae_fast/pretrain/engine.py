"""The MAE pretraining engine: one loop for one process, torchrun DDP or FSDP2, on any ops
backend.

Per optimizer step: ``accum_steps`` micro-batches under autocast (bf16, or fp16 with a
GradScaler), gradients all-reduced once, unscaled, clipped (``clip_grad``), then one host sync
fetches the loss and gradient norm together; a non-finite step is skipped (no update) and
counted, and ``max_bad_steps`` in a row stop the run with :class:`TrainingDiverged` naming the
last good checkpoint: one whose weights and optimizer state are finite (no other is written)
and whose next step was finite (a finite loss before an update says nothing about the weights
after it). That one is never pruned, so a resume from it at a lower lr trains on.

The masking noise of every step is drawn for the whole global batch from a generator seeded by
(seed, step), and each rank and micro-step takes its own samples' rows: a run masks the same
way on any number of processes, with any accumulation, resumed or not. Everything else that is
random is in the checkpoint (see ``checkpointing.py``), so ``resume="auto"`` continues
bit-exactly on the same hardware and process count (with the torch or in-memory loaders;
DALI's augmentation restarts with fresh seeds).
"""
from __future__ import annotations

import functools
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import ops
from ..runtime.lock import output_lock
from . import checkpointing as ckpt
from .baselines import METHOD, baseline_losses, model_losses
from .config import PretrainConfig, dump_yaml, micro_batch_size, run_length
from .data import build_data
from .distributed import (DistContext, all_reduce_mean, broadcast_object,
                          enable_activation_checkpointing, full_state, gather_objects,
                          is_sharded, load_full_state, no_grad_sync, setup, teardown, wrap_model)
from .monitor import RunMonitor, format_summary, throughput_summary
from ..runtime.optim import WarmupCosineLR, build_optimizer
from ..runtime.precision import torch_dtype
from ..runtime.provenance import provenance
from ..runtime.seed import seed_everything

FINAL_WEIGHTS = "checkpoint.safetensors"
PROVENANCE = "provenance.json"


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class TrainState:
    step: int = 0           # optimizer steps done
    epoch: int = 0          # data position: `epoch_images` of `epoch` (all ranks) trained on
    epoch_images: int = 0
    skipped: int = 0        # non-finite steps skipped, in all
    bad_in_a_row: int = 0
    seconds: float = 0.0    # training time of the steps done, over all resumes


def build_model(cfg: PretrainConfig):
    """The MaskedAutoencoderViT of ``cfg.model`` (freshly initialised)."""
    from ..models.mae import mae_vit

    m = cfg.model
    sizes = ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads", "mlp_ratio")
    return mae_vit(m.size, img_size=m.img_size, in_chans=m.in_chans,
                   norm_pix_loss=m.norm_pix_loss, drop_path_rate=m.drop_path_rate,
                   **{k: getattr(m, k) for k in sizes if getattr(m, k) is not None})


def init_from_checkpoint(model, path, data_mean: float, data_std: float):
    """Start from MAE weights (fb/mae ``.pth``, USF-MAE ``.pt``, ours, a Hugging Face ViTMAE /
    ViT folder): 3-channel weights are folded to 1 channel for gray data (normalised with
    ``data_mean`` / ``data_std``), position embeddings resampled to the model's grid, and an
    encoder-only checkpoint leaves the decoder as initialised."""
    from ..models import checkpoint as mck
    from ..models.vit import pair

    state, saved = mck.read_checkpoint(path)  # CheckpointError: refused or damaged
    try:
        saved = {**mck.infer_config(state), **(saved or {})}
        if state["patch_embed.proj.weight"].shape[1] == 3 and model.in_chans == 1:
            state = mck.to_grayscale(state, gray_mean=data_mean, gray_std=data_std)
        height, width = pair(saved["img_size"])
        old_grid = (height // saved["patch_size"], width // saved["patch_size"])
        state = mck.interpolate_pos_embed(state, model.grid_size, old_grid)
        return mck.load_state_dict(model, state, encoder_only="decoder_embed.weight" not in state)
    except ValueError as exc:  # not an MAE, or one that does not fit this model
        raise mck.CheckpointError(f"model.init_from {str(path)!r}: {exc}") from exc


def data_manifest(source: str) -> Path | None:
    """The file listing a run's images, when ``data.source`` has one: the CSV itself, or the
    ``manifest.csv`` of an ingest folder (None for shards, plain folders and "demo")."""
    path = Path(source)
    if path.is_file() and path.suffix == ".csv":
        return path
    return path / "manifest.csv" if (path / "manifest.csv").is_file() else None


def run_provenance(cfg: PretrainConfig, device) -> dict:
    """:func:`~usfmae_fast.runtime.provenance.provenance` of a pretraining run: its config,
    seed and device, the hashes of the init checkpoint and of the data manifest."""
    from ..models.checkpoint import checkpoint_file

    init = cfg.model.init_from and checkpoint_file(cfg.model.init_from)
    return provenance(config=cfg.to_dict(), seed=cfg.system.seed, device=str(device),
                      files={"init_checkpoint": init or None,
                             "data_manifest": data_manifest(cfg.data.source)})


def _with_ops_backend(method):
    """The run's ops backend (system.ops_backend) for the method's duration only: an engine in
    a library call leaves the process-wide choice as it found it."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with ops.use_backend(self.cfg.system.ops_backend):
            return method(self, *args, **kwargs)
    return wrapper


class PretrainEngine:
    """Builds the run from ``cfg`` (data, model, optimizer, resume) and :meth:`run` trains it.

    ``on_step(engine)`` is called after every optimizer step (and its checkpoint, if any).
    """

    def __init__(self, cfg: PretrainConfig, ctx: DistContext | None = None, on_step=None):
        self.cfg, self.on_step = cfg, on_step
        self.ctx = ctx or DistContext()
        s, o = cfg.system, cfg.optim
        if s.num_threads is not None:
            torch.set_num_threads(s.num_threads)
        self.out_dir = Path(cfg.output.out_dir)
        self.device = self.ctx.device
        self.amp_dtype = torch_dtype(s.precision)
        self.micro_batch = micro_batch_size(cfg, self.ctx.world_size)
        seed_everything(s.seed)  # the same initial weights on every rank
        self.data = build_data(cfg.data, img_size=cfg.model.img_size,
                               channels=cfg.model.in_chans, micro_batch=self.micro_batch,
                               seed=s.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
                               device=self.device)
        self.model = build_model(cfg)
        if cfg.model.init_from:
            init_from_checkpoint(self.model, cfg.model.init_from, self.data.mean, self.data.std)
        self.model.to(self.device)
        self.steps_per_epoch = len(self.data.loader) // o.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch holds {len(self.data.loader)} micro-batches per rank, "
                             f"fewer than optim.accum_steps = {o.accum_steps}")
        self.total_steps, self.warmup_steps = run_length(cfg, self.steps_per_epoch)
        # the model as initialised, on the held-out images and mask draws of the end's score
        self.heldout_losses_init = self._heldout_losses()
        self.heldout_loss_init = _mean_or_none(self.heldout_losses_init)
        if s.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.train_model = wrap_model(self.model, self.ctx, s.distributed)
        if s.compile:
            self.train_model = torch.compile(self.train_model, mode=s.compile_mode)
        self.optimizer = build_optimizer(self.model, cfg.peak_lr(), o.weight_decay,
                                         (o.beta1, o.beta2))
        self.scheduler = WarmupCosineLR(self.optimizer, cfg.peak_lr(), o.min_lr,
                                        self.warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=s.precision == "fp16")
        self.state = TrainState()
        self.noise_generator = torch.Generator(device=self.device)
        seed_everything(s.seed + self.ctx.rank)  # e.g. drop-path differs between ranks
        self._resume_note = None
        self.resumed_from = self._resume()
        # the checkpoint of the step before (its next step decides whether it is good); the
        # newest one whose next step was finite
        self._unconfirmed, self.good_checkpoint = self.resumed_from, None
        self.monitor = RunMonitor(self.out_dir, enabled=self.ctx.is_main,
                                  total_steps=self.total_steps, start_step=self.state.step,
                                  tensorboard=cfg.output.tensorboard, progress=cfg.output.progress)
        self.step_seconds: list[float] = []
        self.provenance: dict | None = None  # rank 0, from the start of run()

    # -- resume ------------------------------------------------------------------------------
    def _resume(self) -> str | None:
        spec = self.cfg.output.resume
        path = None
        if self.ctx.is_main:
            found = ckpt.resolve_resume(spec, self.out_dir)
            path = str(found[0]) if found else None
            earlier = ckpt.list_checkpoints(self.out_dir)
            if spec is None and earlier:
                if not self.cfg.output.overwrite:
                    raise FileExistsError(
                        f"{self.out_dir} holds checkpoints of an earlier run (up to step "
                        f"{earlier[-1][0]}); continue it with resume=auto (--resume auto), "
                        f"start over with output.overwrite=true, or choose another out_dir")
                for _, old in earlier:
                    old.unlink()
        path = broadcast_object(path, self.ctx)  # every rank loads the file rank 0 chose
        if path is None:
            return None
        payload = ckpt.load_training_state(path)
        load_full_state(self.model, self.optimizer, payload["model"], payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState(**payload["train_state"])
        rngs = payload["rng"]
        ckpt.restore_rng(rngs[self.ctx.rank % len(rngs)], self.device)
        saved = payload["config"]["optim"]
        if (len(rngs), saved["batch_size"], saved["accum_steps"]) != (
                self.ctx.world_size, self.cfg.optim.batch_size, self.cfg.optim.accum_steps):
            self._resume_note = (
                f"resuming a run of {len(rngs)} process(es), batch {saved['batch_size']} in "
                f"{saved['accum_steps']} micro-step(s), as {self.ctx.world_size} process(es), "
                f"batch {self.cfg.optim.batch_size} in {self.cfg.optim.accum_steps}: the data "
                f"order continues where it was, but not bit-exactly")
        return path

    # -- one optimizer step ------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype != torch.float32)

    def _step_noise(self) -> torch.Tensor:
        """Masking noise of the step's whole global batch, from a generator seeded by
        (seed, step): masking depends neither on the process count nor on resuming."""
        seed = np.random.SeedSequence([self.cfg.system.seed, self.state.step])
        self.noise_generator.manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
        return torch.rand(self.cfg.optim.batch_size, self.model.patch_embed.num_patches,
                          device=self.device, generator=self.noise_generator)

    def _micro_noise(self, noise: torch.Tensor, micro: int) -> torch.Tensor:
        """This rank's rows for micro-step ``micro``. The loaders shard each global micro-batch
        of ``W * b`` images so that rank ``r`` holds its rows ``r, r + W, ...``, and micro-step
        ``m`` is the ``m``-th such block of the step's images."""
        w, b = self.ctx.world_size, self.micro_batch
        return noise[micro * w * b:(micro + 1) * w * b][self.ctx.rank::w].contiguous()

    def batches(self):
        """This rank's micro-batches, endlessly, from the data position in ``self.state``
        (counted in images of all ranks, so it means the same for any process count)."""
        loader, images_per_batch = self.data.loader, self.micro_batch * self.ctx.world_size
        while True:
            epoch = self.state.epoch
            loader.set_epoch(epoch, start_batch=self.state.epoch_images // images_per_batch)
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed here
                batches = iter(loader)
            for images, _ in batches:
                self.state.epoch_images += images_per_batch
                yield images
            self.state.epoch, self.state.epoch_images = epoch + 1, 0

    def _grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.clip_grad
        norm = nn.utils.clip_grad_norm_(params, clip) if clip else \
            nn.utils.get_total_norm([p.grad for p in params])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @_with_ops_backend
    def train_step(self, batches) -> dict:
        o, accum = self.cfg.optim, self.cfg.optim.accum_steps
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        step_noise = self._step_noise()
        for micro in range(accum):
            images = next(batches)
            noise = self._micro_noise(step_noise, micro)[:images.shape[0]]
            with no_grad_sync(self.train_model, skip=micro < accum - 1):
                with self._autocast():
                    loss, _, _ = self.train_model(images, mask_ratio=o.mask_ratio, noise=noise)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float() / accum
        all_reduce_mean(loss_sum, self.ctx)
        self.scaler.unscale_(self.optimizer)
        norm = self._grad_norm()
        loss_value, norm_value = torch.stack([loss_sum, norm.float()]).tolist()  # the one sync
        # with fp16 an overflowing gradient is the GradScaler's business (it skips and rescales)
        finite = math.isfinite(loss_value) and (self.scaler.is_enabled()
                                                or math.isfinite(norm_value))
        if finite and self._unconfirmed is not None:  # the step after it: it is good
            self.good_checkpoint = self._unconfirmed
        self._unconfirmed = None  # (or it never will be)
        if finite:
            self.scaler.step(self.optimizer)
            self.state.bad_in_a_row = 0
        else:
            self.state.skipped += 1
            self.state.bad_in_a_row += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.lr
        self.scheduler.step()
        self.state.step += 1
        seconds = time.perf_counter() - started
        self.state.seconds += seconds
        self.step_seconds.append(seconds)
        return {"step": self.state.step, "epoch": self.state.epoch, "loss": loss_value, "lr": lr,
                "grad_norm": norm_value, "images_per_s": o.batch_size / seconds,
                "seconds": round(self.state.seconds, 4), "skipped": self.state.skipped}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> str | None:
        """The full training state at this step (rank 0 writes; every rank takes part), unless
        a weight or optimizer state is not finite; its path (on every rank) or None."""
        model_state = optim_state = None
        if self.ctx.is_main or is_sharded(self.model):
            model_state, optim_state = full_state(self.model, self.optimizer)
        rngs = gather_objects(ckpt.capture_rng(self.device), self.ctx)
        path = None
        if self.ctx.is_main and not ckpt.all_finite(model_state, optim_state):
            self.monitor.note(f"step {self.state.step}: the weights or optimizer state are not "
                              f"finite; no checkpoint written")
        elif self.ctx.is_main:
            payload = {"train_state": asdict(self.state), "model": model_state,
                       "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                       "scaler": self.scaler.state_dict(), "rng": rngs,
                       "config": self.cfg.to_dict(), "model_config": self.model.config,
                       "provenance": self.provenance}
            path = str(ckpt.save_checkpoint(self.out_dir, self.state.step, payload,
                                            self.cfg.output.keep_last, keep=self.good_checkpoint))
        path = broadcast_object(path, self.ctx)  # also waits for rank 0's write
        if path is not None:
            self._unconfirmed = path
        return path

    # -- the run -----------------------------------------------------------------------------
    @_with_ops_backend
    def run(self) -> dict:
        cfg, mon = self.cfg, self.monitor
        if self.ctx.is_main:
            dump_yaml(cfg, self.out_dir / "config.yaml")
            self.provenance = run_provenance(cfg, self.device)
            (self.out_dir / PROVENANCE).write_text(json.dumps(self.provenance, indent=2))
        start_step = self.state.step
        mon.note(f"pretrain: {self.total_steps} steps of {cfg.optim.batch_size} images "
                 f"({self.ctx.world_size} process(es) x {self.micro_batch} x "
                 f"{cfg.optim.accum_steps} accumulation), {self.steps_per_epoch} steps/epoch, "
                 f"peak lr {cfg.peak_lr():.3g}, warmup {self.warmup_steps}, {cfg.system.precision} "
                 f"on {self.device}, ops backend {ops.get_backend()}")
        if self.resumed_from:
            mon.note(f"resumed from {self.resumed_from} at step {start_step}")
            if self._resume_note:
                mon.note(self._resume_note)
        batches = self.batches()
        try:
            while self.state.step < self.total_steps:
                row = self.train_step(batches)
                mon.log(row)
                if self.state.bad_in_a_row >= cfg.optim.max_bad_steps:
                    good = self.good_checkpoint or "none (no checkpoint was followed by a " \
                        "finite step)"
                    raise TrainingDiverged(
                        f"{self.state.bad_in_a_row} steps in a row up to step {self.state.step} "
                        f"had a non-finite loss or gradient (lr {row['lr']:.3g}); stopped. The "
                        f"last good checkpoint (finite weights, and a finite step after them) "
                        f"is {good}. Lower optim.lr / optim.blr, set optim.clip_grad, or use "
                        f"bf16, then resume from it (output.resume=PATH).")
                if self.state.bad_in_a_row:
                    mon.note(f"step {self.state.step}: non-finite loss or gradient, step "
                             f"skipped ({self.state.skipped} so far)")
                periodic = self.state.step % cfg.output.save_every == 0
                if (periodic and not self.state.bad_in_a_row) or \
                        self.state.step == self.total_steps:
                    self.save()
                if self.on_step is not None:
                    self.on_step(self)
        finally:
            mon.close()
        return self.finish(start_step)

    def finish(self, start_step: int) -> dict:
        """Final weights, figures and the summary (rank 0)."""
        model = self._plain_model()  # every rank takes part in gathering a sharded model
        if not self.ctx.is_main:
            return {"rank": self.ctx.rank, "steps": self.state.step}
        from ..models.checkpoint import save_safetensors
        from .figures import plot_loss_curve, plot_reconstructions

        out, history, arte = self.out_dir, self.monitor.history, {}
        arte["weights"] = str(save_safetensors(model, out / FINAL_WEIGHTS, metadata={
            "train_config": json.dumps(self.cfg.to_dict()),
            "provenance": json.dumps(self.provenance)}))
        arte["history"], arte["config"] = str(out / "history.csv"), str(out / "config.yaml")
        arte["provenance"] = str(out / PROVENANCE)
        recon = None
        losses_end = self._heldout_losses(model)
        baselines = self._heldout_baselines()
        heldout_end = _mean_or_none(losses_end)
        if self.cfg.output.figures and history:
            points = {} if self.heldout_loss_init is None else {
                0: self.heldout_loss_init, self.state.step: heldout_end}
            arte["loss_curve"] = str(plot_loss_curve(
                history, out / "loss_curve.png", heldout=points,
                baselines={k: float(np.mean(v)) for k, v in baselines.items()}))
        if self.cfg.output.figures and self.data.heldout is not None:
            recon = plot_reconstructions(
                model, self.data.heldout.to(self.device), out / "reconstruction.png",
                self.data.mean, self.data.std, mask_ratio=self.cfg.optim.mask_ratio,
                seed=self.cfg.system.seed, titles=self.data.heldout_names)
            arte["reconstruction"] = recon["path"]
        throughput = throughput_summary(
            self.step_seconds, self.cfg.optim.batch_size, self.ctx.world_size, model,
            self.cfg.optim.mask_ratio, self.device, self.amp_dtype) if self.step_seconds else None
        losses = [h["loss"] for h in history if math.isfinite(h["loss"])]
        window = max(1, min(20, len(losses) // 5))
        summary = {
            "steps": self.state.step, "total_steps": self.total_steps, "start_step": start_step,
            "resumed_from": self.resumed_from, "skipped_steps": self.state.skipped,
            "final_loss": losses[-1] if losses else None, "loss_window": window,
            "first_loss_mean": float(np.mean(losses[:window])) if losses else None,
            "last_loss_mean": float(np.mean(losses[-window:])) if losses else None,
            # the model's loss on the held-out images at the start / end, each the mean over
            # output.heldout_draws fixed mask draws (the same ones as heldout_baselines)
            "heldout_loss_init": self.heldout_loss_init,
            "heldout_loss_end": heldout_end,
            "heldout_masked_mse": recon["masked_mse"] if recon else None,  # draw 0 (figure)
            "heldout_baselines": {k: float(np.mean(v)) for k, v in baselines.items()} or None,
            "baseline_method": METHOD.format(draws=self.cfg.output.heldout_draws,
                                             mask_ratio=self.cfg.optim.mask_ratio)
            if baselines else None,
            "heldout_draws": self.cfg.output.heldout_draws if baselines else None,
            "heldout_per_draw": {"init": self.heldout_losses_init, "end": losses_end,
                                 **baselines} if baselines else None,
            "train_seconds": self.state.seconds, "throughput": throughput,
            "data": self.data.report, "data_mean": self.data.mean, "data_std": self.data.std,
            "model_config": self.model.config,
            "config": self.cfg.to_dict(), "notes": self.monitor.notes, "artefacts": arte,
            "provenance": self.provenance}
        arte["summary"] = str(out / "summary.json")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if throughput and self.cfg.output.progress:
            print(format_summary(throughput), flush=True)
        return summary

    def _plain_model(self):
        """The trained model as an ordinary (unsharded) module; a sharded one is gathered (every
        rank takes part) into a copy on rank 0 (None elsewhere)."""
        if not is_sharded(self.model):
            return self.model
        state, _ = full_state(self.model, self.optimizer)
        if not self.ctx.is_main:
            return None
        plain = build_model(self.cfg)
        plain.load_state_dict(state)
        return plain.to(self.device)

    @_with_ops_backend
    def _heldout_losses(self, model=None) -> list[float] | None:
        """The model's loss on the held-out images for each of the fixed mask draws (rank 0;
        None without held-out images)."""
        if not self.ctx.is_main or self.data.heldout is None:
            return None
        return model_losses(model or self.model, self.data.heldout.to(self.device),
                            self.cfg.optim.mask_ratio, self.cfg.system.seed,
                            self.cfg.output.heldout_draws)

    @_with_ops_backend
    def _heldout_baselines(self) -> dict[str, list[float]]:
        """``{name: [loss per draw]}`` of the trivial predictors (see ``baselines.py``) on the
        held-out images and the same mask draws; empty without held-out images."""
        if not self.ctx.is_main or self.data.heldout is None:
            return {}
        return baseline_losses(self.data.heldout.to(self.device), self.model.config["patch_size"],
                               bool(self.model.norm_pix_loss), self.cfg.optim.mask_ratio,
                               self.cfg.system.seed, self.cfg.output.heldout_draws)


def _mean_or_none(values: list[float] | None) -> float | None:
    return float(np.mean(values)) if values else None


def pretrain(cfg: PretrainConfig, on_step=None) -> dict:
    """Run ``cfg`` in this process (joining torchrun's process group when there is one); rank 0
    holds ``output.out_dir`` for the run (:class:`~usfmae_fast.runtime.lock.FolderBusy` if another run
    does)."""
    ctx = setup(cfg.system.device)
    try:
        with output_lock(cfg.output.out_dir, "pretrain") if ctx.is_main else nullcontext():
            return PretrainEngine(cfg, ctx, on_step=on_step).run()
    finally:
        teardown(ctx)
