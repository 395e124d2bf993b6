"""Tests for mailx.maildir: the stored form and atomic Maildir delivery."""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

import pytest

from mailx.maildir import deliver, to_stored_form, unique_name

NAME = re.compile(r"[0-9]+\.M[0-9]+P[0-9]+Q[0-9]+\.[^/]+")


def listing(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_stored_form() -> None:
    """The stored form starts with Return-Path and Delivered-To and uses LF."""
    content = b"Subject: hi\r\n\r\nline one\r\nline two\r\n"

    stored = to_stored_form(content, "alice@example.org", "bob@example.com")

    assert stored == (
        b"Return-Path: <alice@example.org>\n"
        b"Delivered-To: bob@example.com\n"
        b"Subject: hi\n\nline one\nline two\n"
    )


def test_stored_form_null_reverse_path() -> None:
    """The null reverse path is stored as Return-Path: <>."""
    stored = to_stored_form(b"\r\n", "", "postmaster@example.com")

    assert stored.startswith(b"Return-Path: <>\nDelivered-To: postmaster@")


def test_stored_form_keeps_lone_carriage_returns() -> None:
    """Only CRLF pairs become LF; a CR alone is content and is kept."""
    stored = to_stored_form(b"a\rb\r\n", "a@b", "c@d")

    assert stored.endswith(b"\na\rb\n")


def test_stored_form_utf8_addresses() -> None:
    """SMTPUTF8 addresses are written in UTF-8."""
    stored = to_stored_form(b"\r\n", "jos\u00e9@example.org", "b@example.com")

    assert stored.startswith("Return-Path: <jos\u00e9@example.org>\n".encode())


@pytest.mark.parametrize("bad", ["a@b\r\nBcc: x@y", "a@b\nX: y"])
def test_stored_form_refuses_line_breaks(bad: str) -> None:
    """An address with a line break cannot inject header fields."""
    with pytest.raises(ValueError):
        to_stored_form(b"\r\n", bad, "b@example.com")
    with pytest.raises(ValueError):
        to_stored_form(b"\r\n", "a@example.com", bad)


def test_unique_name_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name is seconds.M<microseconds>P<pid>Q<counter>.<host>, escaped."""
    monkeypatch.setattr(socket, "gethostname", lambda: "mx/1:a")

    name = unique_name(1700000000.25)

    assert re.fullmatch(
        rf"1700000000\.M250000P{os.getpid()}Q[0-9]+\.mx\\057" r"1\\072a", name
    )


def test_unique_names_differ() -> None:
    """Two names made at the same instant differ."""
    assert unique_name(1.0) != unique_name(1.0)


def test_deliver_creates_maildir(tmp_path: Path) -> None:
    """Delivery into a missing Maildir creates it with tmp, new and cur at 0700."""
    box = tmp_path / "mail" / "example.com" / "bob"

    path = deliver(str(box), b"Subject: hi\n\nbody\n")

    assert listing(box) == ["cur", "new", "tmp"]
    for sub in ("cur", "new", "tmp"):
        assert mode(box / sub) == 0o700
    assert mode(box) == 0o700
    assert Path(path).parent == box / "new"


def test_deliver_writes_exact_content(tmp_path: Path) -> None:
    """The message appears in new/ with exactly its content; tmp/ is empty."""
    box = tmp_path / "bob"
    content = b"Return-Path: <a@b>\nSubject: x\n\n\x00\xff binary and all\n"

    path = deliver(str(box), content)

    (name,) = listing(box / "new")
    assert path == str(box / "new" / name)
    assert NAME.fullmatch(name)
    assert (box / "new" / name).read_bytes() == content
    assert mode(box / "new" / name) == 0o600
    assert listing(box / "tmp") == []
    assert listing(box / "cur") == []


def test_deliver_twice(tmp_path: Path) -> None:
    """Two deliveries to an existing Maildir give two messages in new/."""
    box = tmp_path / "bob"

    first = deliver(str(box), b"one\n")
    second = deliver(str(box), b"two\n")

    assert first != second
    assert len(listing(box / "new")) == 2
    assert Path(first).read_bytes() == b"one\n"
    assert Path(second).read_bytes() == b"two\n"


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_file_where_a_subdirectory_should_be(tmp_path: Path, sub: str) -> None:
    """A file in place of tmp, new or cur makes delivery fail with no message."""
    box = tmp_path / "bob"
    box.mkdir()
    (box / sub).write_bytes(b"in the way")

    with pytest.raises(OSError):
        deliver(str(box), b"message\n")

    for other in ("tmp", "new", "cur"):
        if other != sub and (box / other).is_dir():
            assert listing(box / other) == []


def test_file_where_the_domain_directory_should_be(tmp_path: Path) -> None:
    """A file in place of the domain directory makes delivery fail."""
    (tmp_path / "example.com").write_bytes(b"in the way")

    with pytest.raises(OSError):
        deliver(str(tmp_path / "example.com" / "bob"), b"message\n")

    assert (tmp_path / "example.com").read_bytes() == b"in the way"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_root_not_writable(tmp_path: Path) -> None:
    """A mail root that may not be written makes delivery fail."""
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError):
            deliver(str(tmp_path / "bob"), b"message\n")
    finally:
        tmp_path.chmod(0o700)

    assert listing(tmp_path) == []


def failing(*args: object) -> None:
    raise OSError(5, "Input/output error")


def test_failed_file_sync_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the message cannot be synced, tmp/ and new/ are left empty."""
    box = tmp_path / "bob"
    deliver(str(box), b"first\n")
    (first,) = listing(box / "new")
    monkeypatch.setattr(os, "fsync", failing)

    with pytest.raises(OSError, match="Input/output error"):
        deliver(str(box), b"second\n")

    assert listing(box / "tmp") == []
    assert listing(box / "new") == [first]


def test_failed_rename_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the rename into new/ fails, the file written in tmp/ is removed."""
    box = tmp_path / "bob"
    monkeypatch.setattr(os, "rename", failing)

    with pytest.raises(OSError, match="Input/output error"):
        deliver(str(box), b"message\n")

    assert listing(box / "tmp") == []
    assert listing(box / "new") == []


def test_failed_directory_sync_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If new/ cannot be synced after the rename, the message is taken back."""
    box = tmp_path / "bob"
    deliver(str(box), b"first\n")
    (first,) = listing(box / "new")
    real_fsync = os.fsync

    def fsync_files_only(descriptor: int) -> None:
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            failing()
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync_files_only)

    with pytest.raises(OSError, match="Input/output error"):
        deliver(str(box), b"second\n")

    assert listing(box / "tmp") == []
    assert listing(box / "new") == [first]


def test_a_removed_mail_root_is_made_again_for_the_user_only(tmp_path: Path) -> None:
    """If the mail root went away while mailx runs, the next delivery makes
    it, and the domain directory, readable by the mailx user only."""
    root = tmp_path / "mail"
    path = deliver(str(root / "example.org" / "bob"), b"x\n")
    assert Path(path).read_bytes() == b"x\n"
    for directory in (root, root / "example.org", root / "example.org" / "bob"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
