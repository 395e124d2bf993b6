"""
How clients are told apart when they are counted: connection caps
(mailx.protocol) and the AUTH failure throttle (mailx.auth).
"""

from __future__ import annotations

import ipaddress

# IPv6 clients are counted by their /64: RFC 7421 section 1 makes 64 bits the
# interface identifier, so one host may use any address of a /64.
IPV6_PREFIX = 64


def client_key(address: str) -> str:
    """
    What a client is counted by: its IPv4 address (also when it arrives
    mapped into IPv6), or its IPv6 /64.  Anything else counts as itself.
    """
    if ":" not in address:
        # IPv4, as the reactor writes it, is its own key: the common case,
        # with nothing to parse.
        return address
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, IPV6_PREFIX), strict=False))
    return str(parsed)
