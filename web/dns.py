"""Reverse DNS (PTR) names for the Suspicious IP log: parallel, cached, bounded."""

import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait
from dataclasses import dataclass

import dns.exception
import dns.resolver

from appliance.config import ConfigError
from appliance.resolve import nameserver

log = logging.getLogger(__name__)

NO_NAME = "(no name)"
TIMED_OUT = "(timed out)"
# the servers answered with an error (SERVFAIL, REFUSED), not with "no name"
LOOKUP_FAILED = "(lookup failed)"
# the longest a page waits for names, whatever the per-lookup timeout
PAGE_BUDGET = 1.2
# how long an answer is reused, in seconds: a name (the record's TTL, kept
# within these bounds), no name, a timeout, a failure
NAME_TTL = (60.0, 3600.0)
NO_NAME_TTL = 300.0
TIMED_OUT_TTL = 60.0
FAILED_TTL = 30.0
# enough threads to look up a whole 100-row page at once
WORKERS = 100
# the most addresses kept; past it the least recently shown are dropped
CACHE_LIMIT = 20000
# a longer name shows shortened, whole in its tooltip (a DNS name may have 253)
SHOWN_LENGTH = 64


@dataclass(frozen=True)
class DomainName:
    """A PTR name as the page shows it: `shown` fits a column, `full` is all of it."""

    full: str

    @property
    def shortened(self):
        """Whether the column shows less than the whole name."""
        return len(self.full) > SHOWN_LENGTH

    @property
    def shown(self):
        """The name, or its start and end around an ellipsis when it is long."""
        if not self.shortened:
            return self.full
        tail = SHOWN_LENGTH * 2 // 3
        head = SHOWN_LENGTH - tail - 1
        return self.full[:head] + "\u2026" + self.full[-tail:]


class PtrLookup:
    """Looks up PTR names in a thread pool and keeps them for a while.

    The cache holds names and failures alike, each until its TTL runs out,
    and at most `cache_limit` addresses (least recently used go first).
    """

    def __init__(
        self, nameservers=(), timeout=1.0, clock=time.monotonic, cache_limit=None
    ):
        self.resolver = make_resolver(nameservers)
        self.timeout = timeout
        self.clock = clock
        self.cache_limit = CACHE_LIMIT if cache_limit is None else cache_limit
        self.cache = OrderedDict()
        self.pending = {}
        self.lock = threading.Lock()
        self.executor = None

    def names(self, addresses, budget=None):
        """PTR names by address, waiting at most `budget` seconds for them all.

        Lookups still running when the budget is spent show as timed out and
        go on in the background, so their answers fill the cache.
        """
        if budget is None:
            budget = min(self.timeout + 0.05, PAGE_BUDGET)
        found = {}
        futures = {}
        with self.lock:
            now = self.clock()
            for address in dict.fromkeys(addresses):
                cached = self.cache.get(address)
                if cached is not None and cached[1] > now:
                    self.cache.move_to_end(address)
                    found[address] = cached[0]
                elif address in self.pending:
                    futures[address] = self.pending[address]
                else:
                    futures[address] = self._start(address)

        wait(futures.values(), timeout=budget)

        for address, future in futures.items():
            finished = future.done() and not future.cancelled()
            found[address] = future.result() if finished else TIMED_OUT
        return found

    def close(self):
        """Stop the worker threads once their lookups end."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def _start(self, address):
        """Submit one lookup (the caller holds the lock)."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="ptr")
        future = self.executor.submit(self._lookup_and_keep, address)
        self.pending[address] = future
        return future

    def _lookup_and_keep(self, address):
        """Look one address up, then move it from pending to the cache."""
        name, ttl = self._lookup(address)
        with self.lock:
            self.pending.pop(address, None)
            self.cache[address] = (name, self.clock() + ttl)
            self.cache.move_to_end(address)
            while len(self.cache) > self.cache_limit:
                self.cache.popitem(last=False)
        return name

    def _lookup(self, address):
        """One PTR query: (the name or why none, seconds to keep it); never raises.

        Only an answer saying there is no such record is "no name"; a server
        error (SERVFAIL, REFUSED) or any other failure is a failed lookup.
        """
        if self.resolver is None:
            return LOOKUP_FAILED, FAILED_TTL
        try:
            answer = self.resolver.resolve_address(address, lifetime=self.timeout)
        except dns.resolver.LifetimeTimeout:
            log.debug("%s PTR lookup timed out", address)
            return TIMED_OUT, TIMED_OUT_TTL
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
            log.debug("%s has no PTR name: %s", address, exc)
            return NO_NAME, NO_NAME_TTL
        except dns.exception.DNSException as exc:
            log.debug("%s PTR lookup failed: %s", address, exc)
            return LOOKUP_FAILED, FAILED_TTL
        except Exception:
            log.exception("%s PTR lookup failed unexpectedly", address)
            return LOOKUP_FAILED, FAILED_TTL
        names = [record.target.to_text(omit_final_dot=True) for record in answer]
        if not names:
            return NO_NAME, NO_NAME_TTL
        low, high = NAME_TTL
        return names[0], min(max(float(answer.rrset.ttl), low), high)


def make_resolver(nameservers):
    """A resolver for the configured servers ("IP" or "IP:port"), else the system's."""
    if not nameservers:
        try:
            return dns.resolver.Resolver()
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            log.warning("no system resolver (%s); name lookups fail", exc)
            return None
    try:
        servers = [nameserver(text) for text in nameservers]
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = servers
    return resolver


def lookup_address(sender):
    """The address whose PTR names a sender: itself, or an IPv6 /64's network."""
    return str(ipaddress.ip_network(sender, strict=False).network_address)
