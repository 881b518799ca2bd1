"""Writing files safely: the one atomic-write helper of the package, and signal handling.

Every output goes to a temp file in the destination's folder and is renamed onto its name
only once complete, so a reader sees the old file or the new one, never half of one. The
temp file is removed on any error and on SIGINT/SIGTERM/SIGHUP (:func:`signals_raise` turns
those into exceptions so that ``finally`` blocks run); a temp file is named after its
writer's pid, so the orphan of a SIGKILLed writer is removed by the next write of the same
name (:func:`remove_stale_temps`). Operating-system failures a user can
fix (read-only folder, no space left, a folder where a file is wanted) become one-line
:class:`UserError` messages.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import UserError
from .text import safe_text

__all__ = ["check_output", "link_atomic", "os_error", "read_limited", "remove_stale_temps", "replace_from_temp",
           "signals_raise", "temp_beside", "write_atomic", "write_bytes", "write_json", "write_text"]

TMP_PREFIX = ".tmp-"
STALE_AFTER_S = 60.0  # a temp file of a dead process older than this is an orphan

_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose another folder",
    errno.ENOENT: "create the folder first",
    errno.EISDIR: "name a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def os_error(path: str, exc: OSError) -> UserError:
    """A one-line :class:`UserError` for an ``OSError`` met while writing ``path``."""
    what = exc.strerror or type(exc).__name__
    hint = _HINTS.get(exc.errno or 0, "check the path and try again")
    return UserError(f"cannot write {path}: {what}; {hint}")


def check_output(path: str, *, force: bool = False) -> None:
    """Refuse before any work when ``path`` cannot be written: exists without ``force``,
    is a folder or anything but a regular file (a device, FIFO, socket or symlink: even with
    ``force``, since replacing it destroys it), its name is not UTF-8 (it could not be named
    back), or its folder is missing or not writable."""
    path = os.fspath(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"output name {safe_text(path)} is not valid UTF-8; choose a plain name") from None
    if os.path.isdir(path):
        raise UserError(f"{safe_text(path)} is a folder; name the file to write")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise os_error(path, exc) from exc
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UserError(f"{safe_text(path)} exists and is not a regular file (a device, FIFO, socket or link); "
                        f"xsurgery replaces only regular files: choose a new name")
    if st is not None and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: folder {folder} is not writable; choose a folder you can write to")


def read_limited(path: str, max_bytes: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, refused (one line, never blocking) when it is
    missing, not a regular file (a FIFO, device or socket would block or never end) or larger
    than ``max_bytes``."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise UserError(f"cannot read {what} {safe_text(path)}: {exc.strerror or type(exc).__name__}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} {safe_text(path)} is not a regular file (a FIFO, device or folder); give a file")
        if st.st_size > max_bytes:
            raise UserError(f"{what} {safe_text(path)} is larger than {max_bytes} bytes; give a shorter file")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise UserError(f"cannot read {what} {safe_text(path)}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > max_bytes:
        raise UserError(f"{what} {safe_text(path)} is larger than {max_bytes} bytes; give a shorter file")
    return data


def write_atomic(path: str, write: Callable[[str], Any], *, force: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``.

    Args:
        path: the file to produce.
        write: writes the complete content to the path it is given (a temp file in the
            same folder, so the final rename is atomic).
        force: replace an existing ``path``; without it an existing file is refused.

    Raises:
        UserError: ``path`` exists without ``force``, its folder is missing or read-only,
            or the disk is full; the temp file is gone and ``path`` is untouched.
    """
    path = os.fspath(path)
    check_output(path, force=force)
    folder = os.path.dirname(os.path.abspath(path))
    suffix = "-" + os.path.basename(path)[:64]
    remove_stale_temps(folder, suffix)
    with _temp_for(path) as temp:
        fd, temp.name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
        os.close(fd)
        write(temp.name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp.name, 0o666 & ~umask)  # mkstemp makes 0600; an output is as readable as any other file
        if not force and os.path.lexists(path):  # appeared while we wrote: still no silent overwrite
            raise UserError(f"{path} exists; pass --force to overwrite it")
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):  # appeared while we wrote
            raise UserError(f"{safe_text(path)} is not a regular file; xsurgery replaces only regular files")
        os.replace(temp.name, path)
        temp.name = None


class _Temp:
    """The temp file a write owns: ``name`` while it is there to remove, None once renamed."""

    name: str | None = None


@contextlib.contextmanager
def _temp_for(path: str) -> Iterator[_Temp]:
    """The one clean-up of the atomic writes: inside, an ``OSError`` becomes a one-line
    :class:`UserError` about ``path``; on the way out, by any exit, the temp file still
    named is removed."""
    temp = _Temp()
    try:
        yield temp
    except OSError as exc:
        raise os_error(path, exc) from exc
    finally:
        if temp.name is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp.name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(folder: str, suffix: str, *, min_age_s: float = STALE_AFTER_S) -> None:
    """Remove temp files ``.tmp-<pid>-...<suffix>`` left by a killed (SIGKILL) writer: its
    process is gone and the file is older than ``min_age_s`` (a writer on another host
    sharing the folder is not mistaken for a dead one while it writes)."""
    import time

    try:
        entries = os.listdir(folder)
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not (entry.startswith(TMP_PREFIX) and entry.endswith(suffix)):
            continue
        pid = entry[len(TMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        full = os.path.join(folder, entry)
        with contextlib.suppress(OSError):
            if now - os.lstat(full).st_mtime >= min_age_s:
                os.unlink(full)


def write_bytes(path: str, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic`)."""
    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, w, force=force)


def write_text(path: str, text: str, *, force: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"), force=force)


def write_json(path: str, data: Any, *, force: bool = False, indent: int | None = 2) -> None:
    """Write ``data`` as JSON (plus a newline) to ``path`` atomically."""
    sep = None if indent else (",", ":")
    write_text(path, json.dumps(data, indent=indent, separators=sep) + "\n", force=force)


def write_safetensors(path: str, tensors: dict, metadata: dict[str, str] | None = None, *, force: bool = False) -> None:
    """Serialize with safetensors into our own temp file (never its ``save_file``, whose
    partial output would not be ours to clean up)."""
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata=metadata), force=force)


def link_atomic(src: str, path: str) -> None:
    """Make ``path`` the same file as ``src`` (a hard link, a copy where links are not
    supported), replacing ``path`` atomically."""
    import shutil

    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{os.path.basename(path)[:64]}")
    # already the same file (an artifact carried over from epoch to epoch): rename(2) onto a
    # hard link of the same inode does nothing and would leave the temp name behind
    with contextlib.suppress(OSError):
        if os.path.samefile(src, path):
            return
    with _temp_for(path) as temp:
        temp.name = tmp
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, path)
        if not os.path.lexists(tmp):
            temp.name = None


class _Signal(SystemExit):
    """Raised by the handler for SIGTERM/SIGHUP: unwinds (running ``finally``) then exits."""


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Inside, SIGINT raises ``KeyboardInterrupt`` and SIGTERM/SIGHUP raise ``SystemExit``
    (128 + signal number), so every ``finally`` runs and no temp file is left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Signal(128 + signum)

    wanted = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    old = {}
    for s in wanted:
        try:
            old[s] = signal.signal(s, handler)
        except (ValueError, OSError):  # not settable here
            pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def temp_beside(path: str) -> str:
    """An empty temp file beside ``path``, named after our pid (a SIGKILLed writer's orphan is removed later)."""
    folder = os.path.dirname(os.path.abspath(path))
    suffix = "-" + os.path.basename(path)[:64]
    remove_stale_temps(folder, suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    except OSError as exc:
        raise os_error(path, exc) from exc
    os.close(fd)
    return tmp


def replace_from_temp(tmp: str, path: str, force: bool) -> None:
    """``tmp`` on disk, then renamed to ``path`` (refused when ``path`` appeared meanwhile without ``force``)."""
    if not force and os.path.lexists(path):  # appeared while we exported: still no silent overwrite
        raise UserError(f"{path} exists; pass --force to overwrite it")
    with open(tmp, "rb+") as f:  # on disk before the rename, as every other output
        os.fsync(f.fileno())
    os.replace(tmp, path)
