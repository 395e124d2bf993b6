"""mailx: a mail exchanger built on Twisted."""

__version__ = "0.1.0"
