"""CONTRACT.md section 8 *rev 3*: the audit file is 0600 in a 0700 directory unless AUDIT_FILE_MODE
says otherwise (a log shipper in the file's group), and the metrics archive is the owner's alone."""

import os
import stat

import pytest

from dtmf_service.config import ConfigError
from dtmf_service.metrics.counters import SharedCounters, fold_dead
from plugins.file import dtmf_audit_sink


@pytest.fixture(autouse=True)
def lax_umask():
    """A umask that would leave files group- and world-readable: the modes must not depend on it."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def sink(path, file_mode=None):
    config = {"AUDIT_FILE_PATH": str(path), "AUDIT_FILE_FSYNC": "never"}
    if file_mode is not None:
        config["AUDIT_FILE_MODE"] = file_mode
    return dtmf_audit_sink(name="file", config=config)


def test_audit_file_is_0600_in_a_0700_directory_by_default(tmp_path):
    path = tmp_path / "audit" / "audit.jsonl"
    sink(path).deliver({"event_id": "1"})
    assert (mode(path), mode(path.parent)) == (0o600, 0o700)


def test_audit_file_mode_for_a_log_shipper(tmp_path):
    path = tmp_path / "audit" / "audit.jsonl"
    sink(path, "0640").deliver({"event_id": "1"})
    assert (mode(path), mode(path.parent)) == (0o640, 0o750)


def test_an_earlier_versions_0640_file_is_brought_to_the_configured_mode(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o640)
    sink(path).deliver({"event_id": "1"})
    assert mode(path) == 0o600


@pytest.mark.parametrize("bad", ["0666", "0700", "0460", "rw-r-----", "640x", "01640"])
def test_a_mode_that_gives_more_than_read_away_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="AUDIT_FILE_MODE"):
        sink(tmp_path / "audit.jsonl", bad)


def test_metrics_directory_and_archive_are_the_owners_alone(tmp_path):
    directory = tmp_path / "metrics"
    counters = SharedCounters(str(directory))
    counters.inc("requests")
    fold_dead(str(directory), os.getpid())
    assert mode(directory) == 0o700
    assert mode(directory / "archive.json") == 0o600
