"""Files written atomically (a reader sees the old file or the whole new one, never a part) and
content hashes."""
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(path, write: Callable[[Path], None]) -> None:
    """`write(temp_path)` beside `path`, fsync, then rename over `path`; the temporary is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(temp))
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_json_atomically(path, data) -> None:
    write_atomically(path, lambda temp: temp.write_text(json.dumps(data, indent=2)))


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
