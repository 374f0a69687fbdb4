"""The download address policy (stages/retrieve/addresses), address by address, and its tables row by row."""

from __future__ import annotations

import ipaddress

import pytest

from raugment.stages.retrieve.addresses import (
    EMBEDDED,
    IPV4_BLOCKS,
    IPV6_BLOCKS,
    LOOPBACK,
    METADATA_BLOCKS,
    PRIVATE,
    block_of,
    embedded_ipv4,
    refusal,
)
from raugment.stages.retrieve.config import DownloadConfig
from raugment.stages.retrieve.download import address_refused, download_urls

NONE, LOOP, PRIV, BOTH = (False, False), (True, False), (False, True), (True, True)

CASES = [
    # ---- public: allowed with no allowance ------------------------------------------------
    ("8.8.8.8", NONE, False),
    ("1.1.1.1", NONE, False),
    ("93.184.216.34", NONE, False),
    ("223.255.255.255", NONE, False),
    ("100.63.255.255", NONE, False),       # just below shared 100.64/10
    ("100.128.0.0", NONE, False),          # just above it
    ("172.15.255.255", NONE, False),
    ("172.32.0.0", NONE, False),
    ("192.167.255.255", NONE, False),
    ("192.169.0.0", NONE, False),
    ("198.17.255.255", NONE, False),
    ("198.20.0.0", NONE, False),
    ("192.0.0.9", NONE, False),            # PCP anycast: globally reachable in the registry
    ("192.0.0.10", NONE, False),           # TURN anycast
    ("192.31.196.1", NONE, False),         # AS112-v4
    ("192.52.193.1", NONE, False),         # AMT
    ("192.175.48.1", NONE, False),         # AS112 direct delegation
    ("2606:4700:4700::1111", NONE, False),
    ("2001:4860:4860::8888", NONE, False),
    ("2a00:1450:4001:80b::200e", NONE, False),
    ("2000::1", NONE, False),
    ("2001:1::1", NONE, False),            # PCP anycast inside 2001::/23
    ("2001:1::2", NONE, False),
    ("2001:1::3", NONE, False),
    ("2001:3::1", NONE, False),            # AMT
    ("2001:4:112::1", NONE, False),        # AS112-v6
    ("2001:20::1", NONE, False),           # ORCHIDv2
    ("2001:30::1", NONE, False),           # DETs
    ("2620:4f:8000::1", NONE, False),
    ("::ffff:8.8.8.8", NONE, False),
    ("2002:808:808::1", NONE, False),      # 6to4 of 8.8.8.8
    ("64:ff9b::808:808", NONE, False),     # NAT64 of 8.8.8.8
    ("2001:0:808:808::fefe:fefe", NONE, False),  # Teredo: server 8.8.8.8, client 1.1.1.1
    # ---- loopback, this network, private: refused by default ------------------------------
    ("127.0.0.1", NONE, True),
    ("127.255.255.254", NONE, True),
    ("::1", NONE, True),
    ("0.0.0.0", NONE, True),
    ("0.1.2.3", NONE, True),
    ("10.0.0.1", NONE, True),
    ("172.16.0.1", NONE, True),
    ("172.31.255.255", NONE, True),
    ("192.168.0.1", NONE, True),
    ("100.64.0.1", NONE, True),
    ("100.127.255.255", NONE, True),
    ("fc00::1", NONE, True),
    ("fd12:3456::1", NONE, True),
    # ---- link-local and cloud metadata ----------------------------------------------------
    ("169.254.169.254", NONE, True),
    ("169.254.0.1", NONE, True),
    ("169.254.170.2", NONE, True),         # ECS task metadata
    ("100.100.100.200", NONE, True),       # Alibaba Cloud metadata
    ("fd00:ec2::254", NONE, True),         # AWS IMDS over IPv6
    ("fe80::1", NONE, True),
    ("fe80::1%eth0", NONE, True),
    ("febf::1", NONE, True),
    # ---- the rest of the IPv4 special-purpose registry ------------------------------------
    ("192.0.0.1", NONE, True),
    ("192.0.0.8", NONE, True),
    ("192.0.0.170", NONE, True),
    ("192.0.0.171", NONE, True),
    ("192.0.0.255", NONE, True),
    ("192.0.2.1", NONE, True),
    ("198.51.100.1", NONE, True),
    ("203.0.113.1", NONE, True),
    ("192.88.99.1", NONE, True),
    ("198.18.0.1", NONE, True),
    ("198.19.255.255", NONE, True),
    ("224.0.0.1", NONE, True),
    ("239.255.255.250", NONE, True),
    ("240.0.0.1", NONE, True),
    ("255.255.255.254", NONE, True),
    ("255.255.255.255", NONE, True),
    # ---- IPv6: embedded IPv4 forms with a refused IPv4 ------------------------------------
    ("::", NONE, True),
    ("::ffff:127.0.0.1", NONE, True),
    ("::ffff:169.254.169.254", NONE, True),
    ("::ffff:10.0.0.1", NONE, True),
    ("::ffff:0.0.0.0", NONE, True),
    ("::127.0.0.1", NONE, True),           # IPv4-compatible (deprecated)
    ("::8.8.8.8", NONE, True),
    ("2002:7f00:1::1", NONE, True),        # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", NONE, True),     # 6to4 of 169.254.169.254
    ("2002:a00:1::1", NONE, True),
    ("2002:c0a8:1::1", NONE, True),
    ("2002::1", NONE, True),               # 6to4 of 0.0.0.0
    ("2002:e000:1::1", NONE, True),
    ("2002:c000:201::1", NONE, True),      # 6to4 of 192.0.2.1
    ("64:ff9b::7f00:1", NONE, True),       # NAT64 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", NONE, True),
    ("64:ff9b::a00:1", NONE, True),
    ("64:ff9b::c0a8:101", NONE, True),
    ("64:ff9b:1::808:808", NONE, True),    # local-use NAT64
    ("2001:0:7f00:1::fefe:fefe", NONE, True),    # Teredo server 127.0.0.1
    ("2001:0:808:808::80ff:fffe", NONE, True),   # Teredo client 127.0.0.1 (inverted)
    ("2001:0:808:808::5601:5601", NONE, True),   # Teredo client 169.254.169.254
    # ---- the rest of the IPv6 special-purpose registry and reserved space -----------------
    ("2001:2::1", NONE, True),
    ("2001:db8::1", NONE, True),
    ("3fff::1", NONE, True),
    ("3fff:fff::1", NONE, True),
    ("2001:10::1", NONE, True),
    ("2001:5::1", NONE, True),             # IETF protocol assignments, no specific row
    ("2001:100::1", NONE, True),
    ("100::1", NONE, True),
    ("100:0:0:1::1", NONE, True),
    ("5f00::1", NONE, True),
    ("fec0::1", NONE, True),               # site-local (deprecated)
    ("feff::1", NONE, True),
    ("ff02::1", NONE, True),
    ("ff05::2", NONE, True),
    ("200::1", NONE, True),
    ("1000::1", NONE, True),
    ("4000::1", NONE, True),
    ("8000::1", NONE, True),
    ("e000::1", NONE, True),
    ("fe00::1", NONE, True),
    # ---- allowances open exactly their ranges ---------------------------------------------
    ("127.0.0.1", LOOP, False),
    ("::1", LOOP, False),
    ("::ffff:127.0.0.1", LOOP, False),
    ("127.0.0.1", PRIV, True),
    ("10.0.0.1", LOOP, True),
    ("10.0.0.1", PRIV, False),
    ("172.16.5.4", PRIV, False),
    ("192.168.1.7", PRIV, False),
    ("100.64.0.1", PRIV, False),
    ("fc00::1", PRIV, False),
    ("fd12::1", PRIV, False),
    ("::ffff:10.0.0.1", PRIV, False),
    ("fd12::1", LOOP, True),
    # ---- never allowed, whatever the allowances -------------------------------------------
    ("169.254.169.254", BOTH, True),
    ("fe80::1", BOTH, True),
    ("100.100.100.200", BOTH, True),
    ("fd00:ec2::254", BOTH, True),
    ("::ffff:169.254.169.254", BOTH, True),
    ("2002:7f00:1::1", BOTH, True),        # loopback behind 6to4, NAT64, Teredo: not what an allowance means
    ("2002:a00:1::1", BOTH, True),
    ("64:ff9b::7f00:1", BOTH, True),
    ("64:ff9b::a00:1", BOTH, True),
    ("2001:0:7f00:1::fefe:fefe", BOTH, True),
    ("fec0::1", BOTH, True),
    ("0.0.0.0", BOTH, True),
    ("::", BOTH, True),
    ("192.0.2.1", BOTH, True),
    ("198.18.0.1", BOTH, True),
    ("2001:db8::1", BOTH, True),
    ("::127.0.0.1", BOTH, True),
    ("64:ff9b:1::a00:1", BOTH, True),
    ("224.0.0.1", BOTH, True),
    ("ff02::1", BOTH, True),
    ("255.255.255.255", BOTH, True),
]


@pytest.mark.parametrize("ip, allow, refused", CASES, ids=[f"{ip}-{a[0]:d}{a[1]:d}" for ip, a, _ in CASES])
def test_address_policy(ip, allow, refused):
    cfg = DownloadConfig(allow_loopback=allow[0], allow_private=allow[1])
    assert address_refused(ip, cfg) is refused


def test_every_table_row_is_judged_by_its_registry_entry():
    """First and last address of every row: refused unless the registry calls the block globally
    reachable (loopback / private rows: refused without their allowance, allowed with it)."""
    rows = IPV4_BLOCKS + IPV6_BLOCKS + METADATA_BLOCKS
    assert len({b.prefix for b in rows}) == len(rows)
    for b in rows:
        assert b.rfc and b.name and b.network.prefixlen >= 3
        if b.kind == EMBEDDED:
            continue
        for addr in (b.network[0], b.network[-1]):
            if block_of(addr) is not b:
                continue  # a more specific row holds this end
            expect = not b.globally_reachable
            assert (refusal(addr) is not None) is expect, (b, addr)
            if b.kind in (LOOPBACK, PRIVATE):
                assert refusal(addr, allow_loopback=b.kind == LOOPBACK, allow_private=b.kind == PRIVATE) is None
                assert refusal(addr, allow_loopback=b.kind == PRIVATE, allow_private=b.kind == LOOPBACK)
            else:
                assert (refusal(addr, True, True) is not None) is expect, (b, addr)


def test_embedded_ipv4_forms():
    v4 = ipaddress.IPv4Address
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4")) == [v4("1.2.3.4")]
    assert embedded_ipv4(ipaddress.IPv6Address("2002:102:304::9")) == [v4("1.2.3.4")]
    assert embedded_ipv4(ipaddress.IPv6Address("64:ff9b::102:304")) == [v4("1.2.3.4")]
    # Teredo: server in bits 32-63, client = the inverted last 32 bits
    assert embedded_ipv4(ipaddress.IPv6Address("2001:0:102:304::fefd:fcfb")) == [v4("1.2.3.4"), v4("1.2.3.4")]
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700::1")) == []


def test_refusal_names_the_block_and_the_allowance():
    assert refusal("8.8.8.8") is None
    assert refusal("2002:a9fe:a9fe::1") == ("2002:a9fe:a9fe::1 embeds 169.254.169.254: 169.254.169.254 is in "
                                            "169.254.169.254/32 Cloud instance metadata (AWS, GCP, Azure, OpenStack)")
    assert "fec0::/10 Site-Local (deprecated) (RFC 3879)" in refusal("fec0::1")
    assert "retrieve.download.allow_loopback allows it" in refusal("127.0.0.1")
    assert "retrieve.download.allow_private allows it" in refusal("10.1.2.3")


def test_refused_literals_fail_without_connecting(connects):
    """The policy at the download: IP literals of each new refusal never reach connect()."""
    urls = ["http://[2002:7f00:1::1]:9/x.jpg", "http://[2002:a9fe:a9fe::1]/latest/meta-data/",
            "http://[fec0::1]:9/x.jpg", "http://[64:ff9b::7f00:1]:9/x.jpg", "http://198.18.0.1:9/x.jpg"]
    res = download_urls(urls, DownloadConfig(timeout_s=2, retries=0, allow_loopback=True, allow_private=True))
    assert [r.reason for r in res] == ["refused_address"] * len(urls)
    assert "169.254.169.254" in res[1].detail and "Site-Local" in res[2].detail
    assert connects == []
