"""Domain names on the blocked and approved lists, resolved to A/AAAA addresses."""

import ipaddress
import logging

import dns.exception
import dns.nameserver
import dns.resolver

from appliance.domains import ResolveError
from appliance.domains import domain_name

log = logging.getLogger(__name__)


class NameResolver:
    """Looks names up at the configured servers ("IP" or "IP:port") or the system's."""

    def __init__(self, nameservers=(), timeout=1.0):
        self.timeout = timeout
        self.resolver = None
        self.problem = None
        if nameservers:
            try:
                servers = [nameserver(text) for text in nameservers]
            except ValueError as exc:
                self.problem = str(exc)
            else:
                self.resolver = dns.resolver.Resolver(configure=False)
                self.resolver.nameservers = servers

    def addresses(self, name):
        """The A and AAAA addresses of a name, sorted; ResolveError when none.

        Each record type is asked for once, within the timeout; a name with
        only one type of address is fine, a name with neither is refused.
        """
        name = domain_name(name)
        if self.problem:
            raise ResolveError(self.problem)
        resolver = self.resolver or _system_resolver()
        found = set()
        failures = []
        for record_type in ("A", "AAAA"):
            try:
                answer = resolver.resolve(name, record_type, lifetime=self.timeout)
            except dns.resolver.NXDOMAIN:
                raise ResolveError(f"{name} does not exist in DNS") from None
            except dns.resolver.NoAnswer:
                continue
            except dns.resolver.LifetimeTimeout:
                failures.append(f"no answer within {self.timeout:g} s")
                continue
            except dns.resolver.NoNameservers:
                failures.append("the DNS server refused or failed the query")
                continue
            except dns.exception.DNSException as exc:
                failures.append(f"the lookup failed ({exc})")
                continue
            found.update(ipaddress.ip_address(record.address) for record in answer)
        if not found:
            reason = "; ".join(dict.fromkeys(failures)) or "no A or AAAA record"
            raise ResolveError(f"{name} does not resolve: {reason}")
        log.debug("%s resolved to %s", name, ", ".join(map(str, found)))
        return sorted(found, key=lambda address: (address.version, address))


def nameserver(text):
    """A nameserver from "192.0.2.1", "192.0.2.1:5353" or "[2001:db8::1]:53"."""
    text = text.strip()
    host, port = text, "53"
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"dns nameserver {text!r} is not IP or IP:port") from None
    if not 0 < number < 65536:
        raise ValueError(f"dns nameserver {text!r} has a port outside 1-65535")
    return dns.nameserver.Do53Nameserver(host, number)


def _system_resolver():
    """The resolver /etc/resolv.conf names; ResolveError when there is none."""
    try:
        return dns.resolver.Resolver()
    except (dns.resolver.NoResolverConfiguration, OSError) as exc:
        raise ResolveError(f"no DNS resolver is configured ({exc})") from None
