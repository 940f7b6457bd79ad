"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of either.

Every write goes to a hidden sibling `.{name}.tmp-{pid}-{token}` and is renamed into place. The
temp is made with `open()`/`mkdir()` defaults, so the result's mode follows the umask (and default
ACLs) like any file the user writes; `mkstemp`'s 0600 would hide results from the user's group.
The kernel applies the umask at creation, so it is never read (`os.umask` is a process-wide
set-and-restore that races with other threads).

A process killed mid-write leaves its temp behind; the next write into that directory removes the
temps whose pid is no longer alive. The token starts with a hash of the host name and pid
namespace: a pid means something only there, so on a shared filesystem another machine's
in-progress write is never taken for a leftover (those are removed once untouched for a week).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

FOREIGN_STALE_S = 7 * 24 * 3600  # a temp of another machine untouched this long is abandoned
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)$")
_cleaned: set[str] = set()


def _machine_token() -> str:
    """Who can see our pids: this host and pid namespace (containers with one host name differ)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return hashlib.sha256(f"{socket.gethostname()}|{pid_ns}".encode()).hexdigest()[:6]


_MACHINE = _machine_token()


def _temp_path(target: Path, kind: str = "tmp") -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{_MACHINE}{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: never judge it dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove this package's temps in `directory` left by dead processes; return what was removed.

    A stale `.{name}.old-…` (a killed directory swap: the previous version, moved aside) is moved
    back to `name` when nothing took its place, so a crash never loses the last good copy.
    """
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return []
    root = Path(directory)
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed: list[Path] = []
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        path = root / entry.name
        try:
            if m["token"].startswith(_MACHINE):
                if _pid_alive(int(m["pid"])):
                    continue
            elif time.time() - entry.stat(follow_symlinks=False).st_mtime < FOREIGN_STALE_S:
                continue
            original = root / m["name"]
            if m["kind"] == "old" and not original.exists():
                os.replace(path, original)
                log.warning("restored %s from %s, left by a process killed while replacing it", original, path.name)
                continue
            _remove(path)
            removed.append(path)
        except FileNotFoundError:
            continue  # another process cleaned it first
        except OSError as e:  # cleaning is a courtesy: never fail the write that triggered it
            log.warning("could not remove the stale temp %s: %s", path, e)
    return removed


def _clean_once(directory: Path) -> None:
    """Clean `directory` on this process's first write there (a scan per write would be quadratic)."""
    key = os.path.realpath(directory)
    if key not in _cleaned:
        remove_stale_temps(directory)
        _cleaned.add(key)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to fill a temp sibling of `path`, then rename it onto `path`.

    `write` gets a path (so any library that writes to a path works, e.g.
    `lambda tmp: save_file(table, str(tmp))`); on any exception the temp is removed and `path`
    keeps its old contents. The data is fsynced before the rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(target.parent)
    tmp = _temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaced the file with its own mkstemp must not keep 0600
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write_file`)."""
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `atomic_write_file`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_directory(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to fill a fresh temp sibling directory, then swap it into `target`.

    On any exception the temp is removed and `target` is untouched. An existing `target` is moved
    aside to `.{name}.old-…` for the swap and deleted after it (a kill in between leaves the old
    copy, which the next write restores). Callers decide whether `target` may be replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(target.parent)
    tmp = _temp_path(target)
    os.mkdir(tmp, 0o777)  # the umask applies, as for mkdir
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(tmp, target)
        return target
    old = _temp_path(target, "old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _remove(old)
    except OSError as e:  # the swap is done; a later write removes what is left
        log.warning("could not remove the replaced copy %s: %s", old, e)
    return target
