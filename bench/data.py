"""Input-pipeline throughput alone: images/s of each loader path of `reprogrammer.data.loaders`.

    python -m bench.data [--quick] [--images 2048] [--source 160] [--resolution 128] [--batch 256]
                         [--workers N] [--out bench/results]

On fabricated data of the same shape for every path: `resident` (one uint8 tensor on the device),
`mapped` (a memory-mapped `reprogrammer data cache` array read in the main process),
`files-pil` (JPEG files decoded with PIL in persistent workers) and, with CUDA, `files-gpu-decode`
(workers read bytes, nvJPEG decodes each batch on the GPU). Every path ends with the batch on the
device as floats in [0, 1], as the training step receives it. The first epoch (worker start-up,
building the resident tensor) is timed apart from the steady epochs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.harness import REPO_ROOT, environment_info, markdown_table, write_results
from reprogrammer.data import build_dataset
from reprogrammer.data.cache import CachedImageDataset, write_cache
from reprogrammer.data.loaders import FileLoader, default_workers, make_loader
from reprogrammer.runtime import to_device_images


def fabricate(folder: Path, n: int, source: int, seed: int = 0) -> None:
    """`n` JPEG photos-to-be of `source` x about 1.3 `source` pixels in ImageNet layout (10 classes)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (source, int(source * 1.3), 3), dtype=np.uint8)
    for i in range(n):
        wnid_folder = folder / "train" / f"n0{1440764 + i % 10:07d}"
        wnid_folder.mkdir(parents=True, exist_ok=True)
        # Smooth images compress like photos; a per-image shift keeps them distinct.
        Image.fromarray(np.roll(base, i, axis=1)).save(wnid_folder / f"img_{i}.JPEG", quality=90)


def epochs_rate(loader, n_images: int, device: torch.device, epochs: int) -> dict:
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        seen = 0
        for images, labels, _ in loader:
            images = to_device_images(images, device)
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    steady = min(times[1:]) if len(times) > 1 else times[0]
    return {"images": seen, "first_epoch_s": times[0], "epoch_s": steady, "images_per_s": seen / steady}


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imagenet"
        fabricate(root, args.images, args.source)
        files = build_dataset("imagefolder", root / "train", image_resolution=args.resolution)
        write_cache(files, Path(tmp) / "cache", source={"dataset": "imagefolder", "root": str(root), "split": None},
                    num_workers=args.workers, progress=False)
        cache = CachedImageDataset(Path(tmp) / "cache")
        order = range(len(files))
        paths = {
            "resident": lambda: make_loader(cache, order, args.batch, device, drop_last=True),
            "mapped": lambda: make_loader(cache, order, args.batch, device, drop_last=True, budget_gb=0),
            "files-pil": lambda: FileLoader(files, order, args.batch, device, drop_last=True,
                                            num_workers=args.workers),
        }
        if device.type == "cuda":
            paths["files-gpu-decode"] = lambda: FileLoader(files, order, args.batch, device, drop_last=True,
                                                           num_workers=args.workers, decode_on=device)
        for name, make in paths.items():
            rate = epochs_rate(make(), len(files), device, args.epochs)
            rows.append({"path": name, "batch": args.batch, "source_px": args.source, "resolution": args.resolution,
                         "workers": args.workers if name.startswith("files") else 0, **rate})
            print(f"{name:17} {rate['images_per_s']:10.0f} img/s  (first epoch {rate['first_epoch_s']:.2f} s)",
                  flush=True)
    env = environment_info(device)
    json_path, md_path = write_results(rows, "data", args.out, env=env,
                                       extra={"images": args.images, "cpu_count": os.cpu_count(),
                                              "epochs": args.epochs})
    print(markdown_table(rows))
    print(f"wrote {json_path} and {md_path}")
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="reprogrammer bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 small images, 2 workers (seconds)")
    parser.add_argument("--images", type=int, help="fabricated JPEGs (default 2048)")
    parser.add_argument("--source", type=int, help="their shorter side (default 160)")
    parser.add_argument("--resolution", type=int, help="intermediate resolution (default 128)")
    parser.add_argument("--batch", type=int, help="batch size (default 256)")
    parser.add_argument("--workers", type=int, help="file-reading workers (default: one per core)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per path; the first is reported apart")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    defaults = dict(images=64, source=40, resolution=32, batch=16, workers=2) if args.quick else \
        dict(images=2048, source=160, resolution=128, batch=256, workers=default_workers())
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.images, args.source, args.resolution, args.batch, args.epochs) < 1 or args.workers < 0:
        parser.error("sizes and epochs must be positive, workers >= 0")
    if args.batch > args.images:
        parser.error(f"--batch {args.batch} exceeds --images {args.images}")
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
