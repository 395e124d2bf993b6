"""The queue lock a server holds while it runs (mailx.tap._lock_queue)."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from mailx import tap
from mailx.config import ConfigError


def test_a_lock_taken_for_an_instant_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mailx queue`` looks at the lock for an instant; a server starting
    then waits for it instead of refusing to start."""
    held = open(tmp_path / "lock", "a")  # noqa: SIM115 - closed by the "sleep"
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        held.close()  # the tool lets go

    monkeypatch.setattr("mailx.tap.time.sleep", sleep)
    lock = tap._lock_queue(str(tmp_path))
    try:
        assert waits == [tap.LOCK_RETRY_WAIT]
        assert (tmp_path / "lock").read_text().startswith("pid ")
    finally:
        lock.close()


def test_a_lock_held_by_a_server_refuses_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock held throughout (another server) refuses the start, naming it."""
    (tmp_path / "lock").write_text("pid 4242\n")
    with open(tmp_path / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setattr("mailx.tap.time.sleep", lambda seconds: None)
        with pytest.raises(ConfigError, match=r"in use by another mailx \(pid 4242,"):
            tap._lock_queue(str(tmp_path))
