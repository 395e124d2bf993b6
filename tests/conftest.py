"""Fixtures shared by the test modules."""

from tests.mailxproc import mailx_server

__all__ = ["mailx_server"]
