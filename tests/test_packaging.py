"""The package as users install it: one import name, imports that flow one way, optional extras
that are really optional, and the PyTorch reference path without Triton."""
import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder of each installed package (pyproject.toml's package-dir mapping).
PACKAGE_DIRS = {"reprogrammer": ROOT / "reprogrammer", "reprogrammer.kernels": ROOT / "kernels",
                "reprogrammer.export": ROOT / "export"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "reprogrammer" and parts and parts[0] in ("kernels", "export"):
                continue
            modules[".".join((package, *parts))] = path
    return modules


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package modules `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_module_imports_a_top_level_kernels_export_or_bench():
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            assert not set(tops) & {"kernels", "export", "bench"}, f"{name} imports {tops}"


def test_the_import_graph_has_no_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # Every module implicitly imports its parent packages; a package's __init__ importing one of
    # its own modules is the usual re-export, not a cycle.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


# The floors of the house, lowest first: a module may import its own room and the rooms of lower
# floors only. Rooms on one floor are siblings that do not import each other.
FLOORS = (
    {"base": ("reprogrammer", "reprogrammer.config", "reprogrammer.constants", "reprogrammer.runtime",
              "reprogrammer.files", "reprogrammer.pixels", "reprogrammer.classnames", "reprogrammer.state")},
    {"kernels": ("reprogrammer.kernels",)},
    {"clip": ("reprogrammer.clip",), "towers": ("reprogrammer.towers",), "data": ("reprogrammer.data",),
     "doctor": ("reprogrammer.doctor",)},
    {"text_cache": ("reprogrammer.text_cache",)},
    {"model": ("reprogrammer.model",)},
    {"methods": ("reprogrammer.methods",)},
    {"runs": ("reprogrammer.runs",)},
    {"evaluation": ("reprogrammer.evaluation",), "training": ("reprogrammer.training",)},
    {"export": ("reprogrammer.export",)},
    {"shapeworld": ("reprogrammer.shapeworld",)},
    {"api": ("reprogrammer.api",)},
    {"cli": ("reprogrammer.cli",)},
)


def _room(module: str) -> tuple[int, str]:
    """`(floor, room)` of a module: the room with the longest prefix that holds it."""
    best = None
    for floor, rooms in enumerate(FLOORS):
        for room, prefixes in rooms.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), floor, room)
    assert best is not None, f"{module} is on no floor of FLOORS: add it"
    return best[1], best[2]


def _upward_edges(graph: dict[str, set[str]]) -> list[str]:
    edges = []
    for name, targets in sorted(graph.items()):
        floor, room = _room(name)
        for target in sorted(targets):
            target_floor, target_room = _room(target)
            if target_room != room and target_floor >= floor:
                edges.append(f"{name} ({room}, floor {floor}) imports {target} ({target_room}, floor {target_floor})")
    return edges


def test_every_floor_imports_only_downward():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _upward_edges(graph) == []


def test_the_floor_check_names_an_upward_edge():
    """The check above can fail: the library importing the trainer is named, edge and floors."""
    graph = {"reprogrammer.methods.coop": {"reprogrammer.training.engine"}, "reprogrammer.training.engine": set()}
    assert _upward_edges(graph) == ["reprogrammer.methods.coop (methods, floor 5) imports "
                                    "reprogrammer.training.engine (training, floor 7)"]


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other form a cycle."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    modules = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    assert _imports("p.a", modules["p.a"], modules) == {"p.b"}
    assert _imports("p.b", modules["p.b"], modules) == {"p.a"}


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory) -> tuple[Path, str]:
    """The built wheel and the build's output (pip without -q shows the backend's warnings).
    Built from a copy: setuptools' build/ folder would otherwise stay in the checkout."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("reprogrammer", "kernels", "export"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(out), str(source)], check=True, capture_output=True, text=True)
    return next(out.glob("reprogrammer-*.whl")), build.stdout + build.stderr


@pytest.fixture(scope="module")
def wheel(wheel_build) -> Path:
    return wheel_build[0]


def test_the_wheel_builds_without_warnings(wheel_build):
    _, log = wheel_build
    warnings = [line.strip() for line in log.splitlines() if "Warning" in line]
    assert not warnings, "\n".join(warnings)


def test_the_wheel_installs_one_import_name_with_optional_extras(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"reprogrammer"}
    assert {"reprogrammer/kernels/reprogram_patch_embed.py", "reprogrammer/export/predict.py",
            "reprogrammer/py.typed", "reprogrammer/presets/default.yaml",
            "reprogrammer/model_configs/RP-ViT-Tiny.json",
            "reprogrammer/weights/RP-ViT-Small.safetensors",
            "reprogrammer/weights/RP-ViT-Small.json"} <= set(names)
    assert not any(n.startswith(("bench/", "tests/")) for n in names)
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("onnx", "matplotlib", "scipy", "nvidia-ml-py", "tensorboard")) for r in core)
    assert not any("==" in r.split(";")[0] for r in core), f"exact pins in a library's requirements: {core}"
    assert any(r.startswith("onnxruntime") and 'extra == "export"' in r for r in requires)


# Run in a subprocess on the installed wheel, with the site-packages of this environment minus
# what the user did not install (`hidden`): no editable install, no .pth files.
_REFERENCE_PATH = """
import sys, warnings
import torch
import reprogrammer
from reprogrammer import Reprogrammer, load_clip
warnings.simplefilter("ignore")
torch.manual_seed(0)
clip, tokenizer = load_clip("RP-ViT-Tiny")
model = Reprogrammer(clip, tokenizer, ["cat", "dog", "ship"], up_resolution=20, mr_resolution=11, alpha=0.4)
logits = model(torch.rand(2, 3, 13, 11))
logits.sum().backward()
assert logits.shape == (2, 3) and torch.isfinite(logits).all() and model.image_delta.grad.abs().sum() > 0
assert reprogrammer.__file__.startswith(sys.argv[1]), reprogrammer.__file__
print("triton" in sys.modules)
try:
    import reprogrammer.export
except ImportError as error:
    print("export:", error)
else:
    print("export: ok")
"""


def _run_installed(wheel: Path, tmp_path: Path, hidden: tuple[str, ...]) -> list[str]:
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    site = tmp_path / "site"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.suffix == ".pth" or entry.name.startswith(("__editable__", "reprogrammer")):
            continue
        if entry.name.lower().split("-")[0].split(".")[0] in hidden:
            continue
        (site / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = f"{target}{os.pathsep}{site}"
    result = subprocess.run([sys.executable, "-S", "-c", _REFERENCE_PATH, str(target)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def test_without_triton_or_extras_the_reference_path_runs(wheel, tmp_path):
    hidden = ("triton", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "matplotlib", "scipy", "pynvml",
              "nvidia_ml_py", "tensorboard")
    triton_loaded, export = _run_installed(wheel, tmp_path, hidden)
    assert triton_loaded == "False"
    assert "pip install 'reprogrammer[export]'" in export


def test_the_export_extra_enables_export(wheel, tmp_path):
    _, export = _run_installed(wheel, tmp_path, ("triton",))
    assert export == "export: ok"
