"""
The mail log: one line per business event, for operators to read and parse.

Every event goes through ``twisted.logger`` in the ``mailx.mail`` namespace,
with named fields.  Its text is an interface: keep the wording stable, and
change the tests that pin it when it must change.  Credentials never appear.
"""

from __future__ import annotations

from twisted.logger import Logger

MAIL_NAMESPACE = "mailx.mail"

maillog = Logger(namespace=MAIL_NAMESPACE)
