"""Atomic writes: complete file or nothing, normal permissions, no temp files left behind."""
import os

import pytest

from gl_lcm.utils.atomic import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_old_file(tmp_path):
    target = tmp_path / "b.png"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]


def test_stale_temporaries_of_dead_processes_only_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    from gl_lcm.utils.atomic import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace(".", "_")
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / f".img.1.{host}-{dead.pid}.k2j_x9.tmp.png"
    live = tmp_path / f".img.{host}-{os.getpid()}.aa11.tmp.png"  # this process is writing it
    other_host = tmp_path / f".img.otherhost-{dead.pid}.aa11.tmp.png"  # not ours to judge
    user_file = tmp_path / ".notes.tmp.txt"
    for f in (stale, live, other_host, user_file):
        f.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists() and other_host.exists() and user_file.exists()
    with atomic_path(tmp_path / "a.png") as tmp:  # names made here are recognised as this process's
        tmp.write_bytes(b"1")
        assert remove_stale_temporaries(tmp_path) == 0 and tmp.exists()
