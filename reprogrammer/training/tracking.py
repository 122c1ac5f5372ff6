"""Experiment tracking: what a training run reports while it runs, where `train.report_to` says.

Per logged step: the mean loss since the last log, the learning rate of every optimiser parameter
group by name (`lr/image_delta`, `lr/text`, ...), throughput in images/s, the AMP grad scale,
skipped steps and peak device memory. Per evaluation: the validation accuracy. Writers:

- `jsonl` (default): `train_log.jsonl` and `val_log.jsonl`, one JSON object a line;
- `csv`: `train_log.csv` and `val_log.csv`, the same values under a header fixed when the run
  starts (a resumed run appends under the same header);
- `tensorboard`: event files in `tensorboard/` with tags `train/loss`, `lr/<group>`,
  `train/images_per_s`, `val/accuracy`, ... (needs the `tracking` extra).

The run directory also receives `config.yaml`, the resolved config, which `load_config` reads back.
"""
import csv
import json
from pathlib import Path
from typing import Optional

from ..config import Config, to_yaml
from ..files import write_atomically

#: The values of a training log record, in CSV column order; `lr` expands to one column a group.
TRAIN_FIELDS = ("epoch", "loss", "lr", "images_per_s", "grad_scale", "skipped_steps", "max_memory_mb")
VAL_FIELDS = ("accuracy",)


def group_names(optimizers) -> list[str]:
    """The `name` of every parameter group, in order (`group<i>` for an unnamed one)."""
    names = [group.get("name", f"group{i}")
             for i, group in enumerate(g for optimizer in optimizers for g in optimizer.param_groups)]
    if len(set(names)) != len(names):
        raise ValueError(f"optimiser parameter groups need distinct names for tracking, got {names}")
    return names


def learning_rates(optimizers) -> dict[str, float]:
    """`{group name: current learning rate}` over all optimisers."""
    return dict(zip(group_names(optimizers), (g["lr"] for o in optimizers for g in o.param_groups)))


def _flatten(record: dict) -> dict:
    """`{"lr": {"text": x}}` -> `{"lr/text": x}`: the column and tag names of nested values."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update((f"{key}/{name}", inner) for name, inner in value.items())
        else:
            flat[key] = value
    return flat


class _Jsonl:
    def __init__(self, path: Path):
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _Csv:
    def __init__(self, path: Path, columns: list[str]):
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as existing:
                header = next(csv.reader(existing), [])
            if header != columns:
                raise ValueError(f"{path} has the columns {header}, this run logs {columns}; move the file "
                                 "away or train into a new run directory")
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=columns, extrasaction="raise")
        if not self.file.tell():
            self.writer.writeheader()

    def write(self, record: dict) -> None:
        self.writer.writerow({k: "" if v is None else v for k, v in _flatten(record).items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _TensorBoard:
    """Scalars `<section>/<name>`, nested values under their own group (`lr/text`)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise RuntimeError("train.report_to includes tensorboard, which is not installed: "
                               "pip install 'reprogrammer[tracking]' (or drop tensorboard from "
                               f"train.report_to): {error}") from error
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, section: str, record: dict) -> None:
        step = record["step"]
        for key, value in _flatten({k: v for k, v in record.items() if k != "step"}).items():
            if value is not None:
                self.writer.add_scalar(key if "/" in key else f"{section}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Tracker:
    """The writers `report_to` names for one run, each file opened for appending; a context
    manager that closes them. `lr_names` fixes the learning-rate columns."""

    def __init__(self, run_dir, report_to, lr_names: list[str]):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.lr_names = list(lr_names)
        columns = {"train": ["step", *self._columns(TRAIN_FIELDS)], "val": ["step", *VAL_FIELDS]}
        self._files = []
        self._tensorboard: Optional[_TensorBoard] = None
        try:
            for kind in dict.fromkeys(report_to):
                if kind == "tensorboard":
                    self._tensorboard = _TensorBoard(run_dir / "tensorboard")
                    continue
                for section, cols in columns.items():
                    path = run_dir / f"{section}_log.{kind}"
                    self._files.append((section, _Jsonl(path) if kind == "jsonl" else _Csv(path, cols)))
        except BaseException:
            self.close()
            raise

    def _columns(self, fields) -> list[str]:
        return [column for field in fields
                for column in ([f"lr/{name}" for name in self.lr_names] if field == "lr" else [field])]

    def log_train(self, step: int, **values) -> None:
        """One training record; `values` are exactly `TRAIN_FIELDS`, `lr` a dict by group name."""
        if set(values) != set(TRAIN_FIELDS) or list(values["lr"]) != self.lr_names:
            raise ValueError(f"a training record holds {TRAIN_FIELDS} with lr for {self.lr_names}, "
                             f"got {sorted(values)} with lr for {list(values.get('lr', {}))}")
        self._write("train", {"step": step, **{field: values[field] for field in TRAIN_FIELDS}})

    def log_validation(self, step: int, **values) -> None:
        """The validation metrics of the evaluation at `step`; `values` are exactly `VAL_FIELDS`."""
        if set(values) != set(VAL_FIELDS):
            raise ValueError(f"a validation record holds {VAL_FIELDS}, got {sorted(values)}")
        self._write("val", {"step": step, **{field: values[field] for field in VAL_FIELDS}})

    def _write(self, section: str, record: dict) -> None:
        for writes_section, writer in self._files:
            if writes_section == section:
                writer.write(record)
        if self._tensorboard is not None:
            self._tensorboard.write(section, record)

    def close(self) -> None:
        for _, writer in self._files:
            writer.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._files, self._tensorboard = [], None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_tracking(cfg: Config, run_dir, optimizers, *, main: bool = True) -> Tracker:
    """Write the resolved `config.yaml` into `run_dir` and open the writers of `cfg.train.report_to`;
    on a non-`main` rank, a tracker that writes nothing."""
    if not main:
        return Tracker(run_dir, (), group_names(optimizers))
    write_atomically(Path(run_dir) / "config.yaml", lambda temp: temp.write_text(to_yaml(cfg)))
    return Tracker(run_dir, cfg.train.report_to, group_names(optimizers))
