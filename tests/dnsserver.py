"""Real DNS servers on loopback for the tests: dnsmasq, a slow relay, a dead one.

`Dnsmasq` runs Debian's dnsmasq as an authoritative-only server (no upstream,
no /etc/hosts) on 127.0.0.1 and a free port, answering the PTR and A/AAAA
records a test gives it (`refusing`: REFUSED, not NXDOMAIN, for an address
without one; `failing_via`: a validating dnsmasq in front of another, which
answers SERVFAIL). `SlowRelay` forwards each query to it after a delay, like
a distant resolver, and counts the queries. `DeadResolver` is a bound
UDP port that never answers.
"""

import ipaddress
import shutil
import socket
import subprocess
import threading
import time

import dns.exception
import dns.message
import dns.query
from conftest import require

# a name that would run a script if a page put it into HTML unescaped; DNS
# carries any byte in a label and dnsmasq serves it as given
HOSTILE_NAME = "<script>document.title='pwned'</script>.x\"y&z.example"
# how dnspython writes it (RFC 1035 presentation form: `"` gets a backslash)
HOSTILE_SHOWN = "<script>document.title='pwned'</script>.x\\\"y&z.example"
# the longest name DNS allows: 253 characters, 255 octets on the wire
OVERSIZE_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 53, "example"])

# the standard set of test senders and their PTR names (None: no record)
PTR_NAMES = {
    "192.0.2.1": "mail.example.net",
    "192.0.2.2": HOSTILE_NAME,
    "192.0.2.3": OVERSIZE_NAME,
    "192.0.2.4": None,
    "2001:db8:1:2::": "v6.example.net",
}
STARTUP_SECONDS = 5.0
# the DNS root's key-signing key (KSK-2017) as a DS record, for a validating dnsmasq
ROOT_TRUST_ANCHOR = (
    ".,20326,8,2,E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"
)


def numbered_ptr_names(count, network="203.0.113.0/24"):
    """PTR names for the first `count` addresses of a network: host-N.example.org."""
    hosts = ipaddress.ip_network(network).network_address
    return {str(hosts + n): f"host-{n}.example.org" for n in range(count)}


def free_port():
    """A UDP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(port, timeout=0.2):
    """Whether a DNS server on 127.0.0.1:`port` answers a query at all."""
    query = dns.message.make_query("ready.test.", "A")
    try:
        dns.query.udp(query, "127.0.0.1", port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return False
    return True


class Dnsmasq:
    """Debian's dnsmasq on 127.0.0.1, serving only the records it is given.

    `ptr_names` maps an address to its PTR name (None: no record, so the
    server answers NXDOMAIN; REFUSED with `refusing`); `host_records` maps a
    name to its addresses; under `authoritative_for` (a domain) an unknown
    name gets NXDOMAIN. With `failing_via` (another Dnsmasq, running) it serves
    nothing itself: it forwards every query there and checks the answer's
    DNSSEC signatures against the root's trust anchor; unsigned answers fail
    that check, so it answers SERVFAIL, as a validating resolver does.
    """

    def __init__(
        self,
        ptr_names=None,
        host_records=None,
        authoritative_for=None,
        refusing=False,
        failing_via=None,
    ):
        self.binary = shutil.which("dnsmasq") or shutil.which("/usr/sbin/dnsmasq")
        require(self.binary is not None, "needs dnsmasq (make system-packages)")
        self.ptr_names = dict(PTR_NAMES if ptr_names is None else ptr_names)
        self.host_records = dict(host_records or {})
        self.authoritative_for = authoritative_for
        self.refusing = refusing
        self.failing_via = failing_via
        self.process = None
        self.port = None

    def command(self, port):
        """The dnsmasq command line for `port`."""
        records = [
            f"--ptr-record={ipaddress.ip_address(address).reverse_pointer},{name}"
            for address, name in self.ptr_names.items()
            if name is not None
        ]
        records += [
            f"--host-record={name},{','.join(found)}"
            for name, found in self.host_records.items()
        ]
        if self.authoritative_for:
            records.append(f"--local=/{self.authoritative_for}/")
        if not self.refusing:
            # the reverse zones are its own: an address without a record is
            # NXDOMAIN (else dnsmasq, with no upstream, answers REFUSED)
            records += ["--local=/in-addr.arpa/", "--local=/ip6.arpa/"]
        if self.failing_via is not None:
            # DNSSEC needs dnsmasq's cache; the key is the root zone's KSK-2017
            records = [
                f"--server=127.0.0.1#{self.failing_via.port}",
                "--dnssec",
                f"--trust-anchor={ROOT_TRUST_ANCHOR}",
                "--dnssec-check-unsigned",
            ]
        cache = [] if self.failing_via is not None else ["--cache-size=0"]
        return [
            self.binary,
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            f"--port={port}",
            "--pid-file=",
            *cache,
            *records,
        ]

    def start(self):
        """Start on a free port (a few tries, in case one is taken meanwhile)."""
        said = ""
        for _ in range(3):
            port = free_port()
            self.process = subprocess.Popen(
                self.command(port),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + STARTUP_SECONDS
            while time.monotonic() < deadline and self.process.poll() is None:
                if answers(port):
                    self.port = port
                    return self
                time.sleep(0.05)
            if self.process.poll() is not None:
                said = self.process.stderr.read().strip()
            self.stop()
        raise RuntimeError(f"dnsmasq did not start in three tries: {said or 'silent'}")

    def stop(self):
        """Stop the server and wait for it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process.stderr.close()
        self.process = None

    @property
    def nameserver(self):
        """The server as the config's `[dns] nameservers` writes it."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class SlowRelay:
    """A UDP relay on loopback that forwards each query `delay` seconds late.

    Each query gets a thread of its own, so many queries wait side by side
    as they would for a distant resolver. `queries` counts what came in.
    """

    def __init__(self, upstream_port, delay):
        self.upstream_port = upstream_port
        self.delay = delay
        self.queries = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self):
        """Take queries until stopped, each answered from its own thread."""
        while not self.stopping.is_set():
            try:
                query, client = self.socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.queries += 1
            threading.Thread(
                target=self.forward, args=(query, client), daemon=True
            ).start()

    def forward(self, query, client):
        """Wait, ask the upstream server, and pass its answer back."""
        if self.stopping.wait(self.delay):
            return
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(2.0)
            try:
                upstream.sendto(query, ("127.0.0.1", self.upstream_port))
                answer = upstream.recv(65535)
                self.socket.sendto(answer, client)
            except OSError:
                return

    @property
    def nameserver(self):
        """The relay as the config's `[dns] nameservers` writes it."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(timeout=5)
        self.socket.close()


class DeadResolver:
    """A bound UDP port on loopback that takes queries and never answers."""

    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]

    @property
    def nameserver(self):
        """The address as the config's `[dns] nameservers` writes it."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.socket.close()
