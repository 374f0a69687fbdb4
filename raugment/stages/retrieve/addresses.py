"""Which addresses a download may connect to: the IANA special-purpose address registries as data.

The tables below transcribe the IANA IPv4 and IPv6 Special-Purpose Address Registries (prefix,
name, RFC, "globally reachable"), plus the blocks the address-space registries set apart
(multicast, IPv6 outside 2000::/3, deprecated site-local and IPv4-compatible forms) and the
cloud metadata endpoints that do not sit in link-local space. :func:`refusal` looks an address up
by longest prefix:

* an address in no block is public and allowed;
* ``kind="loopback"`` (127/8, ::1) is allowed only with ``allow_loopback``;
* ``kind="private"`` (RFC 1918, shared 100.64/10, unique-local fc00::/7) only with ``allow_private``;
* ``kind="metadata"`` (cloud instance metadata) is never allowed, whatever the allowances;
* ``kind="embedded"`` IPv6 forms carry an IPv4 address and are judged by it: IPv4-mapped
  (::ffff:0:0/96, which the kernel connects to as that IPv4 address) under the same allowances;
  6to4 (2002::/16, bits 16-47), well-known NAT64 (64:ff9b::/96, the last 32 bits) and Teredo
  (2001::/32: server = bits 32-63, client = the inverted last 32 bits, both judged) only when the
  embedded address is itself public: a translator is no way to reach a loopback or private host;
* every other block is allowed only when the registry calls it globally reachable (anycast
  services such as 192.0.0.9 or 2001:1::1 are; documentation, benchmarking, reserved, discard,
  local-use NAT64 64:ff9b:1::/48 and the rest are not).

Registries: https://www.iana.org/assignments/iana-ipv4-special-registry/ and
https://www.iana.org/assignments/iana-ipv6-special-registry/ (transcribed 2026).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SPECIAL = "special"
LOOPBACK = "loopback"
PRIVATE = "private"
METADATA = "metadata"
EMBEDDED = "embedded"


@dataclass(frozen=True)
class Block:
    """One row of a registry: ``globally_reachable`` None where the registry says N/A."""

    prefix: str
    name: str
    rfc: str
    globally_reachable: bool | None
    kind: str = SPECIAL

    @property
    def network(self) -> Network:
        return ipaddress.ip_network(self.prefix)


# IANA IPv4 Special-Purpose Address Registry, then multicast (the IPv4 multicast registry).
IPV4_BLOCKS: tuple[Block, ...] = (
    Block("0.0.0.0/8", "This network", "RFC 791", False),
    Block("0.0.0.0/32", "This host on this network", "RFC 1122", False),
    Block("10.0.0.0/8", "Private-Use", "RFC 1918", False, PRIVATE),
    Block("100.64.0.0/10", "Shared Address Space", "RFC 6598", False, PRIVATE),
    Block("127.0.0.0/8", "Loopback", "RFC 1122", False, LOOPBACK),
    Block("169.254.0.0/16", "Link Local", "RFC 3927", False),
    Block("172.16.0.0/12", "Private-Use", "RFC 1918", False, PRIVATE),
    Block("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890", False),
    Block("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335", False),
    Block("192.0.0.8/32", "IPv4 dummy address", "RFC 7600", False),
    Block("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723", True),
    Block("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155", True),
    Block("192.0.0.170/32", "NAT64/DNS64 Discovery", "RFC 8880", False),
    Block("192.0.0.171/32", "NAT64/DNS64 Discovery", "RFC 8880", False),
    Block("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737", False),
    Block("192.31.196.0/24", "AS112-v4", "RFC 7535", True),
    Block("192.52.193.0/24", "AMT", "RFC 7450", True),
    Block("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526", None),
    Block("192.168.0.0/16", "Private-Use", "RFC 1918", False, PRIVATE),
    Block("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534", True),
    Block("198.18.0.0/15", "Benchmarking", "RFC 2544", False),
    Block("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737", False),
    Block("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737", False),
    Block("224.0.0.0/4", "Multicast", "RFC 5771", False),
    Block("240.0.0.0/4", "Reserved", "RFC 1112", False),
    Block("255.255.255.255/32", "Limited Broadcast", "RFC 919", False),
)

# IANA IPv6 Special-Purpose Address Registry, then the address-space registry's blocks.
IPV6_BLOCKS: tuple[Block, ...] = (
    Block("::/8", "Reserved by IETF (outside 2000::/3 global unicast)", "RFC 4291", False),
    Block("::/96", "IPv4-compatible (deprecated)", "RFC 4291", False),
    Block("::1/128", "Loopback Address", "RFC 4291", False, LOOPBACK),
    Block("::/128", "Unspecified Address", "RFC 4291", False),
    Block("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291", False, EMBEDDED),
    Block("64:ff9b::/96", "IPv4-IPv6 Translat.", "RFC 6052", True, EMBEDDED),
    Block("64:ff9b:1::/48", "IPv4-IPv6 Translat. (local-use)", "RFC 8215", False),
    Block("100::/64", "Discard-Only Address Block", "RFC 6666", False),
    Block("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780", False),
    Block("2001::/23", "IETF Protocol Assignments", "RFC 2928", False),
    Block("2001::/32", "TEREDO", "RFC 4380", None, EMBEDDED),
    Block("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723", True),
    Block("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155", True),
    Block("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665", True),
    Block("2001:2::/48", "Benchmarking", "RFC 5180", False),
    Block("2001:3::/32", "AMT", "RFC 7450", True),
    Block("2001:4:112::/48", "AS112-v6", "RFC 7535", True),
    Block("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843", None),
    Block("2001:20::/28", "ORCHIDv2", "RFC 7343", True),
    Block("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374", True),
    Block("2001:db8::/32", "Documentation", "RFC 3849", False),
    Block("2002::/16", "6to4", "RFC 3056", None, EMBEDDED),
    Block("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534", True),
    Block("3fff::/20", "Documentation", "RFC 9637", False),
    Block("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602", False),
    Block("fc00::/7", "Unique-Local", "RFC 4193", False, PRIVATE),
    Block("fe80::/10", "Link-Local Unicast", "RFC 4291", False),
    Block("fec0::/10", "Site-Local (deprecated)", "RFC 3879", False),
    Block("ff00::/8", "Multicast", "RFC 4291", False),
    # The IPv6 address space outside 2000::/3 (global unicast) that no row above names:
    # "Reserved by IETF" in the address-space registry.
    Block("100::/8", "Reserved by IETF", "RFC 4291", False),
    Block("200::/7", "Reserved by IETF", "RFC 4291", False),
    Block("400::/6", "Reserved by IETF", "RFC 4291", False),
    Block("800::/5", "Reserved by IETF", "RFC 4291", False),
    Block("1000::/4", "Reserved by IETF", "RFC 4291", False),
    Block("4000::/3", "Reserved by IETF", "RFC 4291", False),
    Block("6000::/3", "Reserved by IETF", "RFC 4291", False),
    Block("8000::/3", "Reserved by IETF", "RFC 4291", False),
    Block("a000::/3", "Reserved by IETF", "RFC 4291", False),
    Block("c000::/3", "Reserved by IETF", "RFC 4291", False),
    Block("e000::/4", "Reserved by IETF", "RFC 4291", False),
    Block("f000::/5", "Reserved by IETF", "RFC 4291", False),
    Block("f800::/6", "Reserved by IETF", "RFC 4291", False),
    Block("fe00::/9", "Reserved by IETF", "RFC 4291", False),
)

# Cloud instance-metadata endpoints outside link-local space (169.254.169.254 is link-local): inside
# ranges ``allow_private`` opens, so named here to stay refused (``rfc``: whose endpoint).
METADATA_BLOCKS: tuple[Block, ...] = (
    Block("169.254.169.254/32", "Cloud instance metadata", "AWS, GCP, Azure, OpenStack", False, METADATA),
    Block("100.100.100.200/32", "Cloud instance metadata", "Alibaba Cloud", False, METADATA),
    Block("fd00:ec2::254/128", "Cloud instance metadata", "AWS IMDS over IPv6", False, METADATA),
)


@lru_cache(maxsize=1)
def _tables() -> tuple[list[tuple[Network, Block]], list[tuple[Network, Block]]]:
    """(IPv4, IPv6) rows, most specific first (longest-prefix match is the first that contains)."""
    rows = [(b.network, b) for b in IPV4_BLOCKS + IPV6_BLOCKS + METADATA_BLOCKS]
    rows.sort(key=lambda r: -r[0].prefixlen)
    return [r for r in rows if r[0].version == 4], [r for r in rows if r[0].version == 6]


def block_of(addr: IPAddress) -> Block | None:
    """The most specific block that holds ``addr``, or None for a public address."""
    for net, block in _tables()[addr.version == 6]:
        if addr in net:
            return block
    return None


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an embedding IPv6 form carries (empty for any other address)."""
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    if addr.sixtofour is not None:
        return [addr.sixtofour]
    if addr.teredo is not None:
        return list(addr.teredo)          # (server, client), the client's bits inverted back
    if addr in ipaddress.ip_network("64:ff9b::/96"):
        return [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    return []


def refusal(ip: str | IPAddress, allow_loopback: bool = False, allow_private: bool = False) -> str | None:
    """Why connecting to ``ip`` is refused (one line naming the block and its RFC), or None if allowed.

    A zone index (``fe80::1%eth0``) is ignored.
    """
    addr = ip if not isinstance(ip, str) else ipaddress.ip_address(ip.split("%", 1)[0])
    block = block_of(addr)
    if block is None:
        return None
    why = f"{addr} is in {block.prefix} {block.name} ({block.rfc})"
    if block.kind == LOOPBACK:
        return None if allow_loopback else why + "; retrieve.download.allow_loopback allows it"
    if block.kind == PRIVATE:
        return None if allow_private else why + "; retrieve.download.allow_private allows it"
    if block.kind == EMBEDDED and isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        mapped = addr.ipv4_mapped is not None  # the kernel connects to the IPv4 address itself
        for v4 in inner:
            sub = refusal(v4, allow_loopback and mapped, allow_private and mapped)
            if sub is not None:
                return f"{addr} embeds {v4}: {sub}"
        return None
    if block.globally_reachable:
        return None
    return why
