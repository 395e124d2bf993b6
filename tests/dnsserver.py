"""
An authoritative DNS server on loopback for tests, built on twisted.names.

Zones are given as Python data (``Zone``) or as zone-file text
(``Zone.from_text``).  Names can be made to answer SERVFAIL or REFUSED, or to
never answer at all, so the temporary-failure paths can be tested.  The server
listens on UDP only, on 127.0.0.1 (or another loopback address) and a port the
kernel picks::

    server = DNSServer([Zone("example.test", {"example.test": [("MX", 10,
        "mx.example.test")], "mx.example.test": [("A", "127.0.0.2")]})])
    port = server.start()
    ...
    yield server.stop()

Every test that resolves names points mailx at ``("127.0.0.1", port)``; nothing
here ever consults the machine's resolver.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.names import authority, dns, server

# A record as data: its type name, then its fields, e.g. ("A", "127.0.0.2"),
# ("AAAA", "::1"), ("MX", 10, "mx.example.test"), ("MX", 0, "."),
# ("CNAME", "other.example.test"), ("TXT", "some text").
RecordData = tuple[Any, ...]

DEFAULT_TTL = 300


class Behaviour(enum.Enum):
    """How the server treats queries for a name that is not simply served."""

    SERVFAIL = dns.ESERVER
    REFUSED = dns.EREFUSED
    # The query is read and dropped: the client times out.
    SILENT = -1


def _name(text: str) -> bytes:
    return text.rstrip(".").lower().encode("ascii")


def _record(data: RecordData, ttl: int) -> Any:
    kind, *fields = data
    if kind == "A":
        return dns.Record_A(fields[0], ttl=ttl)
    if kind == "AAAA":
        return dns.Record_AAAA(fields[0], ttl=ttl)
    if kind == "MX":
        return dns.Record_MX(int(fields[0]), _name(fields[1]), ttl=ttl)
    if kind == "CNAME":
        return dns.Record_CNAME(_name(fields[0]), ttl=ttl)
    if kind == "TXT":
        return dns.Record_TXT(*(f.encode() for f in fields), ttl=ttl)
    raise ValueError(f"record type {kind!r} is not supported here")


class _DataAuthority(authority.FileAuthority):
    """A zone given as a dict; the filename argument carries the Zone."""

    def loadFile(self, zone: Zone) -> None:
        origin = _name(zone.origin)
        soa = dns.Record_SOA(
            mname=b"ns." + origin,
            rname=b"hostmaster." + origin,
            serial=1,
            minimum=zone.ttl,
            expire=zone.ttl,
            ttl=zone.ttl,
        )
        self.soa = (origin, soa)  # type: ignore[assignment]
        self.records: dict[bytes, list[Any]] = {origin: [soa]}  # type: ignore[assignment]
        for owner, records in zone.records.items():
            key = _name(owner)
            entries = self.records.setdefault(key, [])
            entries.extend(_record(r, zone.ttl) for r in records)


class _TextAuthority(authority.BindAuthority):
    """A zone given as zone-file text; the filename argument is (origin, text)."""

    def loadFile(self, source: tuple[str, str]) -> None:
        origin, text = source
        self.origin = _name(origin) + b"."  # type: ignore[assignment]
        lines = text.encode("ascii").splitlines(True)
        lines = self.stripComments(lines)  # type: ignore[no-untyped-call]
        lines = self.collapseContinuations(lines)  # type: ignore[no-untyped-call]
        self.parseLines(lines)  # type: ignore[no-untyped-call]


class Zone:
    """One authoritative zone: its origin and the records at each name."""

    def __init__(
        self,
        origin: str,
        records: Mapping[str, Sequence[RecordData]],
        ttl: int = DEFAULT_TTL,
    ) -> None:
        self.origin = origin
        self.records = records
        self.ttl = ttl
        self._text: str | None = None

    @classmethod
    def from_text(cls, origin: str, text: str) -> Zone:
        """
        A zone from zone-file text (``$ORIGIN``, ``$TTL`` and records).  Write
        names inside records (MX and CNAME targets) in full with the final
        dot: twisted.names' BindAuthority qualifies owner names only.
        """
        zone = cls(origin, {})
        zone._text = text
        return zone

    def authority(self) -> Any:
        if self._text is not None:
            return _TextAuthority((self.origin, self._text))  # type: ignore[no-untyped-call]
        return _DataAuthority(self)  # type: ignore[no-untyped-call]


class _Factory(server.DNSServerFactory):
    def __init__(
        self, authorities: list[Any], behaviours: Mapping[bytes, Behaviour]
    ) -> None:
        super().__init__(authorities=authorities)  # type: ignore[no-untyped-call]
        self._behaviours = behaviours
        self.queries: list[tuple[str, str]] = []

    def _behaviour(self, name: bytes) -> Behaviour | None:
        labels = name.lower().split(b".")
        for start in range(len(labels)):
            found = self._behaviours.get(b".".join(labels[start:]))
            if found is not None:
                return found
        return None

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        self.queries.append((query.name.name.decode(), dns.QUERY_TYPES[query.type]))
        behaviour = self._behaviour(query.name.name)
        if behaviour is None:
            super().handleQuery(message, protocol, address)  # type: ignore[no-untyped-call]
            return
        if behaviour is Behaviour.SILENT:
            return
        response = dns.Message(
            id=message.id, answer=1, opCode=message.opCode, rCode=behaviour.value
        )
        response.queries = message.queries
        protocol.writeMessage(response, address)


class DNSServer:
    """An authoritative server for ``zones`` on a loopback address."""

    def __init__(
        self,
        zones: Iterable[Zone],
        behaviours: Mapping[str, Behaviour] | None = None,
        host: str = "127.0.0.1",
        reactor: Any = None,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host} is not a loopback address")
        self.host = host
        self._reactor: Any = reactor if reactor is not None else global_reactor
        wanted = {_name(n): b for n, b in (behaviours or {}).items()}
        self._factory = _Factory([z.authority() for z in zones], wanted)
        self._port: Any = None

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every (name, type) asked so far, in order."""
        return self._factory.queries

    def start(self) -> int:
        """Listen on UDP ``host``, port 0; return the port the kernel chose."""
        protocol = dns.DNSDatagramProtocol(self._factory)
        self._port = self._reactor.listenUDP(0, protocol, interface=self.host)
        port: int = self._port.getHost().port
        return port

    @property
    def servers(self) -> list[tuple[str, int]]:
        """The ``dns.servers`` list that points at this server."""
        return [(self.host, self._port.getHost().port)]

    def stop(self) -> Deferred[None]:
        """Stop listening."""
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)
