"""How the composition root turns config into component settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from sipis.config import load_config_text
from sipis.daemon import endpoint_config

BASE = Path("/tmp")


def test_empty_upstream_allow_means_anywhere() -> None:
    """The documented default: with no upstream_allow, providers anywhere are reachable."""
    config = load_config_text("api: {tls: {enabled: false}}", base_dir=BASE)
    allowed = endpoint_config(config).upstream_allow
    for address in ("203.0.113.7", "10.1.2.3", "2001:db8::1"):
        assert any(ipaddress.ip_address(address) in net for net in allowed)


def test_upstream_allow_restricts_when_given() -> None:
    """A list restricts sending to exactly those networks."""
    config = load_config_text(
        "api: {tls: {enabled: false}}\nsip: {upstream_allow: ['192.0.2.0/24']}", base_dir=BASE)
    allowed = endpoint_config(config).upstream_allow
    assert [str(n) for n in allowed] == ["192.0.2.0/24"]
