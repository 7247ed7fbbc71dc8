"""Which IP addresses a reference fetch may connect to.

:func:`address_refusal` is a pure function (no packets, no DNS): it names why an address is
refused, or returns ``None`` for a public unicast address. It is deliberately stricter than
``ipaddress``'s ``is_global``: explicit networks are checked first so that the reason is
precise, addresses embedding an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4) are
judged by the embedded address too, and anything ``is_global`` does not vouch for is refused.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_v4 = ipaddress.IPv4Network
_v6 = ipaddress.IPv6Network

# Instance metadata services. Checked before anything else so that the reason says so, even
# where the address also falls in a refused range (and 168.63.129.16, Azure's WireServer,
# does not: it is public address space).
CLOUD_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.IPv4Address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
        ipaddress.IPv4Address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.IPv4Address("169.254.169.123"),  # AWS time sync
        ipaddress.IPv4Address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.IPv4Address("192.0.0.192"),  # Oracle Cloud (legacy)
        ipaddress.IPv4Address("168.63.129.16"),  # Azure WireServer
        ipaddress.IPv6Address("fd00:ec2::254"),  # AWS (IPv6)
        ipaddress.IPv6Address("fd00:ec2::23"),  # AWS DNS (IPv6)
    }
)

# Ordered: the first match gives the reason. More specific networks come first.
_IPV4_TABLE: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_v4("0.0.0.0/32"), "unspecified"),
    (_v4("0.0.0.0/8"), "reserved ('this network')"),
    (_v4("127.0.0.0/8"), "loopback"),
    (_v4("10.0.0.0/8"), "private"),
    (_v4("172.16.0.0/12"), "private"),
    (_v4("192.168.0.0/16"), "private"),
    (_v4("100.64.0.0/10"), "shared address space (CGNAT)"),
    (_v4("169.254.0.0/16"), "link-local"),
    (_v4("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_v4("192.0.2.0/24"), "documentation"),
    (_v4("198.51.100.0/24"), "documentation"),
    (_v4("203.0.113.0/24"), "documentation"),
    (_v4("198.18.0.0/15"), "benchmarking"),
    (_v4("192.88.99.0/24"), "reserved (6to4 relay anycast)"),
    (_v4("224.0.0.0/4"), "multicast"),
    (_v4("255.255.255.255/32"), "broadcast"),
    (_v4("240.0.0.0/4"), "reserved"),
)

_IPV6_TABLE: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_v6("::/128"), "unspecified"),
    (_v6("::1/128"), "loopback"),
    (_v6("64:ff9b:1::/48"), "local-use NAT64"),
    (_v6("100::/64"), "reserved (discard-only)"),
    (_v6("2001::/32"), "Teredo"),
    (_v6("2001:2::/48"), "benchmarking"),
    (_v6("2001:db8::/32"), "documentation"),
    (_v6("3fff::/20"), "documentation"),
    (_v6("2001::/23"), "reserved (IETF protocol assignments)"),
    (_v6("5f00::/16"), "reserved (SRv6)"),
    (_v6("fc00::/7"), "unique local"),
    (_v6("fe80::/10"), "link-local"),
    (_v6("fec0::/10"), "site-local"),
    (_v6("ff00::/8"), "multicast"),
)

_IPV4_MAPPED = _v6("::ffff:0:0/96")
_IPV4_COMPATIBLE = _v6("::/96")
_NAT64 = _v6("64:ff9b::/96")
_GLOBAL_UNICAST = _v6("2000::/3")


def parse_literal(host: str) -> IPAddress | None:
    """The IP address ``host`` spells literally (``[...]`` brackets allowed), else ``None``.

    Strict: only dotted-quad IPv4 and standard IPv6 text; ``0x7f.1``, ``2130706433`` or
    ``0177.0.0.1`` are not literals here (they are names, and resolving them gives an address
    that is then checked like any other).
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _low32(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    """The IPv4 address in the last 32 bits (IPv4-mapped, IPv4-compatible, NAT64)."""
    return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)


def address_refusal(address: IPAddress) -> str | None:
    """Why a connection to ``address`` is refused, or ``None`` when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # A zone index says nothing about the address itself; compare without it.
        address = ipaddress.IPv6Address(int(address))

    if address in CLOUD_METADATA_ADDRESSES:
        return "cloud metadata"

    if isinstance(address, ipaddress.IPv4Address):
        for network4, reason in _IPV4_TABLE:
            if address in network4:
                return reason
        if not address.is_global:
            return "not globally routable"
        return None

    for network6, reason in _IPV6_TABLE[:2]:
        if address in network6:
            return reason

    if address in _IPV4_MAPPED:
        inner = address_refusal(_low32(address))
        return None if inner is None else f"IPv4-mapped {inner}"
    if address in _IPV4_COMPATIBLE:
        # Deprecated (RFC 4291); never a legitimate destination, whatever it embeds.
        inner = address_refusal(_low32(address))
        return f"IPv4-compatible {inner}" if inner else "IPv4-compatible (deprecated)"
    if address in _NAT64:
        inner = address_refusal(_low32(address))
        return None if inner is None else f"NAT64-embedded {inner}"
    sixtofour = address.sixtofour
    if sixtofour is not None:
        inner = address_refusal(sixtofour)
        return None if inner is None else f"6to4-embedded {inner}"

    for network6, reason in _IPV6_TABLE[2:]:
        if address in network6:
            return reason
    if address not in _GLOBAL_UNICAST:
        return "reserved"
    if not address.is_global:
        return "not globally routable"
    return None


def is_refused(address: IPAddress) -> bool:
    return address_refusal(address) is not None
