"""
The spool's group commit and batched removal (issue 7): many messages made
durable with a few syncs, in the order crash safety needs, and the first
attempt of a fresh message served from memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailx import durable, replies, spool
from mailx.queue import QueuedMessage
from mailx.replies import Reply, ReplyError
from mailx.spool import SpoolStore, synchronous_io
from tests.test_spool import (
    CONTENT,
    ManualIO,
    ScriptedAgent,
    envelope,
    make_spool,
    queued_ids,
    result_of,
)


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


class SyncRecorder:
    """A syncfs that notes what each spool directory held when it ran."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.calls: list[dict[str, list[str]]] = []

    def __call__(self, descriptor: int) -> None:
        self.calls.append(
            {
                name: listing(self.spool_dir / name)
                for name in ("free", "message", "envelope")
            }
        )


def new_message(message_id: str) -> QueuedMessage:
    return QueuedMessage.from_envelope(message_id, envelope("bob"), len(CONTENT), 0.0)


def test_commit_syncs_each_file_before_it_is_renamed(tmp_path: Path) -> None:
    """Message files are synced where they were written, in free/, before
    any of them is renamed into message/, and the renames are synced."""
    syncs = SyncRecorder(tmp_path)
    store = SpoolStore(str(tmp_path), syncfs=syncs)
    store.prepare()

    results = store.store_new([(new_message(i), CONTENT) for i in ("A1", "A2")])

    assert results == [None, None]
    assert syncs.calls == [
        {"free": ["A1", "A2"], "message": [], "envelope": []},
        {"free": [], "message": ["A1", "A2"], "envelope": []},
    ]


def test_a_batch_of_many_messages_costs_two_syncs(tmp_path: Path) -> None:
    """Fifty messages stored together take two syncs, and their removal one;
    the removed files are kept for the next messages."""
    syncs = SyncRecorder(tmp_path)
    store = SpoolStore(str(tmp_path), syncfs=syncs)
    store.prepare()
    ids = [f"M{number}" for number in range(50)]

    store.store_new([(new_message(i), CONTENT) for i in ids])
    assert len(syncs.calls) == 2
    assert store.ids() == sorted(ids)

    assert store.remove_batch(ids) == [True] * 50
    assert len(syncs.calls) == 3
    assert syncs.calls[2]["message"] == []
    assert store.ids() == []
    assert listing(tmp_path / "free") == sorted(ids)


def test_messages_stored_and_removed_together_share_two_syncs(
    tmp_path: Path,
) -> None:
    """New messages and removals in one batch take the new messages' two
    syncs, no third: the removed file and the new ones are renamed before
    the second, which makes every rename durable."""
    syncs = SyncRecorder(tmp_path)
    store = SpoolStore(str(tmp_path), syncfs=syncs)
    store.prepare()
    store.store_new([(new_message("OLD"), CONTENT)])
    syncs.calls.clear()

    results = store.apply(
        [
            spool.StoreNew.of(new_message("N1"), CONTENT),
            spool.Remove("OLD"),
            spool.Remove("GONE"),
            spool.StoreNew.of(new_message("N2"), CONTENT),
        ]
    )

    assert results == [None, True, False, None]
    assert syncs.calls == [
        {"free": ["N1", "N2"], "message": ["OLD"], "envelope": []},
        {"free": ["OLD"], "message": ["N1", "N2"], "envelope": []},
    ]


def test_removal_reports_messages_that_were_not_there(tmp_path: Path) -> None:
    """Removing a batch says which messages were gone already; no sync is
    spent when none was there."""
    syncs = SyncRecorder(tmp_path)
    store = SpoolStore(str(tmp_path), syncfs=syncs)
    store.prepare()
    store.store_new([(new_message("HERE"), CONTENT)])

    assert store.remove_batch(["GONE", "HERE"]) == [False, True]
    assert store.remove_batch(["GONE"]) == [False]
    assert len(syncs.calls) == 3


def test_without_syncfs_every_file_is_synced(tmp_path: Path) -> None:
    """Where syncfs is missing the spool stores and removes messages with an
    fsync per file and directory."""
    store = SpoolStore(str(tmp_path), syncfs=None)
    store.prepare()

    assert store.store_new([(new_message(i), CONTENT) for i in ("B1", "B2")]) == [
        None,
        None,
    ]
    assert store.load_with_content("B2") == (new_message("B2"), CONTENT)
    assert store.remove_batch(["B1", "B2"]) == [True, True]
    assert store.ids() == []
    assert listing(tmp_path / "tmp") == []


def test_a_message_that_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    """A message whose file cannot be written gets its error; the others of
    its batch are stored."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    # A link into a missing directory where the file should go: writing fails.
    (tmp_path / "free" / "BAD").symlink_to(tmp_path / "missing" / "file")

    results = store.store_new([(new_message(i), CONTENT) for i in ("OK1", "BAD")])

    assert results[0] is None
    assert isinstance(results[1], OSError)
    assert store.ids() == ["OK1"]
    assert listing(tmp_path / "message") == ["OK1"]
    assert listing(tmp_path / "free") == []


def test_spool_refuses_only_the_message_that_failed(
    tmp_path: Path, clock: Clock
) -> None:
    """In one group commit, a message that cannot be written gets 451 4.3.0
    and the others their queue ids."""
    io = ManualIO()
    queue = make_spool(tmp_path, clock, ScriptedAgent(clock), run_io=io)
    (tmp_path / "free" / "BAD").symlink_to(tmp_path / "missing" / "file")
    given: dict[str, str] = {}
    refused: dict[str, Reply] = {}

    def record(message_id: str) -> None:
        queued = queue.enqueue(envelope("bob", message_id=message_id), CONTENT)
        queued.addCallback(given.setdefault, message_id)

        def failed(failure: Failure) -> None:
            assert isinstance(failure.value, ReplyError)
            refused[message_id] = failure.value.reply

        queued.addErrback(failed)

    for message_id in ("FIRST", "GOOD", "BAD"):
        record(message_id)
    io.run_next()  # FIRST alone.
    io.run_next()  # GOOD and BAD together.
    while io.jobs:  # The clean-up after BAD.
        io.run_next()

    assert given == {"FIRST": "FIRST", "GOOD": "GOOD"}
    assert refused == {"BAD": replies.STORAGE_FAILED}
    assert queued_ids(tmp_path) == ["FIRST", "GOOD"]
    assert listing(tmp_path / "free") == []


def test_a_failed_sync_refuses_the_whole_batch(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the group commit cannot make its batch durable, every message of
    it gets 451 4.3.0 and no file of theirs is left."""

    def broken(directories: list[str], syncfs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "sync_directories", broken)
    queue = make_spool(tmp_path, clock, ScriptedAgent(clock))

    with pytest.raises(ReplyError) as caught:
        result_of(queue.enqueue(envelope("bob"), CONTENT))

    assert caught.value.reply == replies.STORAGE_FAILED
    for name in ("tmp", "free", "message", "envelope"):
        assert listing(tmp_path / name) == []


def test_first_attempt_needs_no_disk_read(tmp_path: Path, clock: Clock) -> None:
    """A fresh message goes to the next hop as soon as it is committed, with
    no further I/O before the attempt."""
    io = ManualIO()
    agent = ScriptedAgent(clock)
    queue = make_spool(tmp_path, clock, agent, run_io=io)
    queue.startService()
    io.run_next()  # Recovery.
    queue.enqueue(envelope("bob"), CONTENT)

    io.run_next()  # The group commit.

    assert [call.content for call in agent.calls] == [CONTENT]
    assert [str(a) for a in agent.calls[0].recipients] == ["bob@example.com"]


def test_fresh_messages_beyond_the_bound_are_read_from_disk(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound on content kept in memory, the oldest fresh message is
    dropped from memory and its first attempt reads what is on disk."""
    monkeypatch.setattr(spool, "FRESH_CONTENT_LIMIT", 2 * len(CONTENT))
    agent = ScriptedAgent(clock, hang=True)
    queue = make_spool(tmp_path, clock, agent, max_parallel=1, run_io=synchronous_io)
    queue.startService()
    for number in range(4):
        given = envelope("bob", message_id=f"F{number}")
        result_of(queue.enqueue(given, CONTENT))
    # F0 is in delivery; F1 is the oldest of the three kept, so it is dropped.
    on_disk = b"On disk.".ljust(len(CONTENT) - 2, b".") + b"\r\n"
    stored = tmp_path / "message" / "F1"
    stored.write_bytes(stored.read_bytes()[: -len(CONTENT)] + on_disk)

    for _ in range(3):
        [address] = agent.calls[-1].recipients
        agent.pending[-1].callback([spool.RecipientResult(address, replies.OK)])

    assert [(c.envelope.message_id, c.content) for c in agent.calls] == [
        ("F0", CONTENT),
        ("F1", on_disk),
        ("F2", CONTENT),
        ("F3", CONTENT),
    ]


def test_a_delivered_message_keeps_its_slot_until_its_removal(
    tmp_path: Path, clock: Clock, mail_log: list[str]
) -> None:
    """A delivered message counts against max_parallel until its removal is
    durable, so a crash can repeat no more deliveries than that; "removed" is
    logged, and the spool stops, only once the removals are done."""
    io = ManualIO()
    agent = ScriptedAgent(clock)
    queue = make_spool(tmp_path, clock, agent, run_io=io, max_parallel=1)
    queue.startService()
    io.run_next()  # Recovery.
    for message_id in ("R1", "R2", "R3"):
        queue.enqueue(envelope("bob", message_id=message_id), CONTENT)
    io.run_next()  # R1's commit; R1 is delivered, its removal waits.

    assert [call.envelope.message_id for call in agent.calls] == ["R1"]
    assert not [line for line in mail_log if line.startswith("removed")]
    assert len(io.jobs) == 1  # R2 and R3's commit and R1's removal together.
    io.run_next()  # R1's removal is durable: R2 goes out.
    assert [call.envelope.message_id for call in agent.calls] == ["R1", "R2"]
    assert [line for line in mail_log if line.startswith("removed")] == ["removed R1"]
    # R3 is committed, and waits while R2's removal is not durable.
    assert "R3" in queued_ids(tmp_path)

    stopped: list[None] = []
    queue.stopService().addCallback(stopped.append)
    assert stopped == []
    io.run_next()  # R2's removal.
    assert queued_ids(tmp_path) == ["R3"]
    assert stopped == [None]
