"""
The spool's message files (issue 7): one file a message, files of removed
messages overwritten by new ones, and spools written by earlier versions of
mailx (an envelope and a content file a message) still delivered.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailx import replies, spool
from mailx.queue import QueuedMessage, RecipientState
from mailx.spool import SpoolStore
from tests.test_spool import (
    CONTENT,
    DEFERRED,
    ScriptedAgent,
    envelope,
    make_spool,
    queued_ids,
    result_of,
)


def new_message(message_id: str, content: bytes = CONTENT) -> QueuedMessage:
    return QueuedMessage.from_envelope(message_id, envelope("bob"), len(content), 0.0)


def store_one(store: SpoolStore, message_id: str, content: bytes = CONTENT) -> None:
    assert store.store_new([(new_message(message_id, content), content)]) == [None]


def test_a_new_message_overwrites_the_file_of_a_removed_one(tmp_path: Path) -> None:
    """The file of a delivered message is reused by the next message, cut to
    the new message's length: no inode is freed or allocated, and the new
    message reads back exactly, none of the old one's octets with it."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    long_content = CONTENT + b"x" * 5000 + b"\r\n"
    store_one(store, "OLD", long_content)
    inode = os.stat(tmp_path / "message" / "OLD").st_ino
    assert store.remove_batch(["OLD"]) == [True]
    assert os.listdir(tmp_path / "free") == ["OLD"]

    store_one(store, "NEW")

    assert os.listdir(tmp_path / "free") == []
    assert os.stat(tmp_path / "message" / "NEW").st_ino == inode
    assert store.load_with_content("NEW") == (new_message("NEW"), CONTENT)
    assert b"xxxx" not in (tmp_path / "message" / "NEW").read_bytes()


def test_the_kept_files_are_bounded_in_number_and_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most POOL_FILES removed files are kept, none longer than
    POOL_FILE_LIMIT: the others are unlinked, so a burst of large messages
    leaves no disk space behind."""
    monkeypatch.setattr(spool, "POOL_FILES", 2)
    monkeypatch.setattr(spool, "POOL_FILE_LIMIT", 1000)
    store = SpoolStore(str(tmp_path))
    store.prepare()
    for name in ("A", "B", "C"):
        store_one(store, name)
    store_one(store, "BIG", CONTENT * 20)

    assert store.remove_batch(["BIG", "A", "B", "C"]) == [True] * 4

    assert sorted(os.listdir(tmp_path / "free")) == ["A", "B"]


def test_a_restart_reuses_kept_files_and_never_delivers_them(
    tmp_path: Path, clock: Clock
) -> None:
    """Files left in free/ (a removed message, one written but never
    committed) are never delivered after a restart, and new messages reuse
    them."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "GONE")
    store.remove_batch(["GONE"])
    # Written in free/ when the process died, before its commit (by another
    # store, which has no kept file to overwrite).
    store_one(SpoolStore(str(tmp_path)), "HALF")
    os.replace(tmp_path / "message" / "HALF", tmp_path / "free" / "HALF")
    kept = {entry.inode() for entry in os.scandir(tmp_path / "free")}

    agent = ScriptedAgent(clock)
    later = make_spool(tmp_path, clock, agent)
    later.startService()
    assert later.recovery is not None
    assert result_of(later.recovery) == 0
    message_id = result_of(later.enqueue(envelope("carol"), CONTENT))

    assert [str(a) for call in agent.calls for a in call.recipients] == [
        "carol@example.com"
    ]
    assert queued_ids(tmp_path) == []
    # Carol's message was written over one of the two kept files.
    free = os.listdir(tmp_path / "free")
    assert message_id in free
    assert len(free) == 2
    assert {entry.inode() for entry in os.scandir(tmp_path / "free")} == kept


def test_a_rewritten_envelope_wins_and_leaves_with_the_message(
    tmp_path: Path, clock: Clock
) -> None:
    """After an attempt the new envelope is in envelope/ and is what a restart
    reads; when the message is delivered both of its files are gone."""
    agent = ScriptedAgent(clock, {"bob": [DEFERRED, replies.OK]})
    queue = make_spool(tmp_path, clock, agent)
    queue.startService()
    message_id = result_of(queue.enqueue(envelope("bob", "carol"), CONTENT))
    result_of(queue.stopService())

    restarted = SpoolStore(str(tmp_path))
    found, removed = restarted.recover()
    assert (found[0].message_id, removed) == (message_id, [])
    message, content = restarted.load_with_content(message_id)
    assert [r.state for r in message.recipients] == [
        RecipientState.PENDING,
        RecipientState.DELIVERED,
    ]
    assert content == CONTENT

    again = make_spool(tmp_path, clock, agent)
    again.startService()
    clock.advance(3600)
    assert queued_ids(tmp_path) == []
    assert os.listdir(tmp_path / "envelope") == []


def test_a_spool_written_by_an_earlier_mailx_is_delivered(
    tmp_path: Path, clock: Clock
) -> None:
    """A message stored as envelope/ID and content/ID (mailx before the
    message files) is recovered, shown, delivered and removed as before."""
    (tmp_path / "envelope").mkdir()
    (tmp_path / "content").mkdir()
    old = new_message("OLD1")
    (tmp_path / "envelope" / "OLD1").write_bytes(old.to_json())
    (tmp_path / "content" / "OLD1").write_bytes(CONTENT)
    assert SpoolStore(str(tmp_path)).ids() == ["OLD1"]
    assert SpoolStore(str(tmp_path)).read_content("OLD1") == CONTENT

    agent = ScriptedAgent(clock)
    queue = make_spool(tmp_path, clock, agent)
    queue.startService()
    assert queue.recovery is not None
    assert result_of(queue.recovery) == 1

    assert [(c.envelope.message_id, c.content) for c in agent.calls] == [
        ("OLD1", CONTENT)
    ]
    assert os.listdir(tmp_path / "envelope") == []
    assert os.listdir(tmp_path / "content") == []


def test_a_message_file_cut_short_is_set_aside(tmp_path: Path) -> None:
    """A message file whose envelope is shorter than its first line says is
    not delivered and not deleted: it goes to corrupt/ for the operator."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "CUT")
    path = tmp_path / "message" / "CUT"
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\n") + 20])

    found, removed = store.recover()

    assert (found, removed) == ([], ["message/CUT"])
    assert os.listdir(tmp_path / "corrupt") == ["CUT.message"]


def test_an_old_message_is_deleted_before_any_new_start(tmp_path: Path) -> None:
    """``mailx queue delete`` with no server, on a queue only an earlier
    mailx has run on (no message/ or free/ yet), removes both of the
    message's files and says it did."""
    for name in ("tmp", "envelope", "content"):
        (tmp_path / name).mkdir()
    (tmp_path / "envelope" / "OLD1").write_bytes(new_message("OLD1").to_json())
    (tmp_path / "content" / "OLD1").write_bytes(CONTENT)
    store = SpoolStore(str(tmp_path))

    assert store.remove("OLD1") is True

    assert store.ids() == []
    assert os.listdir(tmp_path / "envelope") == []
    assert os.listdir(tmp_path / "content") == []


def cut_message_with_newer_envelope(tmp_path: Path) -> None:
    """CUT: a message file cut short inside its envelope, and a newer
    envelope of it that reads well."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    message = new_message("CUT")
    (tmp_path / "message" / "CUT").write_bytes(b"mailx-spool 2 9999\n{")
    (tmp_path / "envelope" / "CUT").write_bytes(message.to_json())


def test_a_cut_message_file_is_set_aside_despite_a_newer_envelope(
    tmp_path: Path,
) -> None:
    """Recovery reads the message file even when a newer envelope wins over
    the one inside it: a file cut short goes to corrupt/ with its envelope."""
    cut_message_with_newer_envelope(tmp_path)

    found, removed = SpoolStore(str(tmp_path)).recover()

    assert (found, removed) == ([], ["message/CUT"])
    assert sorted(os.listdir(tmp_path / "corrupt")) == ["CUT.envelope", "CUT.message"]


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def replaced_by_a_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("damage", [cut_short, replaced_by_a_fifo])
def test_a_message_damaged_after_recovery_is_set_aside_not_retried(
    tmp_path: Path,
    clock: Clock,
    mail_log: list[str],
    damage: Callable[[Path], None],
) -> None:
    """A message whose file is no longer what was accepted when its attempt
    comes (cut short, or a FIFO put in its place since the start) is not
    tried, not waited on, not retried for ever: it goes to corrupt/ and the
    mail log says so."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    message = new_message("HURT")
    message.next_attempt = 100.0
    assert store.store_new([(message, CONTENT)]) == [None]
    agent = ScriptedAgent(clock)
    queue = make_spool(tmp_path, clock, agent)
    queue.startService()
    assert queue.schedule.next_attempt("HURT") == 100.0
    # Recovery has read the envelope; the file is damaged before the attempt.
    damage(tmp_path / "message" / "HURT")
    clock.advance(3600)

    assert agent.calls == []
    assert "HURT" not in queue.schedule
    assert os.listdir(tmp_path / "corrupt") == ["HURT.message"]
    assert [line for line in mail_log if line.startswith("took ")] == [
        "took message/HURT out of the queue (partial, orphaned or unreadable;"
        " unreadable ones are kept in corrupt/)"
    ]


def recover_within(store: SpoolStore, seconds: float = 10.0) -> tuple[object, ...]:
    """``store.recover()`` in a thread, failing the test if it hangs."""
    outcome: list[tuple[object, ...]] = []
    worker = threading.Thread(target=lambda: outcome.append(store.recover()))
    worker.daemon = True
    worker.start()
    worker.join(seconds)
    assert outcome, "recovery hangs"
    return outcome[0]


def test_odd_files_in_the_queue_neither_hang_nor_stop_recovery(tmp_path: Path) -> None:
    """FIFOs, symbolic links, directories and a first line claiming an
    enormous envelope, left in the queue's directories, are never waited
    on, followed or delivered: recovery finishes, sets the ones in
    message/ and envelope/ aside, and a whole message beside them is kept."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not mail\r\n")
    queue = tmp_path / "queue"
    store = SpoolStore(str(queue))
    store.prepare()
    store_one(store, "GOOD")
    os.mkfifo(queue / "message" / "FIFO")
    (queue / "message" / "LINK").symlink_to(outside)
    (queue / "message" / "DIR").mkdir()
    (queue / "message" / "HUGE").write_bytes(b"mailx-spool 2 99999999999999999999\n{}")
    os.mkfifo(queue / "envelope" / "GOOD")
    (queue / "tmp" / "somedir").mkdir()
    (queue / "free" / "somedir").mkdir()

    found, removed = recover_within(SpoolStore(str(queue)))

    assert found == []
    assert removed == [
        "message/DIR",
        "message/FIFO",
        "message/GOOD",
        "message/HUGE",
        "message/LINK",
    ]
    assert outside.read_bytes() == b"not mail\r\n"
    assert sorted(os.listdir(queue / "corrupt")) == [
        "DIR.message",
        "FIFO.message",
        "GOOD.envelope",
        "GOOD.message",
        "HUGE.message",
        "LINK.message",
    ]


def test_a_new_message_never_writes_through_a_link_in_free(tmp_path: Path) -> None:
    """A symbolic link left in free/ is not kept for reuse: new messages
    never write through it into the file it names."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me\r\n")
    queue = tmp_path / "queue"
    store = SpoolStore(str(queue))
    store.prepare()
    (queue / "free" / "LINK").symlink_to(outside)
    store.recover()

    store_one(store, "NEW")

    assert outside.read_bytes() == b"keep me\r\n"
    assert store.read_content("NEW") == CONTENT
    assert os.listdir(queue / "free") == []


def test_a_failed_recovery_is_logged_and_tried_again(
    tmp_path: Path, clock: Clock, mail_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the queue cannot be recovered at start, the mail log says so, new
    mail is still queued and delivered, and recovery is tried again until
    the messages already queued go out."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "WAITING")
    attempts: list[bool] = []
    real_recover = SpoolStore.recover

    def flaky(
        self: SpoolStore, full: bool = True, skip: frozenset[str] = frozenset()
    ) -> tuple[list[spool.Recovered], list[str]]:
        attempts.append(full)
        if len(attempts) == 1:
            raise PermissionError(13, "Permission denied", str(tmp_path / "message"))
        return real_recover(self, full, skip)

    monkeypatch.setattr(SpoolStore, "recover", flaky)
    agent = ScriptedAgent(clock)
    queue = make_spool(tmp_path, clock, agent)
    queue.startService()
    assert queue.recovery is not None
    assert result_of(queue.recovery) == -1
    assert [line for line in mail_log if line.startswith("could not recover")] == [
        "could not recover the queue ([Errno 13] Permission denied:"
        f" '{tmp_path / 'message'}'): the messages in it are not delivered"
        " until it is; trying again in 60 s"
    ]

    result_of(queue.enqueue(envelope("carol"), CONTENT))
    assert [str(call.recipients[0]) for call in agent.calls] == ["carol@example.com"]

    clock.advance(spool.RECOVERY_RETRY)
    # The retry only lists the queue: tmp/ and free/ may be in use by now.
    assert attempts == [True, False]
    assert [call.envelope.message_id for call in agent.calls][1:] == ["WAITING"]
    assert queued_ids(tmp_path) == []


def test_an_entry_recovery_cannot_move_is_named_and_the_rest_recovered(
    tmp_path: Path, clock: Clock, mail_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged message that cannot even be set aside is named in the mail
    log as needing the operator, and every other message is recovered."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "GOOD")
    (tmp_path / "message" / "BAD").write_bytes(b"garbage")
    real_replace = os.replace

    def stuck(source: str, destination: str) -> None:
        if source.endswith("BAD"):
            raise PermissionError(1, "Operation not permitted", source)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", stuck)
    agent = ScriptedAgent(clock)
    queue = make_spool(tmp_path, clock, agent)
    queue.startService()

    assert queue.recovery is not None
    assert result_of(queue.recovery) == 1
    assert [call.envelope.message_id for call in agent.calls] == ["GOOD"]
    assert [line for line in mail_log if line.startswith("could not take")] == [
        "could not take message/BAD out of the queue ([Errno 1] Operation not"
        f" permitted: '{tmp_path / 'message' / 'BAD'}'): it is not delivered;"
        " remove or repair it by hand"
    ]


def test_a_listing_recovery_leaves_work_under_way_alone(tmp_path: Path) -> None:
    """The recovery a retry runs, while messages are being stored and
    removed, lists the queue only: what is in tmp/ and free/ stays."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "QUEUED")
    (tmp_path / "tmp" / "QUEUED.rewrite").write_bytes(b"being written")
    (tmp_path / "free" / "NEXT").write_bytes(b"being written")

    found, removed = store.recover(full=False)

    assert ([item.message_id for item in found], removed) == (["QUEUED"], [])
    assert os.listdir(tmp_path / "tmp") == ["QUEUED.rewrite"]
    assert os.listdir(tmp_path / "free") == ["NEXT"]


def test_a_deleted_message_leaves_the_disk(tmp_path: Path, clock: Clock) -> None:
    """What an operator deletes is not kept for reuse: no file of it is
    left anywhere in the queue, unlike a delivered message's."""
    agent = ScriptedAgent(clock, {"bob": [DEFERRED]})
    queue = make_spool(tmp_path, clock, agent)
    queue.startService()
    message_id = result_of(queue.enqueue(envelope("bob"), CONTENT))

    result_of(queue.delete(message_id))

    for directory in ("message", "envelope", "free", "tmp"):
        assert os.listdir(tmp_path / directory) == [], directory


def test_a_file_left_in_free_gets_the_spools_mode(tmp_path: Path) -> None:
    """A file someone left in free/ with a wider mode is reused as a message
    file readable by the spool's owner only."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    left = tmp_path / "free" / "LEFT"
    left.write_bytes(b"x")
    left.chmod(0o666)
    inode = left.stat().st_ino
    store.recover()

    store_one(store, "NEW")

    assert (tmp_path / "message" / "NEW").stat().st_ino == inode
    assert (tmp_path / "message" / "NEW").stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path / "free") == []


def fail_replace_into(
    monkeypatch: pytest.MonkeyPatch, suffix: str, number: int = errno.ENOSPC
) -> None:
    """Make ``os.replace`` fail for destinations ending with ``suffix``."""
    real = os.replace

    def replace(source: str, destination: str) -> None:
        if str(destination).endswith(suffix):
            raise OSError(number, os.strerror(number), destination)
        real(source, destination)

    monkeypatch.setattr(os, "replace", replace)


def test_a_full_disk_never_delivers_a_message_twice(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When free/ cannot take one more entry (a full disk), a delivered
    message's file is unlinked instead of kept: it leaves the queue and is
    not delivered again at the next retry."""
    agent = ScriptedAgent(clock)
    queue = make_spool(tmp_path, clock, agent)
    queue.startService()
    fail_replace_into(monkeypatch, os.sep + "free" + os.sep + "ONCE")

    result_of(queue.enqueue(envelope("bob", message_id="ONCE"), CONTENT))
    clock.advance(3 * spool.DEFAULT_MIN_RETRY)

    assert len(agent.calls) == 1
    assert queued_ids(tmp_path) == []
    assert os.listdir(tmp_path / "free") == []


def test_a_rename_that_fails_fails_its_own_change_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One new message that cannot be renamed into message/ is refused
    alone: the other new message and the removal of its batch are done."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "R")
    fail_replace_into(monkeypatch, os.sep + "message" + os.sep + "A")

    results = store.apply(
        [
            spool.StoreNew.of(new_message("A"), CONTENT),
            spool.StoreNew.of(new_message("B"), CONTENT),
            spool.Remove("R"),
        ]
    )

    assert isinstance(results[0], OSError)
    assert results[1:] == [None, True]
    assert store.ids() == ["B"]
    assert os.listdir(tmp_path / "free") == ["R"]


def test_a_failed_first_sync_refuses_the_new_messages_only(tmp_path: Path) -> None:
    """When the sync of a batch's new files fails, its new messages are
    refused, the kept file written for one of them is removed (not left in
    free/ with the refused octets), and the batch's removals (of messages
    delivered already) are done all the same."""
    failing: list[bool] = []

    def syncfs(descriptor: int) -> None:
        if failing:
            failing.pop()
            raise OSError(errno.EIO, "Input/output error")

    store = SpoolStore(str(tmp_path), syncfs=syncfs)
    store.prepare()
    store_one(store, "OLD")
    store_one(store, "DONE")
    store.remove_batch(["OLD"])
    failing.append(True)

    results = store.apply(
        [spool.StoreNew.of(new_message("A"), CONTENT), spool.Remove("DONE")]
    )

    assert isinstance(results[0], OSError)
    assert results[1] is True
    assert store.ids() == []
    assert os.listdir(tmp_path / "free") == ["DONE"]


def test_tidying_up_after_the_commit_cannot_refuse_a_stored_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error removing a finished message's leftover envelope, after the
    batch is durable, does not turn the new message of the same batch into
    a refusal, nor keep the other finished message's file from reuse."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "R1")
    store_one(store, "R2")
    store.rewrite(new_message("R1"))
    inode = (tmp_path / "message" / "R2").stat().st_ino
    real = os.unlink

    def unlink(path: str) -> None:
        if str(path).endswith(os.sep + "envelope" + os.sep + "R1"):
            raise OSError(errno.EACCES, "Permission denied", path)
        real(path)

    monkeypatch.setattr(os, "unlink", unlink)

    results = store.apply(
        [
            spool.StoreNew.of(new_message("A"), CONTENT),
            spool.Remove("R1"),
            spool.Remove("R2"),
        ]
    )

    assert results == [None, True, True]
    assert store.ids() == ["A"]
    store_one(store, "NEXT")
    assert (tmp_path / "message" / "NEXT").stat().st_ino == inode


def test_a_file_linked_elsewhere_is_never_written_over(tmp_path: Path) -> None:
    """A removed message's file with another link (a snapshot of the queue
    made with cp -al) is not kept for reuse: the snapshot keeps its octets."""
    queue = tmp_path / "queue"
    store = SpoolStore(str(queue))
    store.prepare()
    store_one(store, "OLD", b"old message\r\n")
    os.link(queue / "message" / "OLD", tmp_path / "snapshot")
    store.remove_batch(["OLD"])

    store_one(store, "NEW", b"new message\r\n")

    assert (tmp_path / "snapshot").read_bytes().endswith(b"old message\r\n")


def test_a_message_that_cannot_be_read_for_now_is_kept_and_tried_again(
    tmp_path: Path, clock: Clock, mail_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A passing error reading queued messages at start (too many open
    files) sets nothing aside: the mail log names them, and they are read
    and delivered when recovery tries again."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "M1")
    real = os.open
    refusing = [True]

    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        if refusing and os.sep + "message" + os.sep in str(path):
            raise OSError(errno.EMFILE, "Too many open files", path)
        return real(path, flags, mode)

    monkeypatch.setattr(os, "open", refuse)
    agent = ScriptedAgent(clock)
    queue = make_spool(tmp_path, clock, agent)
    queue.startService()

    assert not (tmp_path / "corrupt").exists()
    assert [line for line in mail_log if line.startswith("could not read")] == [
        "could not read queued message M1 ([Errno 24] Too many open files:"
        f" '{tmp_path / 'message' / 'M1'}'): trying again in 60 s"
    ]
    refusing.clear()
    clock.advance(spool.RECOVERY_RETRY)
    assert [call.envelope.message_id for call in agent.calls] == ["M1"]


def test_a_message_whose_file_is_reused_while_read_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a message whose file the server removes and reuses for
    another meanwhile (mailx queue show while the server works) finds it
    gone, never the other message's octets under its name."""
    server = SpoolStore(str(tmp_path))
    server.prepare()
    store_one(server, "A", b"Subject: for A\r\n\r\n")
    real = spool._open_spool_file

    def racing(path: str, flags: int, mode: int = 0o600) -> tuple[int, os.stat_result]:
        opened = real(path, flags, mode)
        if path.endswith(os.sep + "message" + os.sep + "A"):
            server.apply([spool.Remove("A")])
            other = b"Subject: for B\r\n\r\n"
            server.apply([spool.StoreNew.of(new_message("B", other), other)])
        return opened

    monkeypatch.setattr(spool, "_open_spool_file", racing)
    with pytest.raises(FileNotFoundError):
        SpoolStore(str(tmp_path)).load_with_content("A")


def test_a_removal_looks_for_leftovers_unless_there_can_be_none(
    tmp_path: Path,
) -> None:
    """A removal unlinks a rewritten envelope unless told none can be left
    (a message delivered at its first attempt, from memory)."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    for name in ("PLAIN", "REWRITTEN"):
        store_one(store, name)
        store.rewrite(new_message(name))
    assert sorted(os.listdir(tmp_path / "envelope")) == ["PLAIN", "REWRITTEN"]

    results = store.apply(
        [spool.Remove("PLAIN", leftovers=False), spool.Remove("REWRITTEN")]
    )

    assert results == [True, True]
    assert queued_ids(tmp_path) == []
    # Told there could be none, the removal did not look.
    assert os.listdir(tmp_path / "envelope") == ["PLAIN"]


@pytest.mark.parametrize(
    ("replies_to_bob", "leftovers"),
    [([replies.OK], False), ([DEFERRED, replies.OK], True)],
)
def test_only_a_message_delivered_from_memory_skips_the_leftovers(
    tmp_path: Path,
    clock: Clock,
    replies_to_bob: list[replies.Reply],
    leftovers: bool,
) -> None:
    """Delivered at its first attempt, a message was never rewritten; one
    deferred first was, and its removal takes the rewritten envelope too."""
    agent = ScriptedAgent(clock, {"bob": replies_to_bob})
    queue = make_spool(tmp_path, clock, agent)
    submitted: list[spool.SpoolChange] = []
    submit = queue._changes.submit

    def recording(change: spool.SpoolChange) -> object:
        submitted.append(change)
        return submit(change)

    queue._changes.submit = recording  # type: ignore[method-assign,assignment]
    queue.startService()
    message_id = result_of(queue.enqueue(envelope("bob"), CONTENT))
    clock.advance(3600)

    assert queued_ids(tmp_path) == []
    assert os.listdir(tmp_path / "envelope") == []
    removals = [c for c in submitted if isinstance(c, spool.Remove)]
    assert removals == [spool.Remove(message_id, leftovers=leftovers)]


def test_a_message_file_naming_another_message_is_set_aside_at_start(
    tmp_path: Path,
) -> None:
    """At a start nothing reuses a file: a message file whose envelope names
    another message (edited by hand) goes to corrupt/ and is reported,
    rather than stay in message/ unseen for ever.  A listing while the
    server runs leaves it alone (its file may be reused meanwhile)."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "OTHER")
    os.replace(tmp_path / "message" / "OTHER", tmp_path / "message" / "NAMED")

    found, removed = SpoolStore(str(tmp_path)).recover(full=False)
    assert (found, removed) == ([], [])
    assert os.listdir(tmp_path / "message") == ["NAMED"]

    found, removed = SpoolStore(str(tmp_path)).recover()
    assert found == []
    assert removed == ["message/NAMED"]
    assert os.listdir(tmp_path / "corrupt") == ["NAMED.message"]
