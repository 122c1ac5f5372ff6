"""The training engine: one loop for every method (AMP, torch.compile, DDP, exact resume).

Data arrive as uint8 `[B, 3, H, W]` and reach the classifier as bytes on the device (the
reprogramming ops scale them by 1/255 as they read them). The global
batch `train.batch_size` is split over ranks and gradient-accumulation micro-batches. A checkpoint
is written every `save_every` steps (default: each epoch) and the validation split is scored
every `eval_every` steps (default: at each of those checkpoints), both at the last step too. The
classifier is scored as the run serves it (`runs.restore.served_alpha`: a Reprogrammer at its
residual blend `method.alpha`, as `load_run` and export give it), and the best score picks the
`best` checkpoint; a score that beats the best between two saves is checkpointed at once.
SIGINT/SIGTERM finish the current step, save, and stop with `TrainingInterrupted`.
"""
import contextlib
import logging
import math
import signal
import time
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import doctor
from ..config import Config, ConfigError, to_dict
from ..data.images import base_dataset, first_image_size
from ..data.loaders import eval_loader, make_loader
from ..data.suites import TrainData
from ..files import write_json_atomically
from ..methods import TrainingObjective, build_method
from ..runs import checkpoint as ckpt
from ..runs.restore import served_alpha
from ..runs.rundir import RunDirectory
from ..runtime import autocast, resolve_device, to_device_images
from .distributed import DistInfo, ResumableSampler, all_reduce_sum, init_distributed, shutdown
from .telemetry import GpuTelemetry
from .tracking import learning_rates, start_tracking

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class TrainingDiverged(RuntimeError):
    pass


@torch.no_grad()
def evaluate_accuracy(classifier, dataset, batch_size: int, device, precision: str, info: DistInfo, *,
                      num_workers=None, budget_gb=None) -> float:
    """Top-1 accuracy on `dataset`, each rank scoring its own shard.

    Side-effect free on the random state: the loaders draw nothing from the global RNG (a file
    loader's DataLoader has a generator of its own), and the checkpoint saves the global RNG that
    training's dropout masks come from.
    """
    classifier.eval()
    shard = range(info.rank, len(dataset), info.world_size)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels, _ in eval_loader(dataset, batch_size, device, indices=shard, num_workers=num_workers,
                                         budget_gb=budget_gb):
        with autocast(device, precision):
            logits = classifier(to_device_images(images, device))
        counts[0] += (logits.argmax(-1).cpu() == labels).sum().item()
        counts[1] += len(labels)
    classifier.train()
    counts = all_reduce_sum(counts, info)
    return (counts[0] / counts[1].clamp(min=1)).item()


class _StopFlag:
    """Records SIGINT/SIGTERM so the loop can stop between steps."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _memory_mb(device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _stop_requested(stop: _StopFlag, info: DistInfo, device) -> bool:
    if not info.enabled:
        return stop.signum != 0
    flag = torch.tensor([float(stop.signum)], device=device)
    flag = all_reduce_sum(flag, info)
    if flag.item() and not stop.signum:
        stop.signum = signal.SIGTERM
    return bool(flag.item())


class _Window:
    """Steps and images since the last log: the logged mean loss and throughput."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.images = time.perf_counter(), 0, 0

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    """One training run, in the order a reader follows it: `setup` (the classifier, optimisers,
    schedulers, scaler, loader and trackers, or all of them as a checkpoint left them), `fit` (the
    loop), which calls `train_step` (one optimiser step), `validate` and `save`.

    The resumable progress is the attributes named in `PROGRESS`; a checkpoint stores them as
    `engine_state`, so a resumed run continues with the same evaluations and the same `best`."""

    PROGRESS = ("step", "best_val", "best_step", "evaluations", "skipped_steps")

    def __init__(self, cfg: Config, run: RunDirectory, data: TrainData, *, info: DistInfo, device,
                 progress: bool = True):
        self.cfg, self.tcfg, self.data, self.info, self.device = cfg, cfg.train, data, info, device
        self.run, self.run_dir, self.progress = run, run.path, progress
        self.step, self.epoch, self.skipped_steps = 0, 0, 0
        self.best_val, self.best_step, self.evaluations = -1.0, None, []
        self.images_seen, self.window = 0, _Window()

    # ---- setup --------------------------------------------------------------------------------
    def setup(self, clip, *, resume: bool = False) -> None:
        """Everything `fit` needs, on `self`; `resume` restores the latest checkpoint's state."""
        tcfg, info = self.tcfg, self.info
        if tcfg.batch_size % (info.world_size * tcfg.grad_accum):
            raise ConfigError(f"train.batch_size={tcfg.batch_size} must be divisible by world size "
                              f"{info.world_size} x train.grad_accum={tcfg.grad_accum}")
        self.micro_batch = tcfg.batch_size // (info.world_size * tcfg.grad_accum)
        # On CUDA: never train on a kernel that disagrees with its reference (seconds, once a process).
        doctor.check_kernels_once(self.device, tcfg.precision)
        torch.manual_seed(tcfg.seed)
        clip, tokenizer = clip
        self.classifier = build_method(clip, tokenizer, self.data.classnames, self.cfg.method).to(self.device)
        if not self.classifier.trainable:
            raise ConfigError(f"method {self.cfg.method.name!r} has nothing to train; evaluate it directly")
        self.served_alpha = served_alpha(self.classifier, self.cfg)
        self._setup_schedule()
        self.optimizers, self.schedulers = self.classifier.make_optimizers(self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tcfg.precision == "amp_fp16")
        self._setup_step_function()
        self.meta = {"config": to_dict(self.cfg), "classnames": list(self.data.classnames),
                     "method": self.cfg.method.name,
                     "model": {"name": self.cfg.model.name, "pretrained": self.cfg.model.pretrained},
                     "image_resolution": first_image_size(self.data.train)}
        if resume:
            self._resume()
        self.sampler = ResumableSampler(self.data.train, info, seed=tcfg.seed)
        self.loader = make_loader(self.data.train, self.sampler, self.micro_batch, self.device, drop_last=True,
                                  num_workers=self.cfg.data.num_workers, budget_gb=self.cfg.data.memory_budget_gb,
                                  seed=tcfg.seed)
        self.run.start()
        self.tracker = start_tracking(self.cfg, self.run_dir, self.optimizers, main=info.is_main)
        self.telemetry = GpuTelemetry(self.device.index) if self.device.type == "cuda" and info.is_main else None
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.cfg.method.name}", unit="step",
                        disable=not (self.progress and info.is_main), dynamic_ncols=True)

    def _setup_schedule(self) -> None:
        tcfg = self.tcfg
        epochs = tcfg.epochs or self.classifier.default_epochs
        self.steps_per_epoch = len(self.data.train) // tcfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(self.data.train)} samples, fewer than one batch of "
                              f"{tcfg.batch_size}; lower train.batch_size")
        self.total_steps = min(epochs * self.steps_per_epoch, tcfg.max_steps or math.inf)
        self.save_every = tcfg.save_every or self.steps_per_epoch
        self.eval_every = tcfg.eval_every or self.save_every

    def _setup_step_function(self) -> None:
        """`self.objective` (the loss module, DDP-wrapped when distributed) and `self.step_fn`, the
        callable the step runs (compiled with `train.compile=step`)."""
        self.objective = TrainingObjective(self.classifier)
        if self.tcfg.compile == "model":
            for tower in self.classifier.frozen_towers():
                tower.compile()
        if self.info.enabled:
            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_fn = torch.compile(self.objective) if self.tcfg.compile == "step" else self.objective

    def _resume(self) -> None:
        path = ckpt.find_checkpoint(self.run_dir, "latest")
        saved = ckpt.read_meta(path)
        if saved["method"] != self.meta["method"] or saved["model"] != self.meta["model"]:
            raise ckpt.CheckpointError(f"{path} was written by method {saved['method']} on {saved['model']}, "
                                       f"this run is {self.meta['method']} on {self.meta['model']}")
        if saved["classnames"] != self.meta["classnames"]:
            raise ckpt.CheckpointError(f"{path} was trained on other classes; resume needs the same dataset")
        scored_at = {e["alpha"] for e in saved["engine_state"]["evaluations"] if "alpha" in e} - {self.served_alpha}
        if scored_at:
            raise ckpt.CheckpointError(f"{path}'s evaluations were scored at alpha {scored_at.pop()}, this run serves "
                                       f"alpha {self.served_alpha}: resume with the method.alpha it was trained "
                                       "with, or train again (--overwrite)")
        self.classifier.load_learned_state(ckpt.load_learned(path, saved))
        ckpt.restore_training(path, saved, self.optimizers, self.schedulers, self.scaler)
        for name in self.PROGRESS:
            setattr(self, name, saved["engine_state"][name])
        log.info("resumed from %s (step %d)", path, self.step)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to `total_steps`; returns the summary also written to `RUN_DIR/summary.json`."""
        start = time.perf_counter()
        self.classifier.train()
        self.window.reset()
        self.loss_sum = torch.zeros((), device=self.device)
        telemetry = self.telemetry if self.telemetry is not None else contextlib.nullcontext()
        with _StopFlag() as stop, telemetry, self.tracker:
            while self.step < self.total_steps:
                batches, steps = self._start_epoch()
                for _ in range(steps):
                    self.train_step(batches)
                    stopping = _stop_requested(stop, self.info, self.device)
                    if self._due(self.tcfg.log_every) or stopping:
                        self._log_train()
                    self._validate_and_save(stopping)
                    if stopping:
                        self.bar.close()
                        name = signal.Signals(stop.signum).name
                        raise TrainingInterrupted(stop.signum, f"stopped by {name} at step {self.step}; checkpoint "
                                                  f"saved in {self.run_dir / 'checkpoints'}; continue with --resume")
        self.bar.close()
        summary = self._summary(time.perf_counter() - start)
        if self.info.is_main:
            write_json_atomically(self.run_dir / "summary.json", summary)
        return summary

    def _start_epoch(self):
        """`(batches, steps)`: the loader positioned at `self.step` (mid-epoch after a resume) and
        the steps left in this epoch."""
        self.epoch, offset = divmod(self.step, self.steps_per_epoch)
        self.sampler.set_position(self.epoch, offset * self.micro_batch * self.tcfg.grad_accum)
        return iter(self.loader), min(self.steps_per_epoch - offset, self.total_steps - self.step)

    def _due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.total_steps

    def train_step(self, batches) -> None:
        """One optimiser step on `train.grad_accum` micro-batches from `batches`."""
        grad_accum = self.tcfg.grad_accum
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        for micro in range(grad_accum):
            images, labels = self._next_batch(batches)
            # DDP all-reduces the gradients once, on the step's last micro-batch.
            sync = self.objective.no_sync() if self.info.enabled and micro < grad_accum - 1 \
                else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.tcfg.precision):
                    loss = self.step_fn(images, labels) / grad_accum
                self.scaler.scale(loss).backward()
            self.loss_sum += loss.detach()
        self._optimizer_step()
        self.step += 1
        self.images_seen += self.tcfg.batch_size
        self.window.images += self.tcfg.batch_size
        self.window.steps += 1
        self.bar.update(1)

    def _next_batch(self, batches):
        images, labels, skipped = next(batches)
        if skipped:  # unreadable files: dropped from the batch, counted, fatal past a limit
            base_dataset(self.data.train).record_skipped(skipped)
        return to_device_images(images, self.device), labels.to(self.device, non_blocking=True)

    def _optimizer_step(self) -> None:
        """The (scaled) optimiser and scheduler steps; an AMP step the scaler skips is counted."""
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1
        for scheduler in self.schedulers:
            scheduler.step()

    def _log_train(self) -> None:
        mean_loss = self._loss_since_log() / max(self.window.steps, 1)
        self.loss_sum.zero_()
        rate = self.window.images_per_s()
        self.window.reset()
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
        self.tracker.log_train(self.step, epoch=self.epoch, loss=mean_loss, lr=learning_rates(self.optimizers),
                               images_per_s=rate, grad_scale=self.scaler.get_scale() if self.scaler.is_enabled()
                               else None, skipped_steps=self.skipped_steps, max_memory_mb=_memory_mb(self.device))

    def _loss_since_log(self) -> float:
        """The loss summed since the last log, over ranks; raises on NaN/inf in fp32 (before any save)."""
        value = all_reduce_sum(self.loss_sum.clone(), self.info).item() / self.info.world_size
        if not math.isfinite(value) and self.tcfg.precision == "fp32":
            last = ckpt.latest_name(self.run_dir)
            advice = (f"--resume continues from the last checkpoint, {last}, written before it" if last else
                      "no checkpoint was written before it: train again (--overwrite)")
            raise TrainingDiverged(f"loss became {value} by step {self.step} in fp32; stopped without saving. "
                                   f"Lower the learning rate; {advice}")
        return value

    # ---- validation and checkpoints -----------------------------------------------------------
    def _validate_and_save(self, stopping: bool) -> None:
        """Scores the classifier on the `eval_every` schedule and checkpoints it on the `save_every`
        one, when a score is the best so far (`best` must name a checkpoint on disk) and at a stop.
        A stop's checkpoint off both schedules is an interrupt checkpoint, never scored and never
        `best`, so a stopped and resumed run selects the same `best` as an uninterrupted one."""
        validating, saving = self._due(self.eval_every), self._due(self.save_every)
        if not (validating or saving or stopping):
            return
        self._loss_since_log()
        accuracy = self.validate() if validating else None
        best = accuracy is not None and accuracy > self.best_val
        if accuracy is not None:
            self.evaluations.append({"step": self.step, "val_accuracy": accuracy, "alpha": self.served_alpha})
        if best:
            self.best_val, self.best_step = accuracy, self.step
        if saving or best or stopping:
            interrupt = not (validating or saving)
            # Without a validation split every scheduled checkpoint is `best`: the last one is used.
            self.save(val_accuracy=accuracy, interrupt=interrupt,
                      best=best or (self.best_step is None and not interrupt))
        if accuracy is not None:
            self.tracker.log_validation(self.step, accuracy=accuracy)

    def validate(self) -> Optional[float]:
        """Validation accuracy of the classifier as the run serves it (`self.served_alpha`); None
        without a validation split. Training's own blend is restored afterwards."""
        if self.data.val is None or not len(self.data.val):
            return None
        with self._serving():
            return evaluate_accuracy(self.classifier, self.data.val, self.tcfg.batch_size, self.device,
                                     self.tcfg.precision, self.info, num_workers=self.cfg.data.num_workers,
                                     budget_gb=self.cfg.data.memory_budget_gb)

    @contextlib.contextmanager
    def _serving(self):
        if self.served_alpha is None:
            yield
            return
        trained, self.classifier.alpha = self.classifier.alpha, self.served_alpha
        try:
            yield
        finally:
            self.classifier.alpha = trained

    def save(self, *, val_accuracy: Optional[float], interrupt: bool, best: bool) -> None:
        """A checkpoint of this step (rank 0 writes it), with the progress that resumes the run."""
        if self.info.is_main:
            progress = {name: getattr(self, name) for name in self.PROGRESS}
            ckpt.save_checkpoint(self.run_dir, self.step, self.classifier, self.optimizers, self.schedulers,
                                 dict(self.meta, val_accuracy=val_accuracy, interrupt=interrupt,
                                      engine_state=progress),
                                 scaler=self.scaler, best=best, keep=self.tcfg.keep_checkpoints)

    def _summary(self, elapsed: float) -> dict:
        if self.best_step is not None:
            served = ("" if self.served_alpha is None else
                      f", scored as load_run and export serve the classifier: at residual alpha {self.served_alpha} "
                      "(method.alpha)")
            reason = (f"highest validation accuracy {self.best_val:.4f} at step {self.best_step} among "
                      f"{len(self.evaluations)} evaluations on the held-out validation split{served}")
        else:
            reason = "no validation split: the last checkpoint is used"
        return {"method": self.cfg.method.name, "steps": self.step, "total_steps": self.total_steps,
                "images_per_s": self.images_seen / max(elapsed, 1e-9), "seconds": elapsed,
                "skipped_steps": self.skipped_steps, "evaluations": self.evaluations,
                "best_checkpoint": f"step-{self.best_step:08d}" if self.best_step is not None else "latest",
                "selection": reason, "selection_alpha": self.served_alpha, "run_dir": str(self.run_dir),
                "gpu_telemetry": self.telemetry.summary() if self.telemetry is not None else None}


def train(cfg: Config, run_dir, data: TrainData, *, clip, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Train `cfg.method` on `data` from `clip = (model, tokenizer)` (see `clip.clip_from_config`);
    returns the summary also written to `RUN_DIR/summary.json`. A run directory that already holds a
    run needs `resume` (continue it) or `overwrite` (replace it); one training at a time holds it."""
    info = init_distributed("cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    device = resolve_device(cfg.train.device, info.local_rank)
    try:
        with RunDirectory(run_dir, resume=resume, overwrite=overwrite, owner=info.is_main) as run:
            trainer = Trainer(cfg, run, data, info=info, device=device, progress=progress)
            trainer.setup(clip, resume=resume)
            return trainer.fit()
    finally:
        shutdown(info)
