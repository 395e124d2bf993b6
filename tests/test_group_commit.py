"""Group commit of Maildir deliveries: maildir.deliver_batch and GroupCommit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred

from mailx import maildir
from mailx.router import GroupCommit

_T = TypeVar("_T")


def test_batch_delivers_every_message(tmp_path: Path) -> None:
    """Each job ends as one file in its Maildir's new/, with tmp/ empty."""
    jobs = [
        (str(tmp_path / "a"), b"one\n"),
        (str(tmp_path / "b"), b"two\n"),
        (str(tmp_path / "a"), b"three\n"),
    ]
    results = maildir.deliver_batch(jobs)
    assert all(isinstance(result, str) for result in results)
    assert [Path(str(r)).read_bytes() for r in results] == [
        b"one\n",
        b"two\n",
        b"three\n",
    ]
    assert sorted(p.name for p in (tmp_path / "a" / "new").iterdir()) == sorted(
        Path(str(r)).name for r in (results[0], results[2])
    )
    assert list((tmp_path / "a" / "tmp").iterdir()) == []


def test_a_failing_job_leaves_the_others_delivered(tmp_path: Path) -> None:
    """A Maildir that cannot be made fails only its own job, leaving no file."""
    (tmp_path / "blocked").write_text("a file where a Maildir should be")
    results = maildir.deliver_batch(
        [(str(tmp_path / "blocked"), b"x\n"), (str(tmp_path / "good"), b"y\n")]
    )
    assert isinstance(results[0], OSError)
    assert isinstance(results[1], str)
    assert Path(results[1]).read_bytes() == b"y\n"


def test_without_syncfs_each_file_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where syncfs is missing the batch still delivers, with fsync per file."""
    monkeypatch.setattr(maildir, "_syncfs", None)
    (result,) = maildir.deliver_batch([(str(tmp_path / "m"), b"z\n")])
    assert Path(str(result)).read_bytes() == b"z\n"


def test_a_failed_sync_delivers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If making the files durable fails, no message is left in new/."""

    def broken(descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(maildir, "_syncfs", broken)
    results = maildir.deliver_batch([(str(tmp_path / "m"), b"z\n")])
    assert isinstance(results[0], OSError)
    assert list((tmp_path / "m" / "new").iterdir()) == []
    assert list((tmp_path / "m" / "tmp").iterdir()) == []


class ManualIO:
    """Runs submitted work only when the test says so."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        done: Deferred[_T] = Deferred()
        self.queue.append((work, done))
        return done

    def run_one(self) -> None:
        work, done = self.queue.pop(0)
        done.callback(work())


def test_messages_arriving_during_a_batch_share_the_next(tmp_path: Path) -> None:
    """While a batch is written, later submissions wait and go together."""
    io = ManualIO()
    commit = GroupCommit(io)
    first = commit.submit([(str(tmp_path / "m"), b"1\n")])
    second = commit.submit([(str(tmp_path / "m"), b"2\n")])
    third = commit.submit([(str(tmp_path / "m"), b"3\n")])
    assert len(io.queue) == 1
    fired: list[int] = []
    first.addCallback(lambda _: fired.append(1))
    second.addCallback(lambda _: fired.append(2))
    third.addCallback(lambda _: fired.append(3))
    io.run_one()
    assert fired == [1]
    assert len(io.queue) == 1
    io.run_one()
    assert fired == [1, 2, 3]
    assert len(list((tmp_path / "m" / "new").iterdir())) == 3


def test_each_job_has_its_own_outcome(tmp_path: Path) -> None:
    """A failed job fails alone: its submission says which job, and another
    submission in the same batch is untouched."""
    (tmp_path / "blocked").write_text("not a directory")
    io = ManualIO()
    commit = GroupCommit(io)
    commit.submit([(str(tmp_path / "m"), b"0\n")])
    mixed = commit.submit(
        [(str(tmp_path / "blocked"), b"1\n"), (str(tmp_path / "m"), b"1\n")]
    )
    good = commit.submit([(str(tmp_path / "m"), b"2\n")])
    io.run_one()
    io.run_one()
    outcomes: list[list[OSError | None]] = []
    mixed.addCallback(outcomes.append)
    good.addCallback(outcomes.append)
    assert [[isinstance(e, OSError) for e in errors] for errors in outcomes] == [
        [True, False],
        [False],
    ]
    assert len(list((tmp_path / "m" / "new").iterdir())) == 3
