"""Atomic writes: a file or directory killed mid-write leaves the old version (or nothing), never half of one."""

import os
import subprocess
import sys
import textwrap

import pytest

from forge_core.atomic import atomic_dir, atomic_path, write_json


def test_interrupted_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise KeyboardInterrupt  # Ctrl-C half way through the new version
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left behind


def test_killed_process_leaves_no_directory_at_the_target(tmp_path):
    """SIGKILL (no cleanup code runs) in the middle of writing: the target does not exist, only a hidden temp."""
    script = textwrap.dedent(f"""
        import os, signal
        from forge_core.atomic import atomic_dir
        with atomic_dir({str(tmp_path / 'ckpt')!r}) as tmp:
            (tmp / "weights.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -9
    assert not (tmp_path / "ckpt").exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.") and leftovers[0].endswith(".tmp")


def test_interrupted_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "latest.json"
    write_json(target, {"step": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"step": 2, "dir": "chec')
        raise RuntimeError("killed")
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json"]


def test_a_finished_write_replaces_the_old_version_with_plain_file_modes(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("2")
    assert (target / "w").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the .old copy is gone too
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o777 & ~mask)  # not mkdtemp's 0700


def test_a_cache_dir_built_by_two_processes_at_once_keeps_the_first_and_is_never_missing(tmp_path):
    target = tmp_path / "models" / "m-abc"
    with atomic_dir(target, first_wins=True) as mine:  # this process builds ...
        (mine / "w").write_text("mine")
        with atomic_dir(target, first_wins=True) as theirs:  # ... while another publishes first
            (theirs / "w").write_text("theirs")
        assert (target / "w").read_text() == "theirs"
    assert (target / "w").read_text() == "theirs"  # theirs stayed in place, not swapped out under its readers
    assert sorted(p.name for p in target.parent.iterdir()) == ["m-abc"]  # this build dropped, nothing left over
    with atomic_dir(tmp_path / "new", first_wins=True) as tmp:
        (tmp / "w").write_text("x")
    assert (tmp_path / "new" / "w").read_text() == "x"
