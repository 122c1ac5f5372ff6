"""Run checkpoints: tensors in safetensors, everything else in JSON; never pickled objects.

    RUN_DIR/checkpoints/step-00001200/
        learned.safetensors     the classifier's learned tensors (what eval and export need)
        training.safetensors    optimiser tensors and RNG states (what resume needs)
        meta.json               config, class names, step, validation result, optimiser/scheduler plain state
    RUN_DIR/checkpoints/latest.json, best.json   pointers to a step directory

A checkpoint directory is written under a temporary name and renamed into place, and the
pointers are replaced atomically, so an interruption at any moment leaves the previous
checkpoint intact.
"""
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import write_json_atomically

FORMAT_VERSION = 1


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
    save_file(_contiguous(classifier.learned_state()), str(tmp / "learned.safetensors"))
    save_file(_contiguous(training_tensors), str(tmp / "training.safetensors"))
    write_json_atomically(tmp / "meta.json", meta)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_json_atomically(root / "latest.json", {"checkpoint": name, "step": step})
    if best:
        write_json_atomically(root / "best.json", {"checkpoint": name, "step": step,
                                                "val_accuracy": meta.get("val_accuracy")})
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    protected = {_pointer(root, p) for p in ("latest", "best")}
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and "." not in p.name)
    for path in steps[:-keep]:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)


def _pointer(root: Path, which: str) -> Optional[str]:
    path = root / f"{which}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(f"{path} is corrupt ({error}); delete it to fall back to the step directories") from error


def find_checkpoint(run_dir, which: str = "latest") -> Path:
    """`which`: `latest`, `best`, or a step directory name."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise CheckpointError(f"{run_dir} holds no checkpoints/ directory: is it a run directory written by "
                              "`reprogrammer train --out RUN_DIR`?")
    name = _pointer(root, which) if which in ("latest", "best") else which
    if name is None and which == "best":
        name = _pointer(root, "latest")
    if name is None or not (root / name).is_dir():
        raise CheckpointError(f"no {which!r} checkpoint in {root}")
    return root / name


def read_meta(checkpoint: Path) -> dict:
    path = Path(checkpoint) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')}, this toolkit reads "
                              f"{FORMAT_VERSION}")
    return meta


def _load_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from error
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {error}") from error


def load_learned(checkpoint: Path) -> dict:
    return _load_tensors(Path(checkpoint) / "learned.safetensors")


def restore_training(checkpoint: Path, meta: dict, optimizers, schedulers, scaler=None) -> None:
    tensors = _load_tensors(Path(checkpoint) / "training.safetensors")
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
