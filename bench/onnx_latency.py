"""CPU latency and throughput of the exported ONNX classifier against PyTorch eager and torch.compile.

All providers run the same Reprogrammer (random weights: speed does not depend on them) on the
same images, on the CPU, and do the same work per call: the exported graph holds the blended text
features as constants, and PyTorch's `Reprogrammer.forward` reads its cached text features (the
first, untimed call encodes them), so each call runs the image passes and the scores only.
Rows give `ms_per_image` and `speedup_vs_onnxruntime-fp32` (> 1: faster than onnxruntime). The default tiny architecture finishes in seconds; pass e.g.
`--model ViT-B-32 --image-resolution 32` for numbers that matter.

    python -m bench.onnx_latency [--model NAME] [--batch-sizes 1 32] [--fp16] [--out-dir bench/results]
"""
import argparse
import functools
import tempfile
import warnings
from pathlib import Path

import torch

from bench.harness import add_speedups, environment_info, markdown_table, time_fn, write_results
from reprogrammer import Reprogrammer, load_clip
from reprogrammer.constants import RESIDUAL_ALPHA
from reprogrammer.export import OnnxClassifier
from reprogrammer.export import metadata as meta
from reprogrammer.export.onnx import export_onnx

CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def build_model(name: str, alpha: float) -> Reprogrammer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are fine for timing
        clip, tokenizer = load_clip(name)
    return Reprogrammer(clip, tokenizer, CLASSNAMES, alpha=alpha).eval()


def _onnxruntime(classifier: OnnxClassifier, images: torch.Tensor, array):
    return classifier(array)


def _torch(module, images: torch.Tensor, array):
    with torch.no_grad():
        return module(images)


def providers(model: Reprogrammer, onnx_paths: dict[str, Path], compile_model: bool) -> dict:
    """`{name: fn(images as a tensor, the same images as an array)}` for each provider."""
    fns = {f"onnxruntime-{precision}": functools.partial(_onnxruntime, OnnxClassifier(path))
           for precision, path in onnx_paths.items()}
    fns["torch"] = functools.partial(_torch, model)
    if compile_model:
        fns["torch.compile"] = functools.partial(_torch, torch.compile(model))
    return fns


def run(model_name: str = "RP-ViT-Tiny", *, image_resolution: int = 16, alpha: float = RESIDUAL_ALPHA,
        batch_sizes=(1, 32), fp16: bool = False, compile_model: bool = True,
        warmup: float = 25, rep: float = 100) -> list[dict]:
    """Rows `{model, batch, provider, ms, p20_ms, p80_ms, ms_per_image, images_per_s, speedup_vs_torch,
    speedup_vs_onnxruntime-fp32}`."""
    model = build_model(model_name, alpha)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        precisions = ("fp32", "fp16") if fp16 else ("fp32",)
        paths = {p: Path(folder) / f"{p}.onnx" for p in precisions}
        for precision, path in paths.items():
            export_onnx(model, path, image_resolution=image_resolution, alpha=alpha, fp16=precision == "fp16",
                        metadata={meta.MODEL_NAME: model_name})
        fns = providers(model, paths, compile_model)
        for batch in batch_sizes:
            images = torch.rand(batch, 3, image_resolution, image_resolution)
            array = images.numpy()
            for name, fn in fns.items():
                fn(images, array)  # first call compiles / allocates outside the timing
                timing = time_fn(lambda: fn(images, array), warmup=warmup, rep=rep, device="cpu")
                rows.append({"model": model_name, "batch": batch, "provider": name, "ms": timing["median_ms"],
                             "p20_ms": timing["p20_ms"], "p80_ms": timing["p80_ms"],
                             "ms_per_image": timing["median_ms"] / batch,
                             "images_per_s": batch / (timing["median_ms"] * 1e-3)})
    return add_speedups(rows, ("batch",), ("torch", "onnxruntime-fp32"))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RP-ViT-Tiny", help="open_clip ViT architecture (default RP-ViT-Tiny)")
    parser.add_argument("--image-resolution", type=int, default=16, help="input side of the exported graph")
    parser.add_argument("--alpha", type=float, default=RESIDUAL_ALPHA,
                        help=f"residual blend (default {RESIDUAL_ALPHA}: Residual Reprogrammer)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--fp16", action="store_true", help="also time the fp16 ONNX export")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow first compile)")
    parser.add_argument("--warmup", type=float, default=25, help="warm-up budget per case, ms")
    parser.add_argument("--rep", type=float, default=100, help="timing budget per case, ms")
    parser.add_argument("--out-dir", help="also write JSON + markdown results here")
    args = parser.parse_args(argv)
    rows = run(args.model, image_resolution=args.image_resolution, alpha=args.alpha,
               batch_sizes=tuple(args.batch_sizes), fp16=args.fp16, compile_model=not args.no_compile,
               warmup=args.warmup, rep=args.rep)
    print(markdown_table(rows))
    if args.out_dir:
        env = environment_info("cpu")
        env["torch_threads"] = torch.get_num_threads()
        write_results(rows, "onnx-latency", args.out_dir, env=env)
    return rows


if __name__ == "__main__":
    main()
