"""Training-step and evaluation throughput of Reprogrammer pipelines on one model, batch and data.

    python -m bench.train [--quick] [--model ViT-B-32] [--batch 256] [--sweep 64 128 512]
                          [--classes 10 100 1000] [--classes-model ViT-B-32]
                          [--steps 10] [--warmup 3] [--out bench/results]

Training step = forward + backward + optimiser step, for three pipelines:

- `authors`: the public reference code's step: fp32, a PIL round trip per image inside the forward
  pass (tensor -> PIL image -> bicubic resize to U -> tensor), padding and perturbation in eager
  torch, the prompt of every image's class tokenised and encoded (N prompts per batch), the whole
  token-embedding table trained;
- `eager-amp`: `Reprogrammer` and its loss on the reference ops (REPROGRAMMER_BACKEND=torch), eager,
  unique prompts, autocast;
- `ours`: the same with the fused kernels (backend auto) and, on CUDA, the frozen towers compiled
  (on the CPU inductor's code for these towers was no faster than eager, and the fused ops take
  their PyTorch reference path there, so `ours` and `eager-amp` run the same code on the CPU);
- `lower-bound`: exactly the tower calls of `ours`' step and nothing else: the image transformer's
  forward and backward from already-made patch tokens, the text tower's on the batch's unique
  prompts (same compilation as `ours`).

Many classes (`--classes`, default 10 100 1000; at `--classes-batch`, on `--classes-model`, both
defaulting to the main run on CUDA and to ViT-S-32-alt at batch 8 on the CPU, CLIP's 77-token context
and a text tower a little smaller against the image tower than ViT-B/32's): `ours` and its loss on spread subsets of open_clip's ImageNet
class names ("a photo of a {}" is 7 to 18 tokens), the text tower at the prompts' length, against
`full-text`, the same model with the tower at the full context; all of them in one round robin of
their own, each beside `text_ms`, the text tower's forward and backward on the batch's classes
alone, and `text_share`, that time over the step's.

Evaluation (images/s of Residual Reprogrammer at alpha 0.4, `RESIDUAL_ALPHA`, scoring one batch of an evaluation
whose text features are already encoded, as every inference path encodes them once per
evaluation): `naive-two-pass` runs the two image branches as two encoder passes (reprogrammed;
zero-shot from the resized image) and blends in eager torch; `ours` is `Reprogrammer.forward`
(one paired image pass, cached text features, the residual-logits op).

All workloads of a run are timed step by step in turn (round robin), so that a change of load
on a shared machine hits every row alike. Each training row also reports the in-memory loader's
images/s at that batch (`loader_images_per_s`, `data.loaders.ResidentLoader`) and whether the step
would be input-bound on it (`input_bound`: the loader slower than the step).

Ratios are `speedup_vs_<pipeline>` = that pipeline's step time / the row's step time, i.e. the
throughput ratio row / pipeline; for `ours` against `lower-bound` it is the fraction of the
towers' own speed that the whole step reaches. All pipelines see the same images and labels.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from bench.harness import (
    QUANTILES,
    REPO_ROOT,
    add_speedups,
    cpu_threads,
    environment_info,
    markdown_table,
    plot_throughput,
    write_results,
)
from reprogrammer import kernels
from reprogrammer.clip import image_normalisation, load_clip
from reprogrammer.constants import DEFAULT_TEMPLATE, RESIDUAL_ALPHA
from reprogrammer.data import ArrayImageDataset
from reprogrammer.data.loaders import ResidentLoader
from reprogrammer.methods import MethodConfig
from reprogrammer.methods.losses import batch_classes, contrastive_focal_loss
from reprogrammer.methods.reprogramming import ReprogrammerClassifier
from reprogrammer.runtime import autocast, to_device_images
from reprogrammer.towers import encode_patch_tokens
from reprogrammer.methods.optim import reprogrammer_optimizers
from reprogrammer.training.telemetry import GpuTelemetry

CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ALPHA = RESIDUAL_ALPHA
BASELINES = ("authors", "eager-amp", "lower-bound", "naive-two-pass", "full-text")
ROW_ORDER = ("authors", "eager-amp", "naive-two-pass", "full-text", "ours", "lower-bound")


class AuthorsPipeline(nn.Module):
    """The training step of the public reference code, kept to measure against.

    What it does differently from `Reprogrammer` (docs/method.md section 8): each image makes a PIL
    round trip inside the forward pass (uint8 quantisation included), one prompt per image is
    tokenised and encoded (duplicates too), and the whole token-embedding table is trained.
    """

    def __init__(self, clip, tokenizer, classnames, *, up_resolution: int, mr_resolution: int,
                 template: str = DEFAULT_TEMPLATE):
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.clip.token_embedding.weight.requires_grad_(True)
        self.clip.positional_embedding.requires_grad_(True)
        self.tokenizer = tokenizer
        self.prompts = [template.format(c) for c in classnames]
        self.canvas = clip.visual.image_size[0]
        self.up_resolution = up_resolution
        device = clip.visual.conv1.weight.device
        self.register_buffer("mask", kernels.border_mask(self.canvas, mr_resolution, device=device))
        self.image_delta = nn.Parameter(torch.randn(3, self.canvas, self.canvas, device=device))
        mean, std = image_normalisation(clip)
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1))

    def reprogram(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.up_resolution, self.up_resolution)
        upsampled = torch.stack([
            TF.to_tensor(TF.to_pil_image(image.cpu()).resize(size, Image.Resampling.BICUBIC)) for image in images
        ]).to(images.device)
        before = (self.canvas - self.up_resolution) // 2
        after = self.canvas - self.up_resolution - before
        canvas = F.pad(upsampled, (before, after, before, after))
        x = (canvas + kernels.perturbation(self.image_delta, self.mask)).clamp(0, 1)
        return (x - self.mean) / self.std

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(self.clip.encode_image(self.reprogram(images)), dim=-1)
        tokens = self.tokenizer([self.prompts[i] for i in labels.tolist()]).to(images.device)
        text_features = F.normalize(self.clip.encode_text(tokens), dim=-1)
        index = torch.arange(len(labels), device=images.device)
        return contrastive_focal_loss(image_features, text_features, index, self.clip.logit_scale.exp())

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The authors' optimisers (docs/method.md section 3) over their trained tensors."""
        text = [self.clip.token_embedding.weight, self.clip.positional_embedding]
        return [torch.optim.Adam([self.image_delta], lr=5e-3, weight_decay=0.1),
                torch.optim.AdamW(text, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)]


@dataclass
class Setup:
    """What every pipeline shares: the frozen CLIP (kept on the CPU, copied per pipeline), data
    geometry, precision and whether `ours` compiles its towers."""
    model: str
    clip: nn.Module
    tokenizer: Callable
    device: torch.device
    precision: str  # "amp_bf16" or "fp32", for eager-amp and ours
    compile: bool
    image_resolution: int
    up_resolution: int
    mr_resolution: int

    def fresh_clip(self) -> nn.Module:
        return copy.deepcopy(self.clip).to(self.device)

    def reprogrammer(self, compiled: bool) -> ReprogrammerClassifier:
        cfg = MethodConfig(up_resolution=self.up_resolution, mr_resolution=self.mr_resolution)
        model = ReprogrammerClassifier(self.fresh_clip(), self.tokenizer, CLASSNAMES, cfg)
        if compiled:
            for tower in model.frozen_towers():
                tower.compile()
        return model.train()


# A workload turns a batch (images, labels) into a no-argument callable: one step to time.
Workload = Callable[[torch.Tensor, torch.Tensor], Callable[[], object]]


def train_step(loss_fn, optimizers, device: torch.device, precision: str) -> Workload:
    def make(images, labels):
        def step():
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = loss_fn(images, labels)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
        return step
    return make


def lower_bound_step(model: ReprogrammerClassifier, device: torch.device, precision: str) -> Workload:
    """The tower calls of `model.loss` alone: forward + backward from ready patch tokens, and the
    text tower on the batch's unique prompts; no patch embedding, loss or optimiser step."""
    visual = model.clip.visual

    def make(images, labels):
        g = torch.Generator(device=device).manual_seed(len(labels))
        n_patches, width = visual.positional_embedding.shape[0] - 1, visual.conv1.out_channels
        tokens = torch.randn(len(labels), n_patches, width, device=device, generator=g).requires_grad_()
        classes = torch.unique(labels)

        def step():
            tokens.grad = model.token_rows.grad = model.text_positional.grad = None
            with autocast(device, precision):
                total = encode_patch_tokens(visual, tokens).float().sum() + model.encode_text(classes).float().sum()
            total.backward()
        return step
    return make


@contextlib.contextmanager
def evaluating(model: ReprogrammerClassifier, alpha: float):
    """Evaluation mode with blend weight `alpha` for the block; training settings restored after."""
    was_training, previous = model.training, model.alpha
    model.eval()
    model.alpha = alpha
    try:
        yield
    finally:
        model.train(was_training)
        model.alpha = previous


def naive_two_pass(model: ReprogrammerClassifier, tokenizer, device: torch.device,
                   precision: str) -> Workload:
    """Residual Reprogrammer as two encoder passes blended afterwards, in eager torch; both
    branches' text features encoded once, before the evaluation's batches."""
    prompts = tokenizer([model.template.format(c) for c in model.classnames]).to(device)

    def make(images, labels):
        with torch.no_grad(), evaluating(model, 0.0), autocast(device, precision):
            txt_rp = model.encode_text()
            txt_zs = model.clip.encode_text(prompts)

        @torch.no_grad()
        def step():
            with evaluating(model, 0.0), autocast(device, precision):
                img_rp = model.image_features(images)
                resized = kernels.reprogram_image(images, model.zero_canvas, up_resolution=model.canvas,
                                                  mean=model.mean, std=model.std)
                img_zs = model.clip.encode_image(resized)
                return kernels.residual_logits_ref(img_rp, img_zs, txt_rp, txt_zs, alpha=ALPHA,
                                                   logit_scale=model.logit_scale)
        return step
    return make


def residual_forward(model: ReprogrammerClassifier, device: torch.device, precision: str) -> Workload:
    def make(images, labels):
        @torch.no_grad()
        def step():
            with evaluating(model, ALPHA), autocast(device, precision):
                return model(images)
        return step
    return make


def pipelines(setup: Setup) -> dict:
    """`{(task, pipeline): (backend, workload)}` of every row, all built at once so that they are
    timed in one round robin (their three model copies fit any device this runs on)."""
    dev, precision = setup.device, setup.precision
    authors = AuthorsPipeline(setup.fresh_clip(), setup.tokenizer, CLASSNAMES,
                              up_resolution=setup.up_resolution, mr_resolution=setup.mr_resolution)
    eager = setup.reprogrammer(compiled=False)
    ours = setup.reprogrammer(compiled=setup.compile)
    return {
        ("train", "authors"): ("torch", train_step(authors.loss, authors.optimizers(), dev, "fp32")),
        ("train", "eager-amp"): ("torch", train_step(eager.loss, reprogrammer_optimizers(eager), dev, precision)),
        ("eval", "naive-two-pass"): ("torch", naive_two_pass(eager, setup.tokenizer, dev, precision)),
        ("train", "ours"): ("auto", train_step(ours.loss, reprogrammer_optimizers(ours), dev, precision)),
        ("train", "lower-bound"): ("auto", lower_bound_step(ours, dev, precision)),
        ("eval", "ours"): ("auto", residual_forward(ours, dev, precision)),
    }


def many_class_names(count: int) -> list[str]:
    """`count` of open_clip's 1000 ImageNet class names, spread over the list (realistic lengths)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if not 1 <= count <= len(IMAGENET_CLASSNAMES):
        raise ValueError(f"--classes {count}: choose 1 to {len(IMAGENET_CLASSNAMES)} classes")
    picked = IMAGENET_CLASSNAMES[::len(IMAGENET_CLASSNAMES) // count][:count]
    # The list names two pairs of classes alike ("missile", "sunglasses"): one prompt per class needs them apart.
    return [f"{name} {i}" if name in picked[:i] else name for i, name in enumerate(picked)]


def text_tower_step(model: ReprogrammerClassifier, device: torch.device, precision: str) -> Workload:
    """The text tower's part of `model.loss`: forward and backward of the batch's classes' prompts."""
    def make(images, labels):
        classes, _ = batch_classes(labels, len(model.classnames))

        def step():
            model.token_rows.grad = model.text_positional.grad = None
            with autocast(device, precision):
                total = model.encode_text(classes).float().sum()
            total.backward()
        return step
    return make


def many_class_rows(setup: Setup, args, errors: list[str]) -> list[dict]:
    """Rows of the many-class workloads at `--classes-batch`, timed in one round robin of their own:
    per class count, `ours` and `full-text` (the text tower at the full context), each with the
    text tower's time alone and its share of the step."""
    if args.classes_model != setup.model:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: speed does not depend on them
            clip, tokenizer = load_clip(args.classes_model)
        canvas = clip.visual.image_size[0]
        setup = dataclasses.replace(setup, model=args.classes_model, clip=clip, tokenizer=tokenizer,
                                    up_resolution=canvas, mr_resolution=(6 * canvas) // 7)
    batch = args.classes_batch
    images, _ = batch_data(batch, setup)
    clip = setup.fresh_clip()  # frozen: shared by every model here
    cfg = MethodConfig(up_resolution=setup.up_resolution, mr_resolution=setup.mr_resolution)
    steps, lengths = {}, {}
    for count in args.classes:
        labels = torch.randint(0, count, (batch,), generator=torch.Generator().manual_seed(count))
        labels = labels.to(setup.device)
        for pipeline in ("full-text", "ours"):
            model = ReprogrammerClassifier(clip, setup.tokenizer, many_class_names(count), cfg).train()
            if pipeline == "full-text":
                model.text_length = model.prompt_tokens.shape[1]
            lengths[count, pipeline] = model.text_length
            task = f"train {count} classes"
            step = train_step(model.loss, reprogrammer_optimizers(model), setup.device, setup.precision)
            steps[task, pipeline] = ("auto", step(images, labels))
            steps[f"text {count} classes", pipeline] = (
                "auto", text_tower_step(model, setup.device, setup.precision)(images, labels))
    if setup.compile:
        for tower in model.frozen_towers():
            tower.compile()
    timings = measure_round_robin(steps, args.steps, args.warmup, setup.device, errors, batch)
    rows = []
    for count in args.classes:
        for pipeline in ("full-text", "ours"):
            step, text = timings.get((f"train {count} classes", pipeline)), timings.get((f"text {count} classes", pipeline))
            if step is None:
                continue
            rows.append({"task": f"train {count} classes", "pipeline": pipeline, "batch": batch, **step,
                         "images_per_s": batch / (step["step_ms"] * 1e-3), "precision": setup.precision,
                         "compiled": setup.compile, "model": setup.model, "classes": count,
                         "text_length": lengths[count, pipeline],
                         "text_ms": None if text is None else text["step_ms"],
                         "text_share": None if text is None else text["step_ms"] / step["step_ms"]})
            print(f"{rows[-1]['task']:18} {pipeline:10} L={rows[-1]['text_length']:<3} {step['step_ms']:10.2f} ms "
                  f"text {rows[-1]['text_ms'] or float('nan'):9.2f} ms ({rows[-1]['text_share'] or float('nan'):.0%})",
                  flush=True)
    return rows


def measure_round_robin(steps: dict, n_steps: int, warmup: int, device: torch.device,
                        errors: list[str], batch: int) -> dict:
    """`{key: timing}` of `steps` (`key: (backend, fn)`), timed one step of each in turn, in rotating
    order: step time
    quantiles (ms), first-call time (s, compile included) and peak CUDA memory (every model copy
    resident counts). A step that raises is recorded in `errors` and dropped."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def call(key):
        backend, fn = steps[key]
        with kernels.use_backend(backend):
            fn()

    times, first, peak = {}, {}, {}
    for key in list(steps):
        try:
            start = time.perf_counter()
            call(key)
            synchronize()
            first[key], times[key], peak[key] = time.perf_counter() - start, [], 0.0
            for _ in range(warmup):
                call(key)
        except Exception as err:
            _record(errors, f"{key[0]} {key[1]} B={batch}", err)
            del steps[key]
    keys = list(steps)
    for round_ in range(n_steps):
        # Each round starts one workload later, so that no row always follows the same one
        # (a predecessor's leftover cache and allocator state would bias it).
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize()
            start = time.perf_counter()
            call(key)
            synchronize()
            times[key].append((time.perf_counter() - start) * 1e3)
            if device.type == "cuda":
                peak[key] = max(peak[key], torch.cuda.max_memory_allocated(device) / 2**20)
    timings = {}
    for key in steps:
        median, p20, p80 = torch.quantile(torch.tensor(times[key], dtype=torch.float64),
                                          torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        timings[key] = {"step_ms": median, "p20_ms": p20, "p80_ms": p80, "first_step_s": first[key],
                        "peak_mem_mib": peak[key] if device.type == "cuda" else None}
    return timings


def loader_rate(batch: int, setup: Setup, epochs: int = 3) -> float:
    """Images/s of the in-memory loader (uint8 on the device, gathers, conversion to floats) on a
    set of 64 batches of the benchmark's images."""
    side = setup.image_resolution
    g = torch.Generator().manual_seed(batch)
    n = 64 * batch
    images = torch.randint(0, 256, (n, side, side, 3), generator=g, dtype=torch.uint8).numpy()
    dataset = ArrayImageDataset("bench", images, (torch.arange(n) % len(CLASSNAMES)).numpy(), CLASSNAMES)
    order = torch.randperm(n, generator=g).tolist()
    loader = ResidentLoader(dataset, torch.arange(n).numpy(), order, batch, setup.device, drop_last=True)
    best = float("inf")
    for _ in range(epochs):  # the first epoch also builds the resident tensor
        start = time.perf_counter()
        for x, y, _ in loader:
            x = to_device_images(x, setup.device)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        best = min(best, time.perf_counter() - start)
    return n / best


def batch_data(batch: int, setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as a uint8 dataset gives them (k / 255), and labels over all classes."""
    g = torch.Generator().manual_seed(batch)
    side = setup.image_resolution
    images = torch.randint(0, 256, (batch, 3, side, side), generator=g).float().div(255)
    labels = torch.randint(0, len(CLASSNAMES), (batch,), generator=g)
    return images.to(setup.device), labels.to(setup.device)


def run(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes = []
    precision = args.precision
    if precision == "auto":
        precision = "amp_bf16" if device.type == "cuda" else "fp32"
        if device.type == "cpu":
            notes.append("eager-amp and ours run in fp32 on the CPU: bf16 autocast is slower there")
    compile_towers = {"on": True, "off": False, "auto": device.type == "cuda"}[args.compile]
    if not compile_towers:
        notes.append("ours runs without torch.compile (on the CPU inductor's tower code is no faster than "
                     "eager and takes minutes to build; --compile on forces it)")
    if device.type == "cpu":
        notes.append("on the CPU the fused ops take their PyTorch reference path: ours differs from eager-amp "
                     "only by compilation" + ("" if compile_towers else ", which is off, so their ratio "
                                              "shows the measurement noise"))
        notes.append("peak memory is measured on CUDA only")
    for note in notes:
        print(f"note: {note}")

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: speed does not depend on them
        clip, tokenizer = load_clip(args.model)
    canvas = clip.visual.image_size[0]
    setup = Setup(args.model, clip, tokenizer, device, precision, compile_towers, args.image_resolution,
                  args.up_resolution or canvas, args.mr_resolution or (6 * canvas) // 7)
    batches = list(dict.fromkeys([args.batch, *args.sweep]))  # the main batch first
    env = environment_info(device)
    env["torch_threads"] = torch.get_num_threads()
    extra = {"notes": notes, "model": args.model, "canvas": canvas, "image_resolution": setup.image_resolution,
             "up_resolution": setup.up_resolution, "mr_resolution": setup.mr_resolution,
             "precision": precision, "compiled_towers": compile_towers, "alpha": ALPHA,
             "classes": len(CLASSNAMES), "steps": args.steps, "warmup": args.warmup, "main_batch": args.batch,
             "cpu_count": os.cpu_count(), "errors": [], "many_classes": args.classes,
             "classes_model": args.classes_model, "classes_batch": args.classes_batch}
    if hasattr(os, "getloadavg"):
        extra["load_avg_start"] = os.getloadavg()
    rows: list[dict] = []
    with GpuTelemetry() as telemetry:
        for batch_rows in measure_batches(batches, setup, args, extra["errors"]):
            rows += batch_rows
            extra["telemetry"] = telemetry.summary()
            if hasattr(os, "getloadavg"):
                extra["load_avg_end"] = os.getloadavg()
            if rows:
                paths = write(rows, env, extra, args.out)
        if args.classes:
            rows += many_class_rows(setup, args, extra["errors"])
            extra["telemetry"] = telemetry.summary()
            if rows:
                paths = write(rows, env, extra, args.out)
    if not rows:
        raise SystemExit("every pipeline failed: " + "; ".join(extra["errors"]))
    print(f"wrote {paths[0]}, {paths[1]} and {paths[2]}")
    print(short_table(finish(rows), args.batch))
    return 1 if extra["errors"] else 0


def measure_batches(batches, setup: Setup, args, errors: list[str]) -> Iterator[list[dict]]:
    """Rows of every pipeline, a batch size at a time, so that the caller saves as it goes. A
    failing build or measurement (memory, a kernel) is recorded in `errors`, and the run goes on."""
    try:
        workloads = pipelines(setup)
    except Exception as err:
        _record(errors, "building the pipelines", err)
        return
    try:
        for batch in batches:
            images, labels = batch_data(batch, setup)
            loader_images_per_s = loader_rate(batch, setup)
            steps = {key: (backend, workload(images, labels)) for key, (backend, workload) in workloads.items()}
            timings = measure_round_robin(steps, args.steps, args.warmup, setup.device, errors, batch)
            rows = []
            for (task, pipeline), timing in timings.items():
                rows.append({
                    "task": task, "pipeline": pipeline, "batch": batch, **timing,
                    "images_per_s": batch / (timing["step_ms"] * 1e-3),
                    "precision": "fp32" if pipeline == "authors" else setup.precision,
                    "compiled": setup.compile and pipeline in ("ours", "lower-bound") and task == "train",
                    "ops": "fused" if workloads[task, pipeline][0] == "auto" and setup.device.type == "cuda"
                    else "reference",
                })
                if task == "train":
                    rows[-1]["loader_images_per_s"] = loader_images_per_s
                    rows[-1]["input_bound"] = loader_images_per_s < rows[-1]["images_per_s"]
                print(f"{task:5} {pipeline:15} B={batch:<5} {timing['step_ms']:10.2f} ms "
                      f"{rows[-1]['images_per_s']:10.1f} img/s  first step {timing['first_step_s']:.1f} s",
                      flush=True)
            yield rows
    finally:
        del workloads
        gc.collect()
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()


def _record(errors: list[str], what: str, err: Exception) -> None:
    errors.append(f"{what}: {type(err).__name__}: {err}")
    print(f"error: {errors[-1]}", file=sys.stderr)


def finish(rows: list[dict]) -> list[dict]:
    """Rows with their ratio columns, training first, then by batch and pipeline."""
    rows = sorted(rows, key=lambda r: (r["task"] != "train", r["batch"], r["task"], ROW_ORDER.index(r["pipeline"])))
    return add_speedups(rows, ("task", "batch"), BASELINES, provider_key="pipeline", time_key="step_ms")


def write(rows, env, extra, out) -> tuple[Path, Path, Path]:
    json_path, md_path = write_results(finish(rows), "train", out, env=env, extra=extra)
    series = [{**row, "series": f"{row['task']} {row['pipeline']}"} for row in rows]
    plot = plot_throughput(series, "batch", "images_per_s", "series", json_path.with_suffix(".png"),
                           title=f"{extra['model']}: throughput vs batch")
    return json_path, md_path, plot


def short_table(rows: list[dict], batch: int) -> str:
    keys = ("task", "pipeline", "batch", "images_per_s", "step_ms", "peak_mem_mib", "loader_images_per_s",
            "input_bound", "text_share", *(f"speedup_vs_{b}" for b in BASELINES))
    return markdown_table([{k: row.get(k) for k in keys} for row in rows if row["batch"] == batch])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="reprogrammer bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="RP-ViT-Tiny, batches 8 and 4, 2 steps, one thread, no compile "
                        "(seconds on a CPU)")
    parser.add_argument("--model", help="open_clip ViT architecture, random weights (default ViT-B-32 "
                        "on CUDA, RP-ViT-Small on the CPU)")
    parser.add_argument("--batch", type=int, help="main batch size (default 256 on CUDA, 32 on the CPU)")
    parser.add_argument("--sweep", type=int, nargs="*", help="more batch sizes for the throughput-vs-batch "
                        "plot (default 64 128 512 on CUDA, 8 16 64 on the CPU; none: --sweep alone)")
    parser.add_argument("--steps", type=int, help="timed steps per pipeline and batch (default 10; CPU 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first (default 3; CPU 1; quick 0)")
    parser.add_argument("--image-resolution", type=int, help="source image side (default 32; quick 16)")
    parser.add_argument("--up-resolution", type=int, help="U (default: the model's input size)")
    parser.add_argument("--mr-resolution", type=int, help="R, the untouched centre (default 6/7 of the input)")
    parser.add_argument("--precision", choices=["auto", "amp_bf16", "fp32"], default="auto",
                        help="of eager-amp and ours (auto: amp_bf16 on CUDA, fp32 on the CPU); authors: fp32")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="compile ours' frozen towers (auto: on CUDA only)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's; --quick: 1)")
    parser.add_argument("--classes", type=int, nargs="*", help="class counts of the many-class rows, at the "
                        "main batch (default 10 100 1000; quick 10 100; none: --classes alone)")
    parser.add_argument("--classes-model", help="open_clip ViT architecture of the many-class rows, random "
                        "weights (default: --model on CUDA, ViT-S-32-alt on the CPU; quick RP-ViT-Tiny)")
    parser.add_argument("--classes-batch", type=int, help="batch of the many-class rows (default: --batch on "
                        "CUDA, 8 on the CPU)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"),
                        help="folder for the JSON, markdown and plot (default bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = dict(model="RP-ViT-Tiny", batch=8, sweep=[4], steps=2, warmup=0, image_resolution=16,
                        threads=1, classes=[10, 100], classes_model="RP-ViT-Tiny", classes_batch=8)
    elif cuda:
        defaults = dict(model="ViT-B-32", batch=256, sweep=[64, 128, 512], steps=10, warmup=3,
                        image_resolution=32, classes_model=args.model or "ViT-B-32", classes_batch=args.batch or 256)
    else:
        defaults = dict(model="RP-ViT-Small", batch=32, sweep=[8, 16, 64], steps=5, warmup=1,
                        image_resolution=32, classes_model="ViT-S-32-alt", classes_batch=8)
    defaults = {"classes": [10, 100, 1000], **defaults}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = [args.batch, args.classes_batch, *args.sweep, args.steps, args.image_resolution, args.threads or 1]
    if min(sizes) < 1 or args.warmup < 0:
        parser.error("batch sizes, steps, resolution and threads must be positive and warmup >= 0")
    if not all(1 <= count <= 1000 for count in args.classes):
        parser.error(f"--classes {args.classes}: each count must lie in 1..1000 (ImageNet's class names)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cpu_threads(args.threads):
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
