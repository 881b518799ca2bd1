"""The lock of a training output folder (``.xsurgery/lock``: pid and host), taken atomically.

A run writes its lock complete under a temp name and hard-links it to ``lock``; link(2)
fails when the name exists, so two runs never both hold it and a full disk never leaves an
empty lock. A stale lock (its process is gone, same host) is renamed aside before the new
one is linked: of two runs taking one stale lock over, one rename wins and the other run is
refused with one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from .._util import io as _io
from .._util.text import safe_text
from ..errors import UserError

LOCK = "lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class FolderLock:
    """The lock half of :class:`~xsurgery.train._state.Run` (``folder``, ``private``,
    ``lock_path`` and ``remove_temp_files`` come from it)."""

    folder: str
    private: str
    lock_path: str
    _locked: bool

    def _read_lock(self) -> dict[str, Any] | None:
        try:
            with open(self.lock_path, encoding="utf-8") as f:
                info = json.loads(f.read(4096) or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _check_lock(self, *, force: bool) -> dict[str, Any] | None:
        """None when free; the lock's content when stale (taken over by :meth:`lock`)."""
        info = self._read_lock()
        if info is None:
            return None
        pid, host = info.get("pid"), info.get("host")
        here = socket.gethostname()
        if isinstance(pid, int) and host == here and _alive(pid) and pid != os.getpid():
            raise UserError(f"{self.folder} is being written by another run (process {pid} on {host}, lock "
                            f"{self.lock_path}); wait for it to finish or choose another output")
        if isinstance(pid, int) and host == here:
            return info  # a dead process's lock: stale, safe to take over
        if not force:
            raise UserError(f"{self.folder} is locked by process {pid} on host {host} ({self.lock_path}); "
                            f"if that run is dead, pass --force to take the folder over")
        return info

    @contextlib.contextmanager
    def lock(self, *, force: bool, log: Callable[[str], None] = print) -> Iterator[None]:
        """Hold the folder's lock (pid + host) while the block runs.

        The lock is written complete under a temp name, then hard-linked to ``lock`` (which
        fails if any run holds it: no check-then-write), so a full disk never leaves an empty
        lock. A stale lock is taken over by renaming it aside first: of two runs taking over
        one stale lock, one rename succeeds and the other run is refused."""
        stale = self._check_lock(force=force)
        try:
            os.makedirs(self.private, exist_ok=True)
        except OSError as exc:
            raise _io.os_error(self.private, exc) from exc
        mine = {"pid": os.getpid(), "host": socket.gethostname()}
        tmp = self._lock_draft(mine)
        try:
            if stale is not None:
                log(f"xsurgery: taking over the stale lock of process {safe_text(stale.get('pid'), 40)} on "
                    f"{safe_text(stale.get('host'), 80)}, which is no longer running ({self.lock_path})")
                self._set_aside(stale)
            self._claim(tmp)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._locked = True
        self.remove_temp_files()
        try:
            yield
        finally:
            self._locked = False
            if self._read_lock() == mine:
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_path)
                with contextlib.suppress(OSError):
                    os.rmdir(self.private)  # only when empty: a run that never committed an epoch

    def _lock_draft(self, mine: dict[str, Any]) -> str:
        """The complete lock content in a temp file beside the lock (removed on any failure)."""
        tmp = os.path.join(self.private, f"{_io.TMP_PREFIX}{os.getpid()}-{LOCK}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(mine))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _io.os_error(self.lock_path, exc) from exc
        return tmp

    def _set_aside(self, stale: dict[str, Any]) -> None:
        """Atomically remove the stale lock ``stale``: rename it to a name of ours (only one
        run's rename succeeds); a lock that is no longer ``stale`` is put back."""
        aside = os.path.join(self.private, f"{_io.TMP_PREFIX}{os.getpid()}-{LOCK}-stale")
        try:
            os.rename(self.lock_path, aside)
        except FileNotFoundError:
            raise UserError(f"{self.folder} was taken over by another run just now; choose another output") from None
        except OSError as exc:
            raise _io.os_error(self.lock_path, exc) from exc
        try:
            with open(aside, encoding="utf-8") as f:
                taken = json.loads(f.read(4096) or "{}")
        except (OSError, ValueError):
            taken = {}
        if taken != stale and stale != {}:  # another run's fresh lock: give it back
            with contextlib.suppress(OSError):
                os.link(aside, self.lock_path)
            with contextlib.suppress(OSError):
                os.unlink(aside)
            raise UserError(f"{self.folder} was taken over by another run just now; choose another output")
        with contextlib.suppress(OSError):
            os.unlink(aside)

    def _claim(self, tmp: str) -> None:
        """Make the complete draft ``tmp`` the lock, only if there is none (link(2) is atomic)."""
        try:
            os.link(tmp, self.lock_path)
            return
        except FileExistsError:
            self._check_lock(force=False)  # another run got there first: name it
            raise UserError(f"{self.folder} was locked by another run just now; choose another output") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise _io.os_error(self.lock_path, exc) from exc
        # a file system without hard links: exclusive create, removed again if the write fails
        try:
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise UserError(f"{self.folder} was locked by another run just now; choose another output") from None
        except OSError as exc:
            raise _io.os_error(self.lock_path, exc) from exc
        try:
            with os.fdopen(fd, "w") as f, open(tmp, encoding="utf-8") as src:
                f.write(src.read())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            raise _io.os_error(self.lock_path, exc) from exc

