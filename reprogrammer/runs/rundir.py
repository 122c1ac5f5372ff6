"""A run directory's guard: one training at a time, and no run replaced without being asked.

The lock is an OS lock (`flock`) on `RUN_DIR/.lock`, so the kernel releases it when its
process ends, however it ends; the file also records the holder's pid, which names the other
training in the refusal and tells a crash's leftover (a dead pid) from a live holder on
filesystems without `flock`. Under the lock, temporaries of interrupted writes are removed.
"""
import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
#: What a training writes into its run directory; `--overwrite` removes exactly these.
RUN_FILES = ("checkpoints", "train_log.jsonl", "summary.json")


class RunDirectoryError(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _recorded_pid(fd: int) -> Optional[int]:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class RunDirectory:
    """`with RunDirectory(path, resume=..., overwrite=...) as run:` holds the run's lock; `run.start()`
    (right before the first write) replaces an old run when `overwrite`. `owner=False` (DDP ranks
    other than 0) does nothing."""

    def __init__(self, path, *, resume: bool = False, overwrite: bool = False, owner: bool = True):
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --resume continues the run, "
                             "--overwrite replaces it")
        self.path, self.resume, self.overwrite, self.owner = Path(path), resume, overwrite, owner
        self._fd: Optional[int] = None
        self._created = False

    def __enter__(self) -> "RunDirectory":
        if not self.owner:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"--out {self.path} is a file, not a run directory; choose another --out")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock()
            existing = self.existing_run()
            if existing and not (self.resume or self.overwrite):
                raise RunDirectoryError(f"{self.path} already holds a training run ({existing}); continue it with "
                                        "--resume, replace it with --overwrite, or choose another --out")
            self._remove_temporaries()
        except BaseException:
            self.__exit__()
            raise
        return self

    def existing_run(self) -> Optional[str]:
        """What shows that a training already used this directory, or None."""
        root = self.path / "checkpoints"
        steps = ckpt.step_directories(root) if root.is_dir() else []
        if steps:
            return f"checkpoints up to {steps[-1].name}"
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        return ", ".join(found) if found else None

    def start(self) -> None:
        """Called once training is about to write: only then is an old run removed (`overwrite`)."""
        if self.owner and self.overwrite:
            for name in RUN_FILES:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def _lock(self) -> None:
        path = self.path / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _recorded_pid(fd)
                os.close(fd)
                raise RunDirectoryError(
                    f"{self.path} is in use by another training (pid {holder or 'unknown'}, lock {path}); wait for "
                    "it to finish or stop it, or choose another --out") from None
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                holder = _recorded_pid(fd)  # no flock here: a live recorded pid is the lock
                if holder not in (None, os.getpid()) and _pid_alive(holder):
                    os.close(fd)
                    raise RunDirectoryError(f"{self.path} is in use by another training (pid {holder}, lock {path}); "
                                            "wait for it to finish or stop it, or choose another --out") from None
            # A releasing process unlinks the file: a lock on an unlinked file guards nothing.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _recorded_pid(fd)
        if previous is not None and previous != os.getpid() and not _pid_alive(previous):
            log.warning("%s: taking over the lock of training pid %d, which ended without releasing it "
                        "(killed or crashed)", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _remove_temporaries(self) -> None:
        """Leftovers of writes interrupted by a kill: `.step-*` checkpoint folders, `.NAME.*.tmp` files."""
        stale = list((self.path / "checkpoints").glob(".step-*")) + list(self.path.glob(".*.tmp")) \
            + list((self.path / "checkpoints").glob(".*.tmp"))
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if stale:
            log.warning("removed %d temporaries of an interrupted write: %s", len(stale),
                        ", ".join(p.name for p in stale))

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
