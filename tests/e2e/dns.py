"""
The loopback DNS server of ``tests.dnsserver`` as a process of its own, for
tests whose mailx processes must resolve names while the test itself blocks::

    python -m tests.e2e.dns --zones zones.json --host 127.0.0.1 --lifetime 600

``zones.json`` maps each origin to its records in ``tests.dnsserver.Zone``'s
data form: ``{"example.org": {"example.org": [["MX", 0, "mxa.example.org"]],
"mxa.example.org": [["A", "127.0.0.2"]]}}``.  The server listens on UDP on a
port the kernel picks and prints ``listening <host> <port>`` once it is ready.
It stops on SIGTERM, or by itself after ``--lifetime`` seconds so that a test
that died cannot leave it running.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor

from tests.dnsserver import DNSServer, Zone

# A whole end-to-end module runs in a few minutes; this bounds a forgotten
# server (our choice).
DEFAULT_LIFETIME = 900.0


def zones_from_json(text: str) -> list[Zone]:
    """The zones of a JSON document mapping origins to their records."""
    data = json.loads(text)
    return [
        Zone(origin, {name: [tuple(r) for r in rs] for name, rs in records.items()})
        for origin, records in data.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.dns")
    parser.add_argument("--zones", required=True, help="the zones as JSON")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME)
    arguments = parser.parse_args(argv)
    with open(arguments.zones, encoding="utf-8") as file:
        zones = zones_from_json(file.read())

    running: Any = reactor
    server = DNSServer(zones, host=arguments.host, reactor=running)
    port = server.start()
    print(f"listening {arguments.host} {port}", flush=True)
    running.callLater(arguments.lifetime, running.stop)
    running.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
