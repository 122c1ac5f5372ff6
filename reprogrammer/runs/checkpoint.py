"""Run checkpoints: tensors in safetensors, everything else in JSON; never pickled objects.

    RUN_DIR/checkpoints/step-00001200/
        learned.safetensors     the classifier's learned tensors (what eval and export need)
        training.safetensors    optimiser tensors and RNG states (what resume needs)
        meta.json               config, class names, step, validation result, optimiser/scheduler plain
                                state, and the SHA-256 of each tensor file
    RUN_DIR/checkpoints/latest.json, best.json   pointers to a step directory

A checkpoint directory is written under a temporary name and renamed into place, and the
pointers are replaced atomically, so an interruption at any moment leaves the previous
checkpoint intact. Tensor files are checked against their recorded SHA-256 when loaded; `latest`
falls back to the newest intact step directory when the one it names is damaged.
"""
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from ..files import file_sha256, write_json_atomically

log = logging.getLogger(__name__)

#: 2: meta.json records the SHA-256 of each tensor file.
FORMAT_VERSION = 2
TENSOR_FILES = ("learned.safetensors", "training.safetensors")


class CheckpointError(RuntimeError):
    pass


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


# ---- optimiser / scheduler / RNG state as (tensors, plain data) ----------------------------------
def _split_optimizer(index: int, state_dict: dict) -> tuple[dict, dict]:
    tensors, plain_state = {}, {}
    for param_id, slots in state_dict["state"].items():
        plain_state[str(param_id)] = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{param_id}.{name}"] = value
            else:
                plain_state[str(param_id)][name] = value
    return tensors, {"state": plain_state, "param_groups": state_dict["param_groups"]}


def _join_optimizer(index: int, tensors: dict, plain: dict) -> dict:
    state = {int(pid): dict(slots) for pid, slots in plain["state"].items()}
    prefix = f"optimizer.{index}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": random.getstate()}
    return tensors, plain


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- save / load ---------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, classifier, optimizers, schedulers, meta: dict,
                    scaler=None, best: bool = False, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    training_tensors, rng_plain = _rng_state()
    optimizer_plain = []
    for i, optimizer in enumerate(optimizers):
        tensors, plain = _split_optimizer(i, optimizer.state_dict())
        training_tensors.update(tensors)
        optimizer_plain.append(plain)
    meta = dict(meta, format_version=FORMAT_VERSION, step=step, training={
        "optimizers": optimizer_plain,
        "schedulers": [s.state_dict() for s in schedulers],
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_plain,
    })
    final = root / name
    try:
        for file, tensors in zip(TENSOR_FILES, (classifier.learned_state(), training_tensors)):
            save_file(_contiguous(tensors), str(tmp / file))
        meta["sha256"] = {file: file_sha256(tmp / file) for file in TENSOR_FILES}
        write_json_atomically(tmp / "meta.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_json_atomically(root / "latest.json", {"checkpoint": name, "step": step})
        if best:
            write_json_atomically(root / "best.json", {"checkpoint": name, "step": step,
                                                    "val_accuracy": meta.get("val_accuracy")})
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = _pointer(root, "latest", strict=False)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {name} in {root} ({error}); {kept}. Free disk space "
                              "(or raise the file-size limit) and continue with --resume") from error
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    protected = {_pointer(root, p, strict=False) for p in ("latest", "best")}
    for path in step_directories(root)[:-keep]:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)


def _pointer(root: Path, which: str, strict: bool = True) -> Optional[str]:
    """The step directory `which.json` names; None when there is no pointer (or, not `strict`, a broken one)."""
    path = root / f"{which}.json"
    try:
        name = json.loads(path.read_text())["checkpoint"]
        if not isinstance(name, str) or not name.startswith("step-") or "/" in name:
            raise ValueError(f"{name!r} is not a step directory name")
        return name
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        if not strict:
            return None
        raise CheckpointError(f"{path} is corrupt ({type(error).__name__}: {error}); pick a checkpoint with "
                              "--which latest or --which step-N") from error


def step_directories(root: Path) -> list[Path]:
    """Complete step directories, oldest first (temporaries are named `.step-*`)."""
    return sorted(p for p in Path(root).glob("step-*") if p.is_dir() and "." not in p.name)


def damage(checkpoint: Path) -> Optional[str]:
    """Why `checkpoint` cannot be used (missing or corrupt meta.json, missing or altered tensor file), or None."""
    try:
        meta = read_meta(checkpoint)
        for file in TENSOR_FILES:
            _verify(Path(checkpoint) / file, meta)
    except CheckpointError as error:
        return str(error)
    return None


def find_checkpoint(run_dir, which: str = "latest") -> Path:
    """`which`: `latest`, `best`, or a step directory name.

    `latest` is the newest intact checkpoint: when the one latest.json names is missing or damaged
    (a crash, a full disk, flipped bits), the newest intact step directory, with a warning naming
    what was skipped.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise CheckpointError(f"{run_dir} holds no checkpoints/ directory: is it a run directory written by "
                              "`reprogrammer train --out RUN_DIR`?")
    if which == "latest":
        return _latest(root)
    if which == "best":
        name = _pointer(root, "best")
        if name is None:  # no validation split: the last checkpoint is the run's result
            return _latest(root)
    else:
        name = which
    if "/" in name or not (root / name).is_dir():
        available = ", ".join(p.name for p in step_directories(root)) or "none"
        raise CheckpointError(f"no {which!r} checkpoint in {root} (step directories: {available})")
    return root / name


def _latest(root: Path) -> Path:
    skipped = []
    try:
        name = _pointer(root, "latest")
    except CheckpointError as error:
        name, skipped = None, [str(error)]
    candidates = [root / name] if name is not None else []
    candidates += [p for p in reversed(step_directories(root)) if p.name != name]
    for path in candidates:
        problem = damage(path) if path.is_dir() else f"{path} is missing"
        if problem is None:
            if skipped:
                log.warning("using checkpoint %s; skipped: %s", path, "; ".join(skipped))
            return path
        skipped.append(problem)
    raise CheckpointError(f"no intact checkpoint in {root}" + (f": {'; '.join(skipped)}" if skipped else "")
                          + "; train again with --overwrite")


def latest_name(run_dir) -> Optional[str]:
    """The step directory latest.json names, or None (no checkpoint yet, or a broken pointer)."""
    return _pointer(Path(run_dir) / "checkpoints", "latest", strict=False)


def read_meta(checkpoint: Path) -> dict:
    path = Path(checkpoint) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from error
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} has format version {version}, this toolkit reads {FORMAT_VERSION}")
    return meta


def _verify(path: Path, meta: dict) -> bytes:
    """The bytes of tensor file `path`, checked against the SHA-256 meta.json recorded for it."""
    try:
        content = path.read_bytes()
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from error
    expected = meta.get("sha256", {}).get(path.name)
    if hashlib.sha256(content).hexdigest() != expected:
        raise CheckpointError(f"{path} is corrupt: its SHA-256 differs from the one recorded when it was written "
                              "(damaged on disk or edited); use another checkpoint (--which step-N)")
    return content


def _load_tensors(path: Path, meta: dict) -> dict:
    content = _verify(path, meta)
    try:
        return load(content)
    except SafetensorError as error:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {error}") from error


def load_learned(checkpoint: Path, meta: Optional[dict] = None) -> dict:
    """The learned tensors of `checkpoint`, verified against its meta.json (read unless given)."""
    meta = read_meta(checkpoint) if meta is None else meta
    return _load_tensors(Path(checkpoint) / "learned.safetensors", meta)


def restore_training(checkpoint: Path, meta: dict, optimizers, schedulers, scaler=None) -> None:
    tensors = _load_tensors(Path(checkpoint) / "training.safetensors", meta)
    training = meta["training"]
    if len(training["optimizers"]) != len(optimizers):
        raise CheckpointError(f"checkpoint has {len(training['optimizers'])} optimisers, this run has "
                              f"{len(optimizers)}: it was written by another method")
    for i, optimizer in enumerate(optimizers):
        optimizer.load_state_dict(_join_optimizer(i, tensors, training["optimizers"][i]))
    for scheduler, state in zip(schedulers, training["schedulers"]):
        scheduler.load_state_dict(state)
    if scaler is not None and training["scaler"] is not None:
        scaler.load_state_dict(training["scaler"])
    _set_rng_state(tensors, training["rng"])
