"""File I/O helpers, one home for each: atomic writes, and a JSON read whose errors name the file.

A file is written to a temp file beside it, fsynced, given the permissions a plain ``open`` would
give (``0666`` less the umask: ``mkstemp`` alone makes it ``0600``, which colleagues on a shared
cluster cannot read) and renamed over the target, then the directory is fsynced. A directory is
built in a temp directory beside it and renamed into place. Killing the writer at any moment
leaves the old target or the new one, plus at worst a temp entry.

Temp names carry the host and pid of their writer, ``.NAME.tmp-HOST-PID-XXXXXXXX``, so the next
write of NAME on that host removes the temp entries of writers that are no longer alive
(a killed export would otherwise leave an empty temp directory behind for ever).

    write_text_atomic(path, text) / write_bytes_atomic(path, data) / write_json_atomic(path, obj)
    with atomic_file(path) as tmp: torch.save(obj, tmp)     # writers that want a file name
    with staged_directory(out_dir) as staging: ...           # a whole directory at once
    read_json(path)      # ValueError "<path>: not valid JSON (...)" / "not UTF-8" / "missing"
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    """The parsed file; ValueError naming it when it is missing, not UTF-8 or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temp file name beside ``path``; when the block succeeds its content replaces ``path``."""
    path = Path(path)
    remove_stale_temps(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """An empty temp directory beside ``output`` that replaces it when the block succeeds and is
    deleted when it fails: a reader never sees a half-written ``output``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=_temp_prefix(output)))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files and directories of ``path`` left by dead writers on this host."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for entry in path.parent.iterdir():
        owner = temp_owner(entry.name)
        if owner is None or owner[0] != path.name or owner[1] != host or _alive(owner[2]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def temp_owner(name: str) -> tuple[str, str, int] | None:
    """(target name, host, pid) of a temp entry named by this module, ``.TARGET.tmp-HOST-PID-XXXXXXXX``;
    None for any other name."""
    head, marker, tail = name.rpartition(".tmp-")
    parts = tail.rsplit("-", 2)  # mkstemp's random part has no "-"; a host name may
    if not marker or not head.startswith(".") or len(parts) != 3 or not parts[1].isdigit():
        return None
    return head[1:], parts[0], int(parts[1])


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename the finished directory ``staging`` onto ``output``; an old ``output`` is moved aside
    first and deleted after, so a crash never leaves a mix of the old and the new files."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        os.replace(staging, output)
        return
    old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
    os.replace(output, old / output.name)
    os.replace(staging, output)
    shutil.rmtree(old)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask

