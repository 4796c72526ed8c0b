"""The path layer of workdirs (hwrjax.training.storage) on a local disk, and the stop decision of one process.

Object storage end to end: tests/test_object_storage.py. Two processes: tests/test_multiprocess.py.
"""

import json
import os
import signal

import pytest

from hwrjax.core.errors import ConfigError
from hwrjax.training import config_checks, preemption, storage


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_url("gs://bucket/run") and not storage.is_url("runs/gs:x")
    assert storage.absolute("gs://bucket/run") == "gs://bucket/run"
    assert storage.join("gs://bucket/run", "report", "a.json") == "gs://bucket/run/report/a.json"
    assert storage.absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.absolute("~/x") == os.path.expanduser("~/x")


def test_write_atomic_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "report" / "m.json"
    storage.write_json_atomic(path, {"a": 1})
    storage.write_atomic(path, json.dumps({"b": 2}))
    assert json.loads(storage.read_text(path)) == {"b": 2}
    assert os.listdir(tmp_path / "report") == ["m.json"]

    class Unserializable:
        pass

    with pytest.raises(TypeError):  # a failed write keeps the old file
        storage.write_json_atomic(path, {"c": Unserializable()})
    assert json.loads(storage.read_text(path)) == {"b": 2} and os.listdir(tmp_path / "report") == ["m.json"]


def test_line_log_appends_to_what_is_there(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    log = storage.LineLog(path)
    log.write('{"step": 2}')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'  # flushed per line
    log.close()


def test_check_workdir_names_the_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"workdir .*file/run cannot be written .*pass a --workdir you can write to"):
        config_checks.check_workdir(str(blocker / "run"))
    config_checks.check_workdir(str(tmp_path / "new" / "run"))
    assert os.listdir(tmp_path / "new" / "run") == []  # the write probe is gone


def test_a_lone_process_stops_on_its_own_signal():
    assert preemption.agreed_stop(None) is None
    decision = preemption.agreed_stop(int(signal.SIGTERM))
    assert decision == preemption.StopDecision(int(signal.SIGTERM), 0)
    assert decision.describe() == f"signal {int(signal.SIGTERM)}"
