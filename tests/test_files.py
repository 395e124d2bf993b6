"""read_regular_file: files operators edit, read without waiting on a FIFO."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from mailx.config import ConfigError, load_config
from mailx.files import open_regular_for_append, read_regular_file
from mailx.local import LocalRecipients

# A read that would wait for a FIFO's writer is given this long to show it.
WAIT = 5.0


def read_in_a_thread(path: Path) -> list[object]:
    """Read ``path`` in a thread; what it returned or raised, [] if it hangs."""
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(read_regular_file(str(path)))
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(WAIT)
    return outcome


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    """A regular file's bytes come back whole."""
    path = tmp_path / "aliases"
    path.write_bytes(b"sales: bob\n" * 10000)
    assert read_regular_file(str(path)) == b"sales: bob\n" * 10000


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO where the file should be is refused without waiting for a writer."""
    path = tmp_path / "aliases"
    os.mkfifo(path)
    (outcome,) = read_in_a_thread(path)
    assert isinstance(outcome, OSError)
    assert outcome.strerror == "not a regular file"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    """A directory where the file should be is refused with the same words."""
    with pytest.raises(OSError, match="not a regular file"):
        read_regular_file(str(tmp_path))


def test_an_aliases_file_replaced_by_a_fifo_keeps_the_old_aliases(
    tmp_path: Path,
) -> None:
    """On reload, a FIFO in place of the aliases file is a ConfigError."""
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: bob\n")
    config = tmp_path / "mailx.toml"
    config.write_text(
        f'[domains]\nlocal = ["example.org"]\n'
        f'[mailboxes]\nroot = "{tmp_path}/mail"\nusers = ["bob"]\n'
        f'aliases = "{aliases}"\n'
    )
    recipients = LocalRecipients(load_config(str(config)))
    aliases.unlink()
    os.mkfifo(aliases)
    with pytest.raises(ConfigError, match="not a regular file"):
        recipients.reload_aliases()


def test_the_mail_log_is_opened_to_append_and_created(tmp_path: Path) -> None:
    """A missing mail log is created; an existing one is appended to."""
    path = tmp_path / "mail.log"
    with open_regular_for_append(str(path)) as log:
        log.write("one\n")
    with open_regular_for_append(str(path)) as log:
        log.write("two\n")
    assert path.read_text() == "one\ntwo\n"


def test_a_fifo_as_the_mail_log_is_refused_even_with_a_reader(tmp_path: Path) -> None:
    """A FIFO in the mail log's place is refused at once, reader or not."""
    path = tmp_path / "mail.log"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(OSError, match="not a regular file"):
            open_regular_for_append(str(path))
    finally:
        os.close(reader)
    with pytest.raises(OSError, match="not a regular file"):
        open_regular_for_append(str(path))
