"""`reprogrammer` command line: train, eval, export, predict, config, demo, pretrain, data, bench."""
import argparse
import logging
import signal
import sys
import warnings

#: `reprogrammer bench NAME`: the script of the checkout's bench/ folder each name runs.
BENCHMARKS = {"kernels": "kernels", "train": "train", "data": "data", "compile": "compile_report",
              "onnx_latency": "onnx_latency"}


def _train(args) -> int:
    from .api import train
    from .training.engine import TrainingInterrupted

    try:
        summary = train(args.config, args.out, overrides=args.set, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        print(f"reprogrammer: {stop}", file=sys.stderr)
        return stop.exit_code
    print(f"trained {summary['steps']} steps at {summary['images_per_s']:.0f} images/s; "
          f"best checkpoint {summary['best_checkpoint']}: {summary['selection']}")
    return 0


def _eval(args) -> int:
    from .api import evaluate

    evaluate(args.checkpoint, args.out, which=args.which, config=args.config, overrides=args.set,
             progress=not args.quiet)
    return 0


def _export(args) -> int:
    from .api import export_run

    report = export_run(args.checkpoint, args.out, which=args.which, alpha=args.alpha, fp16=args.fp16,
                        opset=args.opset, exporter=args.exporter, calibration_samples=args.calibration_samples,
                        overrides=args.set)
    print(f"wrote {report['path']} ({report['exporter']} exporter): max |difference| against PyTorch "
          f"{report['max_abs_diff']}, OOD threshold {report['ood_threshold']}")
    return 0


def _predict(args) -> int:
    from .export import predict_main

    return predict_main(["--onnx", args.onnx, *args.images, "--batch-size", str(args.batch_size),
                         "--providers", args.providers])


def _config_show(args) -> int:
    from .config import load_config, to_yaml

    print(to_yaml(load_config(args.name, tuple(args.set))), end="")
    return 0


def _config_list(args) -> int:
    from .config import list_presets

    presets = list_presets()
    width = max(map(len, presets))
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _demo(args) -> int:
    from .shapeworld.demo import run_demo

    run_demo(args.out, quick=args.quick, seeds=args.seeds)
    return 0


def _interrupt_on_sigterm(*_):
    raise KeyboardInterrupt


def _pretrain(args) -> int:
    from .shapeworld.shipped import run_pretrain

    # Pretraining keeps no checkpoints (minutes of work on the built-in models): a stop by Ctrl-C
    # or SIGTERM ends it with one line that says so, and writes nothing.
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        record = run_pretrain(args.out, model=args.model, overrides=args.set, threads=args.threads)
    except KeyboardInterrupt:
        print(f"reprogrammer pretrain: stopped; nothing was written to {args.out} and nothing can be resumed "
              "(pretraining keeps no checkpoints): run the same command again to start over", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {args.out}/{args.model}.safetensors (SHA-256 {record['weights_sha256']}); zero-shot accuracy "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in record["zero_shot_accuracy"].items()))
    if record.get("shipped_sha256") == record["weights_sha256"]:
        print("bit for bit the shipped weights")
    return 0


def _data_cache(args) -> int:
    from .api import cache_data

    meta = cache_data(args.config, args.out, overrides=args.set, split=args.split, progress=not args.quiet)
    print(f"wrote {meta['rows']} images of {meta['image_resolution']} px to {args.out} "
          f"({len(meta['skipped'])} unreadable skipped); train from it with --set data.cache={args.out}")
    return 0


def _bench(args) -> int:
    from .api import run_benchmark

    return run_benchmark(BENCHMARKS[args.what], args.rest)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows each option's default, except where there is none to show or the help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def _doctor(args) -> int:
    import torch

    from .doctor import Report, describe, run_checks, versions

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(Report(describe(device), versions()).header(), flush=True)
    rows = []
    try:
        report = run_checks(device, precisions=args.precision, quick=args.quick,
                            on_row=lambda row: (rows.append(row), print(Report.line(row), flush=True)))
    except KeyboardInterrupt:  # a time limit's SIGINT: say how far it got
        partial = Report("", {}, rows)
        print(f"\ninterrupted: {partial.summary()} so far")
        return 130
    print(f"\n{report.summary()}")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="reprogrammer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a method from a config (YAML file or preset name)")
    train.add_argument("--config", default="default", help="YAML file or preset: default, cifar10, imagenet")
    train.add_argument("--out", required=True, help="run directory (checkpoints, logs, summary)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="ID accuracy, OOD generalisation and OOD detection of a trained run")
    ev.add_argument("--checkpoint", required=True, help="run directory")
    ev.add_argument("--which", default="best", help="best, latest or step-N")
    ev.add_argument("--config", help="YAML with eval/data sections replacing the run's evaluation sets")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the run's eval/data sections (e.g. data.root=PATH)")
    ev.add_argument("--out", required=True, help="folder for report.json, report.md and plots")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)

    ex = sub.add_parser("export", help="export a trained Reprogrammer to ONNX (verified with onnxruntime)")
    ex.add_argument("--checkpoint", required=True, help="run directory")
    ex.add_argument("--which", default="best", help="best, latest or step-N")
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.add_argument("--alpha", type=float, help="Residual Reprogrammer blend (default: the run's)")
    ex.add_argument("--fp16", action="store_true",
                    help="float16 image tower for GPU serving (float32 inputs and outputs), verified against "
                         "PyTorch within twice PyTorch's own fp16 error")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (the dynamo exporter needs >= 18)")
    ex.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                    help="auto: torch.export-based (dynamo) where onnxscript is installed and opset >= 18, "
                         "else the TorchScript tracer (legacy)")
    ex.add_argument("--calibration-samples", type=int, default=2000,
                    help="validation images used to set the OOD threshold at 95%% TPR (0: no threshold)")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="the run's dataset paths for calibration (e.g. data.root=PATH)")
    ex.set_defaults(func=_export)

    pr = sub.add_parser("predict", help="classify image files with an exported ONNX model (onnxruntime only)")
    pr.add_argument("--onnx", required=True, help="a model written by `reprogrammer export`")
    pr.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call")
    pr.add_argument("--providers", default="auto",
                    help="onnxruntime execution providers, comma-separated (default auto: TensorRT/CUDA where "
                         "the installed onnxruntime has them, else CPU)")
    pr.add_argument("images", nargs="+", help="PNG/JPEG files or folders")
    pr.set_defaults(func=_predict)

    config = sub.add_parser("config", help="print a resolved config, or list the presets")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="the resolved config (a preset or YAML file plus --set) as YAML")
    show.add_argument("name", nargs="?", default="default", help="YAML file or preset (default: default)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    show.set_defaults(func=_config_show)
    config_sub.add_parser("list", help="the presets, one line each").set_defaults(func=_config_list)

    demo = sub.add_parser("demo", help="the built-in default: the paper's comparison on the shape world, offline")
    demo.add_argument("--out", default="runs/demo", help="folder for report.md, report.json, plots and runs")
    demo.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    demo.add_argument("--seeds", type=int, default=1, help="replicates with seeds 1..N, reported as mean and spread")
    demo.set_defaults(func=_demo)

    pt = sub.add_parser("pretrain", help="pretrain the built-in shape-world CLIP (by default: reproduce the shipped "
                                         "weights and check their hash)")
    pt.add_argument("--out", required=True, help="folder for MODEL.safetensors (fp16) and MODEL.json")
    pt.add_argument("--model", default="RP-ViT-Small", help="built-in architecture")
    pt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the pretraining config (e.g. steps=20000); the hash is then not checked")
    pt.add_argument("--threads", type=int, help="CPU threads (default: the shipped run's; the bits depend on it)")
    pt.set_defaults(func=_pretrain)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    cache = data_sub.add_parser("cache", help="decode a dataset once into a memory-mapped uint8 array at "
                                "data.image_resolution, which training reads with data.cache=OUT")
    cache.add_argument("--config", default="default", help="YAML file or preset naming data.dataset, root, resolution")
    cache.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    cache.add_argument("--split", help="dataset split (default: train)")
    cache.add_argument("--out", required=True, help="cache folder to write")
    cache.add_argument("--quiet", action="store_true", help="no progress bar")
    cache.set_defaults(func=_data_cache)

    bench = sub.add_parser("bench", help="benchmarks of the source checkout: kernels, train, data, compile (offline "
                                          "sm_90a report) or onnx_latency (the exported model on the CPU)")
    bench.add_argument("what", choices=list(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see --help after it)")
    bench.set_defaults(func=_bench)

    doctor = sub.add_parser("doctor", help="check every fused op against its PyTorch reference on this device "
                                           "(exit code 1 if one disagrees)")
    doctor.add_argument("--device", help="torch device (default: cuda where available, else cpu; on the CPU "
                                         "the kernels run with TRITON_INTERPRET=1, else the reference alone)")
    doctor.add_argument("--precision", nargs="+", choices=["fp32", "tf32", "bf16", "fp16"],
                        help="default: all the device runs (the CPU: fp32)")
    doctor.add_argument("--quick", action="store_true", help="one shape per op (what training checks at its start)")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module="open_clip")
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as error:
        if args.verbose:
            raise
        print(f"reprogrammer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
