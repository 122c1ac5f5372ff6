"""Contrastive pretraining of the toolkit's small CLIP on shape-world image-caption pairs.

CLIP weights cannot be downloaded everywhere, so `pretrained: shapeworld` stands in for a
web-scale checkpoint: a randomly initialised open_clip model is trained with the CLIP objective
(symmetric cross-entropy over the batch) at a scheduled logit scale that ends at 100 on
`shapeworld.pretraining_pairs`. The package ships RP-ViT-Small pretrained this way
(`shipped.py`); other configs and architectures are pretrained once and cached under the user's
cache directory keyed by everything that determines the weights.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from .. import kernels
from ..clip import image_normalisation, load_clip, save_clip
from ..constants import DEFAULT_TEMPLATE
from ..data import shapeworld
from ..files import file_sha256, write_atomically
from ..methods.features import ImageTower, canvas_size, zero_shot_text_features
from ..methods.optim import scheduled

MAX_THREADS = 8  # a model this small stops scaling beyond a few cores


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights and their report (all of it is hashed)."""
    model: str = "RP-ViT-Small"
    #: pairs are rendered at each resolution in equal shares, then resized (bicubic) to the model's
    #: input size, so the encoder has seen images upsampled from the downstream task's resolution.
    resolutions: tuple[int, ...] = (32, 24)
    n_pairs: int = 50_000
    steps: int = 1100
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 60
    weight_decay: float = 0.1
    #: the logit scale the training ends at, not learned: at 100 (= 1 / the MCM temperature 0.01)
    #: the softmax MCM takes over the class prompts is the one the model was trained with, so its
    #: scores are calibrated rather than saturated. It rises from CLIP's initial 1 / 0.07 over the
    #: first half of training: a one-layer model held at 100 from the first step collapsed to
    #: constant features (its loss stuck at log(batch size)).
    logit_scale: float = 100.0
    seed: int = 0
    #: the report's zero-shot evaluation: downstream images at this resolution, this many per set.
    eval_resolution: int = 24
    n_eval: int = 1000

    def __post_init__(self):
        positive = {k: getattr(self, k) for k in ("n_pairs", "steps", "batch_size", "n_eval")}
        bad = {k: v for k, v in positive.items() if v < 1}
        if bad:
            raise ValueError(f"pretraining sizes must be >= 1, got {bad}")
        if not self.resolutions:
            raise ValueError("resolutions is empty: give at least one rendering resolution, e.g. (32,)")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")


def _as_model_input(images: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """uint8 `[N, 3, R, R]` -> normalised float `[N, 3, S, S]`: CLIP's standard preprocessing."""
    x = torch.from_numpy(images).float().div_(255)
    return kernels.reprogram_image(x, x.new_zeros(3, size, size), up_resolution=size, mean=mean, std=std)


def _pixels_at(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic-resize (and clamp) uint8 images to `size`, back to uint8 so the pool stays small."""
    if images.shape[-1] == size:
        return images
    x = _as_model_input(images, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return x.mul_(255).round_().to(torch.uint8).numpy()


def _pretraining_data(cfg: PretrainConfig, size: int) -> tuple[np.ndarray, list[str]]:
    """Pairs in equal shares per resolution (each share its own seed stream), at the input size."""
    shares = np.array_split(np.arange(cfg.n_pairs), len(cfg.resolutions))
    images, captions = [], []
    for i, (resolution, share) in enumerate(zip(cfg.resolutions, shares)):
        pixels, _, text = shapeworld.pretraining_pairs(len(share), cfg.seed * len(cfg.resolutions) + i, resolution)
        images.append(_pixels_at(pixels, size))
        captions += text
    return np.concatenate(images), captions


def _tokenize(captions: list[str], tokenizer, context_length: int) -> torch.Tensor:
    """Token ids `[N, L]`, encoding each distinct caption once; refuses to truncate a caption."""
    unique, inverse = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    # One spare position: it holds a token only for captions that do not fit.
    ids = tokenizer(list(unique), context_length=context_length + 1)
    too_long = (ids[:, -1] != 0).nonzero().flatten()
    if len(too_long):
        raise ValueError(
            f"caption {unique[int(too_long[0])]!r} needs more than the text tower's {context_length} tokens: "
            "raise text_cfg.context_length in the model config"
        )
    return ids[:, :-1][torch.from_numpy(inverse)]


def _parameter_groups(model, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _default_threads() -> int:
    """torch's thread count (one per core unless OMP_NUM_THREADS says otherwise), up to `MAX_THREADS`."""
    return max(1, min(torch.get_num_threads(), MAX_THREADS))


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, classnames, images: np.ndarray, labels: np.ndarray,
                       template: str = DEFAULT_TEMPLATE, batch_size: int = 500) -> float:
    """Top-1 accuracy of `template` prompts on uint8 images under standard CLIP preprocessing."""
    was_training = model.training
    model.eval()
    text = zero_shot_text_features(model, tokenizer, classnames, template)
    tower = ImageTower(model)
    correct = 0
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).float().div_(255)
        predicted = (tower(x) @ text.T).argmax(1).numpy()
        correct += int((predicted == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def evaluate_zero_shot(model, tokenizer, cfg: PretrainConfig) -> dict[str, float]:
    """Zero-shot accuracy on the downstream ID test split ("id") and on every covariate shift."""
    bench = shapeworld.downstream_benchmark(cfg.seed, cfg.eval_resolution, n_train=0, n_val=0,
                                            n_test=cfg.n_eval, n_shift=cfg.n_eval, n_ood=0)
    sets = {"id": bench["test"], **bench["covariate"]}
    return {name: zero_shot_accuracy(model, tokenizer, bench["classnames"], *data) for name, data in sets.items()}


def pretrain_shapeworld(cfg: PretrainConfig = PretrainConfig(), progress: bool = True,
                        threads: Optional[int] = None):
    """Train `cfg.model` from random weights with the CLIP loss; returns `(model, tokenizer, report)`.

    fp32 on the CPU, `threads` threads (default: torch's, up to `MAX_THREADS`; on a loaded machine
    one thread can be many times faster than two that wait on each other).
    Same config and thread count, same weights; the caller's random state is left untouched.
    """
    started = time.perf_counter()
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    threads = threads or _default_threads()
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights are the point here
            model, tokenizer = load_clip(cfg.model)
        model.logit_scale.requires_grad_(False)
        images, captions = _pretraining_data(cfg, canvas_size(model.visual))
        tokens = _tokenize(captions, tokenizer, model.context_length)
        train_started = time.perf_counter()
        losses = _train(model, images, tokens, cfg, progress)
        train_seconds = time.perf_counter() - train_started
        model.eval()
        accuracy = evaluate_zero_shot(model, tokenizer, cfg)
    report = {
        "model": cfg.model,
        "config": dataclasses.asdict(cfg),
        "steps": cfg.steps,
        "threads": threads,
        "seconds": round(time.perf_counter() - started, 2),
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(cfg.steps * cfg.batch_size / train_seconds, 1),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 20):])),  # the last 5 % of steps
        "losses": [round(v, 4) for v in losses],
        "zero_shot_template": DEFAULT_TEMPLATE,
        "zero_shot_accuracy": accuracy,
    }
    return model, tokenizer, report


INITIAL_LOGIT_SCALE = 1 / 0.07  # CLIP's


def logit_scale_at(step: int, cfg: PretrainConfig) -> float:
    """Log-linear from `INITIAL_LOGIT_SCALE` at step 0 to `cfg.logit_scale` at half the steps, then flat."""
    progress = min(1.0, step / max(1, cfg.steps // 2))
    return math.exp(math.log(INITIAL_LOGIT_SCALE) + progress * math.log(cfg.logit_scale / INITIAL_LOGIT_SCALE))


def _train(model, images: np.ndarray, tokens: torch.Tensor, cfg: PretrainConfig, progress: bool) -> list[float]:
    """CLIP's recipe: AdamW (betas 0.9/0.98, eps 1e-6), linear warm-up then cosine decay. Returns
    the loss of every step."""
    size = canvas_size(model.visual)
    mean, std = image_normalisation(model)
    optimizer = torch.optim.AdamW(_parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                  eps=1e-6, fused=True)
    schedule = scheduled(optimizer, cfg.warmup_steps, cfg.steps)
    loss_fn = ClipLoss()
    batches = _batches(len(images), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    losses = []
    model.train()
    with tqdm(total=cfg.steps * cfg.batch_size, unit="img", unit_scale=True, disable=not progress,
              desc=f"pretraining {cfg.model}") as bar:
        for step in range(cfg.steps):
            model.logit_scale.data.fill_(math.log(logit_scale_at(step, cfg)))
            index = next(batches)
            x = _as_model_input(images[index], size, mean, std)
            loss = loss_fn(*model(x, tokens[index]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(len(index))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.logit_scale.data.fill_(math.log(cfg.logit_scale))
    return losses


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless random batches of indices; a pass over the data never repeats an index."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds n_pairs={n}: render more pairs or use smaller batches")
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size].numpy()


# ---------------------------------------------------------------------------------------------
# Cache: `<hash>.safetensors` (weights) + `<hash>.json` (the report, with the weights' sha256).
# The report is written last, so a weights file without one is an interrupted run.
# ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """`$REPROGRAMMER_CACHE`, else `$XDG_CACHE_HOME/reprogrammer`, else `~/.cache/reprogrammer`."""
    if os.environ.get("REPROGRAMMER_CACHE"):
        return Path(os.environ["REPROGRAMMER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reprogrammer"


def _code_fingerprint() -> str:
    """Hash of the data generator's and this trainer's source: changing either changes the weights."""
    digest = hashlib.sha256()
    for source in (shapeworld.__file__, __file__):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def config_hash(cfg: PretrainConfig) -> str:
    """Cache key: the pretraining config, the model's open_clip config and the code fingerprint."""
    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ValueError(f"unknown CLIP architecture {cfg.model!r}; use one of open_clip.list_models()")
    key = {"pretrain": dataclasses.asdict(cfg), "model": model_cfg, "code": _code_fingerprint()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _paths(cfg: PretrainConfig) -> tuple[Path, Path]:
    stem = cache_dir() / config_hash(cfg)
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _default_config(name: str, config: Optional[PretrainConfig]) -> PretrainConfig:
    if config is None:
        return dataclasses.replace(PretrainConfig(), model=name)
    if config.model != name:
        raise ValueError(f"config.model={config.model!r} differs from name={name!r}; pass one model")
    return config


def cached_report(name: str = "RP-ViT-Small", *, config: Optional[PretrainConfig] = None) -> Optional[dict]:
    """The stored report of the cached pretrained model, or None when it is not cached (or unreadable)."""
    _, report_path = _paths(_default_config(name, config))
    try:
        return json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None


def _load_cached(name: str, weights_path: Path, report_path: Path, device):
    """The cached model, or None when there is no complete entry; raises on a corrupt one."""
    if not report_path.exists():
        return None
    report = json.loads(report_path.read_text())
    if report.get("weights_sha256") != file_sha256(weights_path):
        raise ValueError("the weights do not match the checksum in the report")
    return load_clip(name, str(weights_path), device=device)


def load_shapeworld_clip(name: str = "RP-ViT-Small", device="cpu", *, config: Optional[PretrainConfig] = None,
                         progress: bool = True):
    """`(model, tokenizer)` of the shape-world-pretrained `name`, pretraining and caching it on first use.

    A cache entry that does not parse, load or match its checksum is replaced by a fresh
    pretraining run, with a warning.
    """
    cfg = _default_config(name, config)
    weights_path, report_path = _paths(cfg)
    try:
        cached = _load_cached(name, weights_path, report_path, device)
        if cached is not None:
            return cached
    except Exception as error:  # noqa: BLE001 - every unusable entry is rebuilt the same way
        warnings.warn(f"cached pretrained {name} in {report_path.parent} is unusable ({error}); "
                      "pretraining it again", stacklevel=2)
    model, tokenizer, report = pretrain_shapeworld(cfg, progress=progress)

    def write_weights(temp: Path):
        save_clip(model, temp)
        report["weights_sha256"] = file_sha256(temp)

    write_atomically(weights_path, write_weights)
    write_atomically(report_path, lambda temp: temp.write_text(json.dumps(report, indent=1)))
    return model.to(device).eval(), tokenizer
