"""Sender addresses: how an IP is counted, stored, searched and guarded."""

import ipaddress

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class AddressError(ValueError):
    """Text that is not an IP address or network, or one that may not be used."""


def parse_ip(text):
    """An IPv4 or IPv6 address; `::ffff:a.b.c.d` becomes a.b.c.d."""
    text = text.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    if "%" in text:
        raise AddressError(f"{text[:60]!r}: zone ids (%) are not sender addresses")
    try:
        # the family by its separator: ip_address tries IPv4 first, and the
        # exception it raises for every IPv6 text costs more than the parse
        if ":" in text:
            address = ipaddress.IPv6Address(text)
        else:
            address = ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise AddressError(f"{text[:60]!r} is not an IP address") from exc
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def parse_network(text):
    """An address or CIDR network, host bits cleared (`192.0.2.9/24` is refused)."""
    text = text.strip()
    if "/" not in text:
        address = parse_ip(text)
        return ipaddress.ip_network(address)
    if "%" in text:
        raise AddressError(f"{text[:60]!r}: zone ids (%) are not sender addresses")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise AddressError(
                f"{text[:60]!r} is not an IP address or CIDR network"
            ) from exc
        raise AddressError(
            f"{text!r} has host bits set; did you mean {loose}?"
        ) from exc
    if network.version == 6 and network.network_address.ipv4_mapped:
        mapped = network.network_address.ipv4_mapped
        prefix = max(network.prefixlen - 96, 0)
        return ipaddress.ip_network(f"{mapped}/{prefix}", strict=False)
    return network


def sender_of(address, ipv6_prefix=64):
    """The network a sender is counted and blocked as: /32, or /64 for IPv6."""
    if isinstance(address, str):
        address = parse_ip(address)
    # built from numbers: from text, the address would be written and parsed again
    if address.version == 4:
        return ipaddress.IPv4Network(int(address))
    host_bits = 128 - ipv6_prefix
    first = int(address) >> host_bits << host_bits
    return ipaddress.IPv6Network((first, ipv6_prefix))


def sender_text(network):
    """How a sender network reads: a bare address for a single host."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def key_of(address):
    """A sortable 32-hex-digit key; IPv4 sorts in the ::ffff:0:0/96 range."""
    if address.version == 4:
        return format((0xFFFF << 32) | int(address), "032x")
    return format(int(address), "032x")


def key_range(network):
    """The first and last key a network covers, for BETWEEN queries."""
    return key_of(network.network_address), key_of(network.broadcast_address)


def covers(outer, inner):
    """Whether network `outer` contains all of network `inner`."""
    return outer.version == inner.version and inner.subnet_of(outer)


def overlaps(first, second):
    """Whether two networks share any address."""
    return first.version == second.version and first.overlaps(second)


def not_a_sender(network):
    """Why no mail can come from this network (multicast, unspecified...), or ''."""
    first = network.network_address
    if first.is_unspecified:
        return "is the unspecified address"
    if first.is_multicast:
        return "is multicast"
    if network.version == 4 and network.broadcast_address == ipaddress.ip_address(
        "255.255.255.255"
    ):
        return "is the broadcast address"
    if first.is_link_local:
        return "is link-local"
    if network.version == 4 and first.is_reserved:
        return "is reserved (240.0.0.0/4)"
    return ""


def is_loopback(network):
    """Whether a network touches the loopback ranges."""
    return any(overlaps(network, loop) for loop in LOOPBACK)
