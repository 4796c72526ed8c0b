"""The one atomic writer (hwrjax.training.storage, local files): the old file survives a write that fails midway, no
temporary file is ever left behind, and bytes, text and JSON come out as written."""

import json
import os
import stat

import pytest

from hwrjax.core.errors import HwrjaxError
from hwrjax.training import storage


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_bytes_text_and_json_are_written_whole(tmp_path):
    target = tmp_path / "sub" / "out"
    assert storage.write_atomic(str(target), b"\x00\xffbytes") == str(target)  # the folder is created
    assert target.read_bytes() == b"\x00\xffbytes"
    storage.write_atomic(str(target), "tëxt\n")
    assert target.read_bytes() == "tëxt\n".encode("utf-8")
    storage.write_json_atomic(str(target), {"a": [1, 2.5], "b": None})
    assert json.loads(target.read_text()) == {"a": [1, 2.5], "b": None}
    assert target.read_text() == json.dumps({"a": [1, 2.5], "b": None}, indent=2)
    assert _listing(tmp_path / "sub") == ["out"]
    # The permissions a plain open gives (not a private temporary file's 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask


def test_a_write_failing_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.atomic_file(str(target)) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and _listing(tmp_path) == ["report.json"]
    with pytest.raises(TypeError):  # not JSON: fails before anything is written
        storage.write_json_atomic(str(target), {"x": object()})
    assert target.read_text() == "old" and _listing(tmp_path) == ["report.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failing_flush_or_rename_leaves_the_old_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, failing, fail)
    with pytest.raises(OSError, match="No space"):
        storage.write_atomic(str(target), "new" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old" and _listing(tmp_path) == ["metrics.jsonl"]


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(KeyboardInterrupt):
        with storage.atomic_file(str(target)) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []
    with pytest.raises(ValueError, match="mode"):
        with storage.atomic_file(str(target), "a"):
            pass
    assert _listing(tmp_path) == []


def test_check_new_output(tmp_path):
    class MyError(HwrjaxError):
        pass

    new = storage.check_new_output(str(tmp_path / "a" / "b" / "model"), "--output", MyError)
    assert new == str(tmp_path / "a" / "b" / "model") and os.path.isdir(tmp_path / "a" / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MyError, match="already exists; pass a new --output"):
        storage.check_new_output(str(tmp_path / "file"), "--output", MyError)
    with pytest.raises(MyError, match="exists and is not a folder"):
        storage.check_new_output(str(tmp_path / "file"), "--output-workdir", MyError, folder_ok=True)
    (tmp_path / "empty").mkdir()
    assert storage.check_new_output(str(tmp_path / "empty"), "--output-workdir", folder_ok=True)
    with pytest.raises(MyError, match="not empty"):
        storage.check_new_output(str(tmp_path), "--output-workdir", MyError, folder_ok=True)
    with pytest.raises(MyError, match="cannot create"):
        storage.check_new_output(str(tmp_path / "file" / "below" / "m"), "--output", MyError)
