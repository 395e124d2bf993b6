"""
Crash safety of the spool at each of its fault points (issues 4 and 7).

A ``Spool`` runs a message's whole life in process (accepted, one attempt
that delivers one recipient and defers the other, a second attempt, removal)
with a fault hook on its ``SpoolStore``.  At the chosen point the hook copies
the spool directory: that copy is what SIGKILL at that point leaves on disk,
since every file written or renamed before it went through the kernel.  (An
exception from the hook would not do: the Deferred machinery catches it and
the spool's own clean-up runs, which a killed process never does.)  A fresh
``Spool`` then recovers the copy and delivers what is left, and the tests
check that each message is either gone or whole, that no accepted message
is lost, and that a recipient is delivered twice only in the window of
RFC 5321 section 6.1 (delivered, but the envelope not yet rewritten).

A removed message's file is kept in ``free/`` and overwritten by a later
message (issue 7): a scenario crashes while that happens, and checks that
the old message's octets never come back.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mailx.address import Address
from mailx.envelope import ClientInfo, Envelope, Recipient, Route
from mailx.queue import QueuedMessage, RecipientState
from mailx.replies import Reply
from mailx.router import GroupCommit, LocalStore, Router
from mailx.spool import (
    MESSAGE_MAGIC,
    RecipientResult,
    Spool,
    SpoolStore,
    message_head,
    synchronous_io,
)

_T = TypeVar("_T")

# Every point at which SpoolStore calls its fault hook, in the order the relay
# scenario meets them: the group commit's files written in free/, synced,
# renamed into message/ and synced again; an envelope rewrite before and
# after its rename; a removal before and after its sync.
COMMIT_POINTS = ("written", "synced", "renamed", "committed")
POINTS = (*COMMIT_POINTS, "rewrite", "rewritten", "remove", "removed")

SENDER = Address("alice", "example.org")
BOB = Address("bob", "example.com")
CAROL = Address("carol", "example.com")
DAVE = Address("dave", "example.com")
CONTENT = b"From: alice@example.org\r\nSubject: crash\r\n\r\nBody line.\r\n"
MIN_RETRY = 300.0
MAX_RETRY = 600.0
LIFETIME = 86400.0
DELIVERED = Reply(250, "2.0.0", "OK")
BUSY = Reply(450, "4.2.0", "Mailbox busy")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user")
# Bounds the loop that lets a recovered spool work through its queue.
DRAIN_STEPS = 20


@dataclass
class Agent:
    """A delivery agent answering from a script; records what it delivered."""

    # Local part -> replies in turn; the last one repeats; 250 if absent.
    script: dict[str, list[Reply]] = field(default_factory=dict)
    # (queue id, recipient) for every 250 given, in order.
    delivered: list[tuple[str, Address]] = field(default_factory=list)
    # Queue id -> the content of each delivery of it.
    contents: dict[str, list[bytes]] = field(default_factory=dict)

    def deliver(
        self,
        reverse_path: Address | None,
        domain: str,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> Deferred[list[RecipientResult]]:
        self.contents.setdefault(envelope.message_id, []).append(content)
        results = []
        for address in recipients:
            answers = self.script.get(address.local_part, [DELIVERED])
            reply = answers.pop(0) if len(answers) > 1 else answers[0]
            if reply.code == 250:
                self.delivered.append((envelope.message_id, address))
            results.append(RecipientResult(address, reply, "mx.example.com"))
        return succeed(results)


@dataclass
class CrashImage:
    """The spool directory as a crash at one point leaves it."""

    path: Path
    # What the agent had delivered before the crash.
    delivered: list[tuple[str, Address]]
    # The queue ids whose enqueue had been acknowledged (the 250 sent).
    acknowledged: list[str]


class CrashAt:
    """A fault hook that takes a ``CrashImage`` each time ``point`` comes."""

    def __init__(self, point: str, spool_dir: Path, images_dir: Path) -> None:
        self.point = point
        self.spool_dir = spool_dir
        self.images_dir = images_dir
        self.images: list[CrashImage] = []
        self.seen: list[str] = []
        self.agent = Agent()
        # The client's messages, in the order they are committed.
        self.client_messages: list[str] = []
        # Inode numbers a scenario noted, by queue id.
        self.inodes: dict[str, int] = {}

    def acknowledged(self) -> list[str]:
        """
        The client's messages whose commit has returned.  The server sends
        the 250 in the same reactor turn, before the spool does anything
        else, so a crash at any later point comes after the 250.
        """
        return self.client_messages[: self.seen.count("committed")]

    def __call__(self, point: str) -> None:
        if point == self.point:
            image = self.images_dir / f"{point}-{len(self.images)}"
            shutil.copytree(self.spool_dir, image)
            self.images.append(
                CrashImage(image, list(self.agent.delivered), self.acknowledged())
            )
        self.seen.append(point)


def make_spool(
    path: Path,
    clock: Clock,
    agent: Agent,
    fault_hook: Callable[[str], None] | None = None,
) -> Spool:
    return Spool(
        str(path),
        clock,
        agent,
        "mx.example.net",
        min_retry=MIN_RETRY,
        max_retry=MAX_RETRY,
        lifetime=LIFETIME,
        delay_warning=0,
        run_io=synchronous_io,
        fault_hook=fault_hook,
    )


def envelope(message_id: str, *recipients: Address) -> Envelope:
    return Envelope(
        reverse_path=SENDER,
        recipients=[Recipient(address, Route.RELAY) for address in recipients],
        client=ClientInfo("192.0.2.1", 2525, helo="client.example.org"),
        message_id=message_id,
    )


def result_of(deferred: Deferred[_T]) -> _T:
    """The result of a Deferred that has already fired."""
    results: list[_T] = []
    failures: list[object] = []
    deferred.addCallbacks(results.append, failures.append)
    assert not failures, failures
    assert results, "the Deferred has not fired"
    return results[0]


def relay_scenario(spool: Spool, clock: Clock, hook: CrashAt) -> None:
    """M1 to bob and carol: bob at once, carol deferred once, then removed."""
    hook.agent.script = {"carol": [BUSY, DELIVERED]}
    hook.client_messages.append("M1")
    assert result_of(spool.enqueue(envelope("M1", BOB, CAROL), CONTENT)) == "M1"
    clock.advance(MAX_RETRY)


def bounce_scenario(spool: Spool, clock: Clock, hook: CrashAt) -> None:
    """M2 to dave, refused for good: a report to alice, then both removed."""
    hook.agent.script = {"dave": [NO_SUCH_USER]}
    hook.client_messages.append("M2")
    assert result_of(spool.enqueue(envelope("M2", DAVE), CONTENT)) == "M2"
    clock.advance(MAX_RETRY)


# The reuse scenario's M1 is longer than its M3, which is written over M1's
# kept file: the end of M1 that M3 does not overwrite must be cut off, and
# OLD_LINE shows it if it ever comes back.
OLD_LINE = b"An old line of M1.\r\n"
FIRST = b"From: alice@example.org\r\nSubject: first\r\n\r\n" + OLD_LINE * 100
THIRD = b"From: alice@example.org\r\nSubject: third\r\n\r\nNew body.\r\n"


def reuse_scenario(spool: Spool, clock: Clock, hook: CrashAt) -> None:
    """
    M4 to carol, deferred: it stays queued.  M1 to bob, delivered and
    removed: its file is kept in free/.  M3 to dave, written over M1's file,
    then deferred.
    """
    hook.agent.script = {"carol": [BUSY], "dave": [BUSY]}
    hook.client_messages.append("M4")
    assert result_of(spool.enqueue(envelope("M4", CAROL), CONTENT)) == "M4"
    hook.client_messages.append("M1")
    assert result_of(spool.enqueue(envelope("M1", BOB), FIRST)) == "M1"
    assert hook.agent.delivered == [("M1", BOB)]
    hook.inodes["M1"] = (Path(spool.store.free) / "M1").stat().st_ino
    hook.client_messages.append("M3")
    assert result_of(spool.enqueue(envelope("M3", DAVE), THIRD)) == "M3"


Scenario = Callable[[Spool, Clock, CrashAt], None]


def crash_images(tmp_path: Path, point: str, scenario: Scenario) -> CrashAt:
    """Run ``scenario`` once, taking a crash image at every ``point``."""
    spool_dir = tmp_path / "spool"
    images = tmp_path / "images"
    images.mkdir(parents=True)
    hook = CrashAt(point, spool_dir, images)
    clock = Clock()
    spool = make_spool(spool_dir, clock, hook.agent, fault_hook=hook)
    spool.startService()
    scenario(spool, clock, hook)
    result_of(spool.stopService())
    return hook


@dataclass
class Recovered:
    """A crash image after a fresh spool recovered it, then drained it."""

    # Queue id -> the envelope right after recovery.
    messages: dict[str, QueuedMessage]
    # Queue id -> the content the store reads right after recovery.
    contents: dict[str, bytes]
    # The files recovery left in tmp/.
    leftovers: list[str]
    agent: Agent


def recover(image: CrashImage, script: dict[str, list[Reply]]) -> Recovered:
    """Recover ``image`` as a restart would, note what it holds, then let a
    fresh spool deliver all of it."""
    store = SpoolStore(str(image.path))
    found, _ = store.recover()
    messages = {item.message_id: store.load(item.message_id) for item in found}
    contents = {name: store.read_content(name) for name in messages}
    leftovers = sorted(entry.name for entry in (image.path / "tmp").iterdir())

    clock = Clock()
    agent = Agent(script={k: list(v) for k, v in script.items()})
    spool = make_spool(image.path, clock, agent)
    spool.startService()
    assert spool.recovery is not None
    assert result_of(spool.recovery) == len(messages)
    for _ in range(DRAIN_STEPS):
        if not store.ids():
            break
        clock.advance(MAX_RETRY)
    assert store.ids() == []
    result_of(spool.stopService())
    # The next start removed what the first recovery left in tmp/.
    assert list((image.path / "tmp").iterdir()) == []
    return Recovered(messages, contents, leftovers, agent)


def assert_gone_or_whole(recovered: Recovered, known: dict[str, bytes]) -> None:
    """
    Each message after recovery has its envelope and all of its content,
    for the client's messages the content in ``known``.  Nothing half
    written is left in tmp/: only the newer envelope of a client's message
    whose removal a crash cut short, for the next start to remove.
    """
    for name in recovered.leftovers:
        message_id, _, kind = name.partition(".")
        assert kind == "orphan", name
        assert message_id in known and message_id not in recovered.messages, name
    for message_id, message in recovered.messages.items():
        content = recovered.contents[message_id]
        assert message.size == len(content), message_id
        if message_id in known:
            assert content == known[message_id]


# The relay scenario, point by point: whether M1 survives the crash, and which
# recipients get it twice (delivered before the crash, again after it).
RELAY_EXPECTED = {
    # M1's file is still in free/, which is never delivered; no 250 was sent.
    "written": (False, set()),
    # Durable now, but still in free/.
    "synced": (False, set()),
    # The file is message/M1, the 250 not yet sent: kept, delivered once.
    "renamed": (True, set()),
    "committed": (True, set()),
    # RFC 5321 section 6.1: bob was delivered, the rewrite not yet renamed.
    "rewrite": (True, {BOB}),
    "rewritten": (True, set()),
    # Carol was delivered, the message file not yet moved to free/.
    "remove": (True, {CAROL}),
    # The message file is in free/ for good; its newer envelope, left in
    # envelope/, goes to tmp/ and is removed at the next start.
    "removed": (False, set()),
}


@pytest.mark.parametrize("point", POINTS)
def test_crash_in_relay_leaves_no_message_or_a_whole_one(
    tmp_path: Path, point: str
) -> None:
    """A crash at each fault point leaves M1 absent or whole, never loses an
    acknowledged recipient, and duplicates only inside the section 6.1 window."""
    hook = crash_images(tmp_path, point, relay_scenario)
    (image,) = hook.images

    recovered = recover(image, {})

    assert_gone_or_whole(recovered, {"M1": CONTENT})
    survives, duplicates = RELAY_EXPECTED[point]
    assert ("M1" in recovered.messages) is survives
    before = {address for _, address in image.delivered}
    after = {address for _, address in recovered.agent.delivered}
    assert before & after == duplicates
    if "M1" in image.acknowledged or survives:
        assert before | after == {BOB, CAROL}
    else:
        assert before | after == set()
    assert ("M1" in image.acknowledged) is (
        POINTS.index(point) > POINTS.index("committed")
    )
    for content in recovered.agent.contents.get("M1", []):
        assert content == CONTENT


def test_rewrite_crash_keeps_the_old_envelope(tmp_path: Path) -> None:
    """A crash between writing and renaming a new envelope recovers the old
    one, with both recipients still pending."""
    hook = crash_images(tmp_path, "rewrite", relay_scenario)

    recovered = recover(hook.images[0], {})

    states = [r.state for r in recovered.messages["M1"].recipients]
    assert states == [RecipientState.PENDING, RecipientState.PENDING]


def test_rewritten_crash_keeps_the_new_envelope(tmp_path: Path) -> None:
    """A crash after the rename recovers the rewritten envelope: bob
    delivered, carol pending."""
    hook = crash_images(tmp_path, "rewritten", relay_scenario)

    recovered = recover(hook.images[0], {})

    states = [r.state for r in recovered.messages["M1"].recipients]
    assert states == [RecipientState.DELIVERED, RecipientState.PENDING]


def test_relay_scenario_reaches_every_fault_point(tmp_path: Path) -> None:
    """The relay scenario passes each fault point exactly once, so the
    point-by-point test crashes at every one of them."""
    hook = crash_images(tmp_path, "none", relay_scenario)

    assert hook.seen == list(POINTS)


# The bounce scenario: the reports alice gets in all (before the crash and
# after recovery), by point and occurrence.  The spool removes M2 only after
# its report is committed and, being due at once, delivered, so a crash in
# between finds M2 still pending: it is refused again and reported again.
BOUNCE_REPORTS = {
    # M2's file still in free/: no 250, nothing to report.
    ("written", 0): 0,
    ("synced", 0): 0,
    # M2 is message/M2 (and acknowledged after "committed"): reported once.
    ("renamed", 0): 1,
    ("committed", 0): 1,
    # The report still in free/, never sent; M2's retry reports once.
    ("written", 1): 1,
    ("synced", 1): 1,
    # The report committed but not sent: it goes out, and M2's retry too.
    ("renamed", 1): 2,
    ("committed", 1): 2,
    # The report sent, not yet removed: sent again, and M2's retry reports.
    ("remove", 0): 3,
    # The report moved to free/, M2 not: M2's retry reports a second time.
    ("removed", 0): 2,
    # M2 not yet removed: its retry reports a second time.
    ("remove", 1): 2,
    # M2 moved to free/ for good: the one report is all.
    ("removed", 1): 1,
}


@pytest.mark.parametrize("point", POINTS)
def test_crash_around_a_report_loses_neither_message_nor_report(
    tmp_path: Path, point: str
) -> None:
    """At every occurrence of each point in the bounce scenario, recovery
    leaves whole messages only, and an acknowledged M2 is reported to its
    sender at least once, more often only in the windows the table names."""
    hook = crash_images(tmp_path, point, bounce_scenario)

    for occurrence, image in enumerate(hook.images):
        recovered = recover(image, {"dave": [NO_SUCH_USER]})

        assert_gone_or_whole(recovered, {"M2": CONTENT})
        delivered = image.delivered + recovered.agent.delivered
        reports = [address for _, address in delivered if address == SENDER]
        assert len(reports) == BOUNCE_REPORTS[point, occurrence]
        if "M2" in image.acknowledged:
            assert reports
        assert DAVE not in [address for _, address in delivered]
    assert len(hook.images) == sum(1 for p, _ in BOUNCE_REPORTS if p == point)


# The reuse scenario, crashed during M3's commit (after M4's and M1's):
# whether M3 survives.  M1 is delivered and gone at every one of these points.
REUSE_SURVIVES = {
    # M3's octets are in M1's old file, still in free/: never delivered, as
    # neither M1 nor M3; no 250 was given for M3.
    "written": False,
    "synced": False,
    # The reused file is message/M3, the 250 not yet sent: delivered once.
    "renamed": True,
    "committed": True,
}


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_crash_while_a_kept_file_is_reused_never_brings_back_its_message(
    tmp_path: Path, point: str
) -> None:
    """A crash while M3 is written over the file M1 left in free/ never
    delivers M1 again, leaves M3 absent or whole with its own content, and
    loses no acknowledged message."""
    hook = crash_images(tmp_path, point, reuse_scenario)
    # M3 took M1's file, cut to M3's length; no file was made for it.
    live = tmp_path / "spool"
    assert (live / "message" / "M3").stat().st_ino == hook.inodes["M1"]
    assert list((live / "free").iterdir()) == []
    # The commits of M4, M1, then M3: the last image is M3's.
    assert len(hook.images) == 3
    image = hook.images[-1]
    assert image.acknowledged == ["M4", "M1"]
    assert image.delivered == [("M1", BOB)]
    survives = REUSE_SURVIVES[point]
    if not survives:
        kept = (image.path / "free" / "M1").read_bytes()
        assert kept.endswith(THIRD) and OLD_LINE not in kept

    recovered = recover(image, {})

    assert_gone_or_whole(recovered, {"M1": FIRST, "M3": THIRD, "M4": CONTENT})
    assert "M1" not in recovered.messages
    assert ("M3" in recovered.messages) is survives
    assert "M4" in recovered.messages
    assert "M1" not in recovered.agent.contents
    delivered = recovered.agent.delivered
    assert ("M4", CAROL) in delivered
    assert delivered.count(("M3", DAVE)) == (1 if survives else 0)
    for contents in recovered.agent.contents.values():
        assert all(OLD_LINE not in content for content in contents)
    assert recovered.agent.contents.get("M3", [THIRD]) == [THIRD]


def test_recovery_removes_what_it_reports_removed(tmp_path: Path) -> None:
    """Every message file recovery reports as removed is gone from message/
    afterwards and kept in corrupt/: one that is no message file, one cut
    short, one whose envelope is not JSON, and a whole one whose newer
    envelope is not JSON."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    whole = QueuedMessage.from_envelope(
        "NEWER", envelope("NEWER", BOB), len(CONTENT), 0.0
    )
    broken = {
        "NOTONE": b"{not json",
        "SHORT": MESSAGE_MAGIC + b"500\n{",
        "NOJSON": message_head(b"{not json") + CONTENT,
        "NEWER": message_head(whole.to_json()) + CONTENT,
    }
    for name, data in broken.items():
        (tmp_path / "message" / name).write_bytes(data)
    (tmp_path / "envelope" / "NEWER").write_bytes(b"{not json")

    found, removed = store.recover()

    assert found == []
    assert removed == [f"message/{name}" for name in sorted(broken)]
    for name, data in broken.items():
        assert not (tmp_path / "message" / name).exists()
        assert not (tmp_path / "envelope" / name).exists()
        # Set aside for the operator, never deleted unread.
        assert (tmp_path / "corrupt" / f"{name}.message").read_bytes() == data
    assert (tmp_path / "corrupt" / "NEWER.envelope").read_bytes() == b"{not json"


def test_recovery_removes_an_old_message_it_reports_removed(tmp_path: Path) -> None:
    """A message of the earlier layout (envelope/ and content/) whose
    envelope cannot be read is reported removed, is gone from both
    directories afterwards, and is kept in corrupt/."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    (tmp_path / "content").mkdir()
    (tmp_path / "envelope" / "BROKEN").write_bytes(b"{not json")
    (tmp_path / "content" / "BROKEN").write_bytes(CONTENT)

    found, removed = store.recover()

    assert found == []
    assert removed == ["envelope/BROKEN"]
    assert not (tmp_path / "envelope" / "BROKEN").exists()
    assert not (tmp_path / "content" / "BROKEN").exists()
    # Set aside for the operator, never deleted unread.
    assert (tmp_path / "corrupt" / "BROKEN.envelope").read_bytes() == b"{not json"
    assert (tmp_path / "corrupt" / "BROKEN.content").read_bytes() == CONTENT


class OneMailbox:
    """Every address is one local mailbox, ``box``."""

    domain = "example.net"
    local_part = "box"

    def maildir(self, root: str) -> str:
        return f"{root}/box"

    def resolve(self, address: Address) -> list[OneMailbox]:
        return [self]


def failing_disk(work: Callable[[], _T]) -> Deferred[_T]:
    """An I/O runner on a disk that fails every write."""
    return fail(OSError(28, "No space left on device"))


def test_a_failed_local_copy_is_queued_not_refused(tmp_path: Path) -> None:
    """When the local copy cannot be written, the whole message is queued and
    accepted; every recipient, the local one included, gets it exactly once."""
    clock = Clock()
    agent = Agent()
    spool = make_spool(tmp_path / "spool", clock, agent)
    spool.startService()
    local = LocalStore(str(tmp_path / "mail"), OneMailbox(), GroupCommit(failing_disk))
    router = Router(local, spool)
    postmaster = Address("postmaster", "example.net")
    mixed = Envelope(
        reverse_path=SENDER,
        recipients=[Recipient(BOB, Route.RELAY), Recipient(postmaster, Route.LOCAL)],
        client=ClientInfo("192.0.2.1", 2525, helo="client.example.org"),
        message_id="M3",
    )

    replies: list[object] = []
    router.receive(mixed, CONTENT).addBoth(replies.append)
    clock.advance(LIFETIME)

    assert len(replies) == 1
    assert isinstance(replies[0], Reply) and replies[0].is_positive
    assert sorted(str(address) for _, address in agent.delivered) == sorted(
        [str(BOB), str(postmaster)]
    )
    result_of(spool.stopService())
