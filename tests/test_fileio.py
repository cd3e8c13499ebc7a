"""kvdb.fileio: files and folders appear whole or not at all, and their temporary names say which process wrote
them (what `kvdb doctor` relies on to leave a live write alone)."""

from __future__ import annotations

import os

import pytest

from kvdb.doctor import _TEMP_PID, TEMP_RE
from kvdb.fileio import atomic_dir, atomic_path, atomic_write_bytes


def test_atomic_path_names_its_temp_file_for_the_doctor(tmp_path):
    target = tmp_path / "sub" / "draft_model_epoch5.pth"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        assert TEMP_RE.match(tmp.name) and int(_TEMP_PID.match(tmp.name).group(1)) == os.getpid()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == [target.name]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "index.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == [target.name]


def test_atomic_dir_appears_whole_and_a_first_writer_wins(tmp_path):
    target = tmp_path / "models" / "tiny-abc"
    with atomic_dir(target) as tmp:
        assert TEMP_RE.match(tmp.name) and _TEMP_PID.match(tmp.name)
        (tmp / "config.json").write_text("{}")
        assert not target.exists()
    assert sorted(os.listdir(target)) == ["config.json"]
    with atomic_dir(target) as tmp:  # another writer finishing second: its copy is dropped, the first one kept
        (tmp / "other.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["config.json"] and os.listdir(target.parent) == [target.name]


def test_failed_atomic_dir_leaves_nothing(tmp_path):
    target = tmp_path / "tiny-abc"
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")
    assert os.listdir(tmp_path) == []


def test_doctor_judges_a_temp_folder_whole(tmp_path):
    """An atomic_dir folder a kill left behind (a converted model half written) is one orphan, removed with its files;
    one whose writer is alive is left alone."""
    from kvdb.doctor import Report, _check_temp_files

    models = tmp_path / "models"
    dead = models / f".tiny-abc.{2 ** 22 + 12345}.a1b2c3d4.tmp"  # a pid above any default pid_max
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"half")
    live = models / f".other.{os.getppid()}.a1b2c3d4.tmp"  # the process that started this one: alive
    live.mkdir()
    report = Report()
    _check_temp_files(report, tmp_path, repair=True, min_age_s=0.0)
    assert [(f.status, f.detail) for f in report.findings] == [
        ("repaired", f"removed models/{dead.name}, left by an interrupted write")]
    assert not dead.exists() and live.is_dir()
    again = Report()
    _check_temp_files(again, tmp_path, repair=True, min_age_s=0.0)
    assert [f.status for f in again.findings] == ["ok"] and "1 being written now" in again.findings[0].detail
