"""The atomic write helpers: modes follow the umask, failures leave nothing, kills are cleaned up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from lightning_anatomy import files
from lightning_anatomy.files import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_file,
    atomic_write_text,
    remove_stale_temps,
)


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped), so no process has it now."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(autouse=True)
def fresh_cleaning():
    """Each test's first write into a directory cleans it, as a new process's would."""
    files._cleaned.clear()
    yield
    files._cleaned.clear()


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _stale(directory, name: str, pid: int, *, kind: str = "tmp", is_dir: bool = False):
    """A temp as a process `pid` on this machine would have left it."""
    path = directory / f".{name}.{kind}-{pid}-{files._MACHINE}0badc0de"
    if is_dir:
        path.mkdir()
        (path / "part").write_text("partial")
    else:
        path.write_bytes(b"partial")
    return path


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_modes_follow_the_umask_like_open_and_mkdir(tmp_path, umask):
    old = os.umask(umask)
    try:
        f = atomic_write_bytes(tmp_path / "a.bin", b"x")
        t = atomic_write_text(tmp_path / "sub" / "b.txt", "é")
        d = atomic_directory(tmp_path / "d", lambda tmp: (tmp / "inner").write_text("y"))
        # a writer that replaces the temp with its own 0600 file still ends as open() would make it
        g = atomic_write_file(tmp_path / "c.bin", lambda tmp: (os.unlink(tmp), os.close(os.open(tmp, os.O_CREAT, 0o600))))
    finally:
        os.umask(old)
    assert _mode(f) == _mode(t) == _mode(g) == 0o666 & ~umask
    assert _mode(d) == 0o777 & ~umask and _mode(d / "inner") == 0o666 & ~umask
    assert f.read_bytes() == b"x" and t.read_text(encoding="utf-8") == "é"


def test_a_failed_write_removes_its_temp_and_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.json", "old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_file(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    seen = []
    atomic_write_file(path, lambda tmp: (seen.append(tmp.name), tmp.write_text("new")))
    assert seen[0].startswith(f".a.json.tmp-{os.getpid()}-{files._MACHINE}") and path.read_text() == "new"


def test_stale_temps_of_dead_pids_go_on_the_next_write_and_live_ones_stay(tmp_path, dead_pid):
    dead_file = _stale(tmp_path, "x", dead_pid)
    dead_dir = _stale(tmp_path, "audit", dead_pid, is_dir=True)
    live = _stale(tmp_path, "y", os.getppid())  # a live process (our parent): its write may be in progress
    foreign = tmp_path / f".z.tmp-{dead_pid}-abc"  # another machine's pid means nothing here
    foreign.write_bytes(b"?")
    unrelated = [tmp_path / ".x.tmp", tmp_path / ".hidden", tmp_path / "x.tmp-1-abc"]
    for p in unrelated:
        p.write_text("mine")
    atomic_write_text(tmp_path / "new.txt", "hi")
    assert not dead_file.exists() and not dead_dir.exists()
    assert live.exists() and foreign.exists() and all(p.exists() for p in unrelated)
    old = os.path.getmtime(foreign) - files.FOREIGN_STALE_S - 60
    os.utime(foreign, (old, old))  # abandoned for over a week: removed too
    assert remove_stale_temps(tmp_path) == [foreign]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_directory_swap_keeps_the_old_contents_when_writing_fails(tmp_path):
    target = atomic_directory(tmp_path / "out", lambda tmp: (tmp / "v").write_text("1"))

    def boom(tmp):
        (tmp / "v").write_text("2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_directory(target, boom)
    assert (target / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    atomic_directory(target, lambda tmp: (tmp / "w").write_text("3"))
    assert [p.name for p in target.iterdir()] == ["w"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_swap_killed_halfway_restores_the_old_copy(tmp_path, dead_pid):
    """Killed after moving `out` aside, before the new one took its place: the old copy comes back."""
    old = _stale(tmp_path, "out", dead_pid, kind="old", is_dir=True)
    assert remove_stale_temps(tmp_path) == []
    assert not old.exists() and (tmp_path / "out" / "part").read_text() == "partial"
    again = _stale(tmp_path, "out", dead_pid, kind="old", is_dir=True)  # `out` exists now: just removed
    assert remove_stale_temps(tmp_path) == [again]


def test_audit_save_cleans_what_a_killed_save_left(tmp_path, dead_pid):
    import pandas as pd

    from lightning_anatomy.audit.result import TABLES, AuditResult

    result = AuditResult(**{name: pd.DataFrame() for name in TABLES}, options={"stat": "max"})  # an empty audit
    killed = _stale(tmp_path, "audit", dead_pid, is_dir=True)
    out = result.save(tmp_path / "audit")
    assert not killed.exists() and (out / "audit.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit"]
