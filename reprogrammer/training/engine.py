"""The training engine: one loop for every method (AMP, torch.compile, DDP, exact resume).

Data arrive as uint8 `[B, 3, H, W]` and reach the classifier as bytes on the device (the
reprogramming ops scale them by 1/255 as they read them). The global
batch `train.batch_size` is split over ranks and gradient-accumulation micro-batches. Every
`save_every` steps (default: each epoch) the validation split is scored and a checkpoint is
written; the best validation accuracy picks the `best` checkpoint. SIGINT/SIGTERM finish the
current step, save, and stop with `TrainingInterrupted`.
"""
import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import Config, ConfigError, to_dict
from ..data.images import base_dataset, first_image_size
from ..data.loaders import eval_loader, make_loader
from ..data.suites import TrainData
from ..files import write_json_atomically
from ..methods import TrainingObjective, build_method
from ..runs import checkpoint as ckpt
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


def train(cfg: Config, run_dir, data: TrainData, *, clip, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Train `cfg.method` on `data` from `clip = (model, tokenizer)` (see `clip.clip_from_config`);
    returns the summary also written to `RUN_DIR/summary.json`. A run directory that already holds a
    run needs `resume` (continue it) or `overwrite` (replace it); one training at a time holds it."""
    run_dir = Path(run_dir)
    tcfg = cfg.train
    info = init_distributed("cuda" if tcfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    device = resolve_device(tcfg.device, info.local_rank)
    try:
        with RunDirectory(run_dir, resume=resume, overwrite=overwrite, owner=info.is_main) as run:
            return _train(cfg, run_dir, data, resume, clip, progress, info, device, run)
    finally:
        shutdown(info)


def _train(cfg, run_dir, data, resume, clip, progress, info, device, run):
    tcfg = cfg.train
    if tcfg.batch_size % (info.world_size * tcfg.grad_accum):
        raise ConfigError(f"train.batch_size={tcfg.batch_size} must be divisible by world size {info.world_size} "
                          f"x train.grad_accum={tcfg.grad_accum}")
    micro_batch = tcfg.batch_size // (info.world_size * tcfg.grad_accum)
    torch.manual_seed(tcfg.seed)
    clip, tokenizer = clip
    classifier = build_method(clip, tokenizer, data.classnames, cfg.method).to(device)
    if not classifier.trainable:
        raise ConfigError(f"method {cfg.method.name!r} has nothing to train; evaluate it directly")

    epochs = tcfg.epochs or classifier.default_epochs
    steps_per_epoch = len(data.train) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set has {len(data.train)} samples, fewer than one batch of "
                          f"{tcfg.batch_size}; lower train.batch_size")
    total_steps = min(epochs * steps_per_epoch, tcfg.max_steps or math.inf)
    optimizers, schedulers = classifier.make_optimizers(total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.precision == "amp_fp16")

    objective = TrainingObjective(classifier)
    if tcfg.compile == "model":
        for tower in classifier.frozen_towers():
            tower.compile()
    if info.enabled:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(objective) if tcfg.compile == "step" else objective

    meta = {"config": to_dict(cfg), "classnames": list(data.classnames), "method": cfg.method.name,
            "model": {"name": cfg.model.name, "pretrained": cfg.model.pretrained},
            "image_resolution": first_image_size(data.train)}
    state = {"step": 0, "best_val": -1.0, "best_step": None, "evaluations": [], "skipped_steps": 0}
    if resume:
        state = _resume(run_dir, classifier, optimizers, schedulers, scaler, meta, state)

    sampler = ResumableSampler(data.train, info, seed=tcfg.seed)
    loader = make_loader(data.train, sampler, micro_batch, device, drop_last=True, num_workers=cfg.data.num_workers,
                         budget_gb=cfg.data.memory_budget_gb, seed=tcfg.seed)
    save_every = tcfg.save_every or steps_per_epoch
    run.start()
    tracker = start_tracking(cfg, run_dir, optimizers, main=info.is_main)
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {cfg.method.name}", unit="step",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    classifier.train()
    start, images_seen = time.perf_counter(), 0
    window = {"start": start, "images": 0, "steps": 0}
    loss_sum = torch.zeros((), device=device)
    telemetry = GpuTelemetry(device.index) if device.type == "cuda" and info.is_main else contextlib.nullcontext()
    with _StopFlag() as stop, telemetry, tracker:
        while state["step"] < total_steps:
            epoch, offset = divmod(state["step"], steps_per_epoch)
            sampler.set_position(epoch, offset * micro_batch * tcfg.grad_accum)
            batches = iter(loader)
            for _ in range(offset, steps_per_epoch):
                if state["step"] >= total_steps:
                    break
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                for micro in range(tcfg.grad_accum):
                    images, labels, skipped = next(batches)
                    if skipped:  # unreadable files: dropped from the batch, counted, fatal past a limit
                        base_dataset(data.train).record_skipped(skipped)
                    images, labels = to_device_images(images, device), labels.to(device, non_blocking=True)
                    sync = contextlib.nullcontext() if micro == tcfg.grad_accum - 1 or not info.enabled \
                        else objective.no_sync()
                    with sync:
                        with autocast(device, tcfg.precision):
                            loss = step_fn(images, labels) / tcfg.grad_accum
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                scale_before = scaler.get_scale() if scaler.is_enabled() else None
                for optimizer in optimizers:
                    scaler.step(optimizer)
                scaler.update()
                if scaler.is_enabled() and scaler.get_scale() < scale_before:
                    state["skipped_steps"] += 1
                for scheduler in schedulers:
                    scheduler.step()
                state["step"] += 1
                images_seen += tcfg.batch_size
                window["images"] += tcfg.batch_size
                window["steps"] += 1
                bar.update(1)

                stopping = _stop_requested(stop, info, device)
                last = state["step"] == total_steps
                if state["step"] % tcfg.log_every == 0 or last or stopping:
                    now = time.perf_counter()
                    mean_loss = _check_loss(loss_sum, window["steps"], state, tcfg, info, run_dir)
                    loss_sum.zero_()
                    rate = window["images"] / max(now - window["start"], 1e-9)
                    window.update(start=now, images=0, steps=0)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
                    tracker.log_train(state["step"], epoch=epoch, loss=mean_loss, lr=learning_rates(optimizers),
                                      images_per_s=rate, grad_scale=scaler.get_scale() if scaler.is_enabled() else None,
                                      skipped_steps=state["skipped_steps"], max_memory_mb=_memory_mb(device))
                scheduled = state["step"] % save_every == 0 or last
                if scheduled or stopping:
                    _check_finite(loss_sum, state, tcfg, info, run_dir)
                    _validate_and_save(classifier, data, cfg, info, device, run_dir, state, meta,
                                       optimizers, schedulers, scaler, interrupt=not scheduled)
                    if state["evaluations"] and state["evaluations"][-1]["step"] == state["step"]:
                        tracker.log_validation(state["step"], accuracy=state["evaluations"][-1]["val_accuracy"])
                if stopping:
                    bar.close()
                    name = signal.Signals(stop.signum).name
                    raise TrainingInterrupted(stop.signum, f"stopped by {name} at step {state['step']}; checkpoint "
                                              f"saved in {run_dir / 'checkpoints'}; continue with --resume")
    bar.close()
    elapsed = time.perf_counter() - start
    summary = _summary(cfg, run_dir, state, total_steps, images_seen, elapsed)
    summary["gpu_telemetry"] = telemetry.summary() if isinstance(telemetry, GpuTelemetry) else None
    if info.is_main:
        write_json_atomically(run_dir / "summary.json", summary)
    return summary


def _stop_requested(stop: _StopFlag, info: DistInfo, device) -> bool:
    if not info.enabled:
        return stop.signum != 0
    flag = torch.tensor([float(stop.signum)], device=device)
    flag = all_reduce_sum(flag, info)
    if flag.item() and not stop.signum:
        stop.signum = signal.SIGTERM
    return bool(flag.item())


def _check_loss(loss_sum, steps, state, tcfg, info, run_dir) -> float:
    """Mean loss over the last `steps` steps (all ranks); a non-finite fp32 loss stops training."""
    value = _check_finite(loss_sum, state, tcfg, info, run_dir)
    return value / max(steps, 1)


def _check_finite(loss_sum, state, tcfg, info, run_dir) -> float:
    """The loss summed since the last log, over ranks; raises on NaN/inf in fp32 (before any save)."""
    value = all_reduce_sum(loss_sum.clone(), info).item() / info.world_size
    if not math.isfinite(value) and tcfg.precision == "fp32":
        last = ckpt.latest_name(run_dir)
        advice = (f"--resume continues from the last checkpoint, {last}, written before it" if last else
                  "no checkpoint was written before it: train again (--overwrite)")
        raise TrainingDiverged(f"loss became {value} by step {state['step']} in fp32; stopped without saving. "
                               f"Lower the learning rate; {advice}")
    return value


def _validate_and_save(classifier, data, cfg, info, device, run_dir, state, meta, optimizers, schedulers, scaler,
                       interrupt=False):
    """A scheduled checkpoint is scored on the validation split and may become `best`; an interrupt
    checkpoint (a stop between scheduled saves) is neither, so a stopped and resumed run selects
    the same `best` as an uninterrupted one."""
    val_accuracy = None
    if not interrupt and data.val is not None and len(data.val):
        val_accuracy = evaluate_accuracy(classifier, data.val, cfg.train.batch_size, device, cfg.train.precision, info,
                                         num_workers=cfg.data.num_workers, budget_gb=cfg.data.memory_budget_gb)
        state["evaluations"].append({"step": state["step"], "val_accuracy": val_accuracy})
    best = val_accuracy is not None and val_accuracy > state["best_val"]
    if best:
        state["best_val"], state["best_step"] = val_accuracy, state["step"]
    if info.is_main:
        ckpt.save_checkpoint(run_dir, state["step"], classifier, optimizers, schedulers,
                             dict(meta, val_accuracy=val_accuracy, interrupt=interrupt, engine_state=state),
                             scaler=scaler, best=best or (state["best_step"] is None and not interrupt),
                             keep=cfg.train.keep_checkpoints)


def _resume(run_dir, classifier, optimizers, schedulers, scaler, meta, state):
    path = ckpt.find_checkpoint(run_dir, "latest")
    saved = ckpt.read_meta(path)
    if saved["method"] != meta["method"] or saved["model"] != meta["model"]:
        raise ckpt.CheckpointError(f"{path} was written by method {saved['method']} on {saved['model']}, "
                                   f"this run is {meta['method']} on {meta['model']}")
    if saved["classnames"] != meta["classnames"]:
        raise ckpt.CheckpointError(f"{path} was trained on other classes; resume needs the same dataset")
    classifier.load_learned_state(ckpt.load_learned(path, saved))
    ckpt.restore_training(path, saved, optimizers, schedulers, scaler)
    log.info("resumed from %s (step %d)", path, saved["step"])
    return dict(saved["engine_state"])


def _summary(cfg, run_dir, state, total_steps, images_seen, elapsed) -> dict:
    if state["best_step"] is not None:
        reason = (f"highest validation accuracy {state['best_val']:.4f} at step {state['best_step']} among "
                  f"{len(state['evaluations'])} evaluations on the held-out validation split")
    else:
        reason = "no validation split: the last checkpoint is used"
    return {"method": cfg.method.name, "steps": state["step"], "total_steps": total_steps,
            "images_per_s": images_seen / max(elapsed, 1e-9), "seconds": elapsed,
            "skipped_steps": state["skipped_steps"], "evaluations": state["evaluations"],
            "best_checkpoint": f"step-{state['best_step']:08d}" if state["best_step"] is not None else "latest",
            "selection": reason, "run_dir": str(run_dir)}
