"""The outbound agent built from the configuration."""

from __future__ import annotations

import dataclasses

from twisted.internet.testing import MemoryReactorClock

from mailx.config import Config, DeliveryConfig, DNSConfig, HostPort, ServerConfig
from mailx.outbound import agent_from_config, listening_addresses


def config(**server: object) -> Config:
    return dataclasses.replace(
        Config(),
        server=dataclasses.replace(ServerConfig(), **server),  # type: ignore[arg-type]
        dns=DNSConfig(servers=(HostPort("127.0.0.1", 5353),), timeout=3.0),
        delivery=DeliveryConfig(port=2525, max_hosts=2, data_end_timeout=42.0),
    )


def test_listening_addresses_from_endpoints() -> None:
    """Interface addresses of every listener count as mailx's own."""
    got = listening_addresses(
        config(
            listen=("tcp:25:interface=192.0.2.1", r"tcp6:25:interface=2001\:db8\:\:1"),
            submission=("tcp:587:interface=0.0.0.0",),
            smtps=("tcp:465",),
        )
    )
    # A listener on every interface gives the unspecified address, once.
    assert got == ["192.0.2.1", "2001:db8::1", "0.0.0.0"]


def test_agent_from_config_takes_delivery_and_dns() -> None:
    """The agent is set up from delivery and dns, with its own addresses."""
    agent = agent_from_config(MemoryReactorClock(), config(hostname="mx.example.test"))
    assert agent.mx.is_self("MX.example.test.", [])
    assert agent.mx.is_self("other", ["127.0.0.1"])
    assert not agent.mx.is_self("other", ["127.0.0.2"])
