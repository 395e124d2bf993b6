"""
Batches of blocking work, one batch at a time, off the reactor thread.

``GroupJob`` is the Twisted side of group commit (``mailx.durable``): items
submitted while a batch is being made durable wait, and go together in the
next batch, so messages that arrive together share one sync.  The spool
commits and removes messages this way, and the server writes Maildirs so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

_T = TypeVar("_T")
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class IORunner(Protocol):
    """Runs blocking work away from the reactor thread."""

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]: ...


class GroupJob(Generic[_Item, _Result]):
    """
    Runs submitted items in batches through one blocking ``work`` call at a
    time: items that arrive while a batch runs wait and form the next batch.
    ``work`` returns one result per item, an ``OSError`` for an item that
    failed alone; if it raises, every item of its batch fails.
    """

    def __init__(
        self,
        run_io: IORunner,
        work: Callable[[list[_Item]], Sequence[_Result | OSError]],
    ) -> None:
        self._run_io = run_io
        self._work = work
        self._waiting: list[tuple[_Item, Deferred[_Result]]] = []
        # Fires when the batch under way is done; None when none is.
        self.running: Deferred[None] | None = None
        self._drain_waiters: list[Deferred[None]] = []

    def drained(self) -> Deferred[None]:
        """Fire once no batch is under way and no item waits."""
        if self.running is None and not self._waiting:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def submit(self, item: _Item) -> Deferred[_Result]:
        """Fire with the item's result once its batch is done."""
        done: Deferred[_Result] = Deferred()
        self._waiting.append((item, done))
        if self.running is None:
            self._next_batch()
        return done

    def _next_batch(self) -> None:
        batch, self._waiting = self._waiting, []
        items = [item for item, _ in batch]
        # Set before the work starts: an I/O runner may finish it at once,
        # and items submitted meanwhile must wait for the next batch.
        running: Deferred[None] = Deferred()
        self.running = running

        def report(results: Sequence[_Result | OSError]) -> None:
            for (_, done), result in zip(batch, results, strict=True):
                if isinstance(result, OSError):
                    done.errback(Failure(result))
                else:
                    done.callback(result)

        def failed(failure: Failure) -> None:
            for _, done in batch:
                done.errback(failure)

        def finished(_: object) -> None:
            self.running = None
            running.callback(None)
            if self._waiting and self.running is None:
                self._next_batch()
            elif self.running is None:
                waiters, self._drain_waiters = self._drain_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        work = self._run_io(lambda: self._work(items))
        work.addCallbacks(report, failed).addBoth(finished)
