"""The twistd plugin: ``twistd mailx``. Imports nothing heavy."""

from twisted.application.service import ServiceMaker

mailx = ServiceMaker(
    "mailx", "mailx.tap", "mailx, a mail exchanger (SMTP MX server)", "mailx"
)
