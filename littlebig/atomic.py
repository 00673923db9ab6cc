"""Writes that leave either the old output or the new one, never a mix.

Every build output (a JSON record, a checkpoint, a picture, a whole model repository) is written into a
temporary sibling and renamed into place, so a refused, failed or killed (``kill -9``) command leaves the
previous output whole. A folder takes its place with one atomic ``renameat2(RENAME_EXCHANGE)`` where the
kernel and file system offer it; elsewhere the old folder is renamed aside first, and a folder found
missing with such a copy beside it is moved back before the next write.

Temporary siblings are hidden (``.NAME.PID.partial``); one left by a killed process is removed by the next
write of the same output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_PARTIAL = ".partial"
_ASIDE = ".replaced"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path, suffix: str) -> Iterator[tuple[Path, int]]:
    """Siblings ``.NAME.PID<suffix>`` of ``path`` and the pid that made each."""
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}."
    for entry in path.parent.iterdir():
        middle = entry.name[len(prefix) : -len(suffix)]
        if entry.name.startswith(prefix) and entry.name.endswith(suffix) and middle.isdigit():
            yield entry, int(middle)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(path: Path) -> None:
    """Undo what a killed writer of ``path`` left: its partial sibling, or the old folder it had set aside."""
    for entry, pid in list(_leftovers(path, _ASIDE)):
        if not _pid_alive(pid):
            if path.exists():
                _remove(entry)
            else:
                os.rename(entry, path)
    for entry, pid in list(_leftovers(path, _PARTIAL)):
        if not _pid_alive(pid):
            _remove(entry)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path, make_dir: bool) -> Iterator[Path]:
    """A temporary sibling of ``path`` (a file path, or an empty folder) that takes ``path``'s place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _sibling(path, _PARTIAL)
    _remove(tmp)
    if make_dir:
        tmp.mkdir()
    try:
        yield tmp
        if make_dir:
            swap_into_place(tmp, path)
        else:
            _fsync(tmp)
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def replacing_file(path: Path) -> contextlib.AbstractContextManager[Path]:
    """A temporary sibling of ``path`` to write; when the block succeeds it is renamed over ``path``."""
    return _replacing(path, make_dir=False)


def write_bytes(path: Path, data: bytes) -> None:
    with replacing_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    with replacing_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, record: Any, **dumps: Any) -> None:
    """``json.dumps(record, indent=2)`` (or ``dumps``' own options) written atomically."""
    write_text(path, json.dumps(record, **({"indent": 2} | dumps)))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"exchanging {a} and {b}: {os.strerror(code)}")


def swap_into_place(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``; the folder that was there is removed afterwards."""
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        _remove(new)  # now the old folder
        return
    aside = _sibling(path, _ASIDE)
    os.rename(path, aside)
    os.rename(new, path)
    _remove(aside)


def replacing_dir(path: Path) -> contextlib.AbstractContextManager[Path]:
    """An empty temporary sibling folder of ``path``; when the block succeeds it takes ``path``'s place."""
    return _replacing(path, make_dir=True)
