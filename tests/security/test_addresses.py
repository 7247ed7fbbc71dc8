"""The address refusal table, as a pure function: no packet is sent, nothing is resolved."""

from __future__ import annotations

import ipaddress

import pytest

from ourvidz_serve.security.addresses import address_refusal, parse_literal

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("fd00::1", "unique local"),
    ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("100.64.0.1", "CGNAT"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("64:ff9b::7f00:1", "NAT64-embedded loopback"),
    ("64:ff9b::a00:1", "NAT64-embedded private"),
    ("::127.0.0.1", "IPv4-compatible loopback"),
    ("::8.8.8.8", "IPv4-compatible"),
    ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"),
    ("::ffff:10.1.2.3", "IPv4-mapped private"),
    ("2002:7f00:1::1", "6to4-embedded loopback"),
    ("2001::1", "Teredo"),
    ("192.0.2.10", "documentation"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.5", "documentation"),
    ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.0.8", "reserved"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("0.1.2.3", "reserved"),
    ("fec0::1", "site-local"),
    ("100::1", "reserved"),
    ("4000::1", "reserved"),
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "93.184.215.14",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize(("text", "reason"), REFUSED)
def test_refused_addresses_name_their_reason(text: str, reason: str) -> None:
    refusal = address_refusal(ipaddress.ip_address(text))
    assert refusal is not None, text
    assert reason in refusal


@pytest.mark.parametrize("text", ALLOWED)
def test_public_addresses_are_allowed(text: str) -> None:
    assert address_refusal(ipaddress.ip_address(text)) is None


@pytest.mark.parametrize(
    "text",
    ["10.0.0.0", "172.16.0.0", "192.168.255.255", "127.0.0.0", "169.254.0.0", "fc00::"],
)
def test_network_edges_are_refused(text: str) -> None:
    assert address_refusal(ipaddress.ip_address(text)) is not None


@pytest.mark.parametrize(
    "text", ["172.15.255.255", "172.32.0.0", "100.63.255.255", "100.128.0.0", "11.0.0.1"]
)
def test_addresses_just_outside_refused_networks_are_allowed(text: str) -> None:
    assert address_refusal(ipaddress.ip_address(text)) is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[2606:4700:4700::1111]", "2606:4700:4700::1111"),
        ("93.184.215.14", "93.184.215.14"),
    ],
)
def test_parse_literal_reads_ip_literals(host: str, expected: str) -> None:
    assert parse_literal(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host",
    ["localhost", "example.com", "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "", "[]", "1.2.3"],
)
def test_parse_literal_refuses_names_and_odd_spellings(host: str) -> None:
    assert parse_literal(host) is None
