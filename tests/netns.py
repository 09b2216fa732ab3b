"""Network namespaces for kernel tests: hosts on one bridge that lives in the lab.

    with Lab() as lab:
        gateway = lab.add_host("gw", "192.0.2.1", "2001:db8:1::1")
        sender = lab.add_host("sender", "198.51.100.7")
        gateway.listen(25)
        assert sender.can_connect("192.0.2.1", 25)

Every namespace is named `sf-<lab id>-<name>`. The bridge sits in the lab's
own switch namespace and each host is wired to it by a veth pair, so nothing is
created in the caller's namespace and hosts reach each other directly on the
link, whatever documentation range their addresses come from. Closing the lab
(leaving the `with`, or the test fixture ending) stops every process started in
its namespaces and deletes the namespaces, which removes every link with them.
Addresses must come from 192.0.2.0/24, 198.51.100.0/24 or 2001:db8::/32.
"""

import atexit
import ipaddress
import re
import secrets
import selectors
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTATION_RANGES = tuple(
    ipaddress.ip_network(text)
    for text in ("192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32")
)
BRIDGE = "br0"
HOST_LINK = "eth0"
COMMAND_TIMEOUT = 60

# a TCP server: greets each client with one line, keeps it open until it leaves
LISTENER = r"""
import selectors, socket, sys
address, port, banner = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
family = socket.AF_INET6 if ":" in address else socket.AF_INET
server = socket.socket(family, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == socket.AF_INET6:
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
server.bind((address, port))
server.listen(128)
watch = selectors.DefaultSelector()
watch.register(server, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in watch.select():
        if key.fileobj is server:
            client, _ = server.accept()
            try:
                client.sendall(banner + b"\r\n")
                watch.register(client, selectors.EVENT_READ)
            except OSError:
                client.close()
            continue
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if not data:
            watch.unregister(key.fileobj)
            key.fileobj.close()
"""

# exits 0 when a TCP handshake with argv[1]:argv[2] completes within argv[3] s
CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))
except OSError:
    sys.exit(1)
"""


class NetnsError(RuntimeError):
    """A command run to build or use the lab failed; the message quotes it."""


def run(argv, check=True, timeout=COMMAND_TIMEOUT, stdin=None):
    """Run a command on the host side; NetnsError quoting it when it fails."""
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and result.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()}"
        )
    return result


def documentation_address(text):
    """An address from the documentation ranges; ValueError for any other."""
    address = ipaddress.ip_address(text)
    if not any(address in network for network in DOCUMENTATION_RANGES):
        raise ValueError(
            f"{text} is outside 192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32"
        )
    return address


class Namespace:
    """One network namespace of a lab, with helpers to act inside it."""

    def __init__(self, lab, name):
        """A handle on namespace `name`; the lab creates and deletes it."""
        self.lab = lab
        self.name = name
        self.addresses = []

    def __repr__(self):
        """The namespace's name, for test output."""
        return f"Namespace({self.name})"

    def run(self, *argv, check=True, timeout=COMMAND_TIMEOUT, stdin=None):
        """Run a command inside the namespace and wait for it."""
        return run(["ip", "netns", "exec", self.name, *argv], check, timeout, stdin)

    def python(self, code, *args, check=True, timeout=COMMAND_TIMEOUT, stdin=None):
        """Run Python code (this interpreter, repo on the path) inside."""
        return self.run(
            sys.executable, "-c", code, *args, check=check, timeout=timeout, stdin=stdin
        )

    def spawn(self, *argv):
        """Start a long-running command inside; the lab stops it on close."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.lab.processes.append(process)
        return process

    def spawn_logged(self, output, *argv):
        """Start a long-running command inside, its output to an open file."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.lab.processes.append(process)
        return process

    def spawn_python(self, code, *args, ready="ready", timeout=10):
        """Start Python code inside and wait until it prints the `ready` line."""
        process = self.spawn(sys.executable, "-c", code, *args)
        wait_for_line(process, ready, timeout)
        return process

    def listen(self, port, address="::", banner="220 sf-lab ready"):
        """A TCP listener on `port` (IPv4 and IPv6 by default), greeting clients."""
        return self.spawn_python(LISTENER, address, str(port), banner)

    def can_connect(self, ip, port, timeout=2.0):
        """Whether a TCP handshake from here to ip:port completes in time."""
        result = self.python(
            CONNECT, str(ip), str(port), str(timeout), check=False, timeout=timeout + 10
        )
        return result.returncode == 0


class Lab:
    """Namespaces wired to one bridge; everything it makes, it removes."""

    def __init__(self, prefix="sf-"):
        """An empty lab; nothing is created before the first host."""
        self.prefix = f"{prefix}{secrets.token_hex(3)}-"
        self.namespaces = []
        self.processes = []
        self.hosts = {}
        self.switch = None
        atexit.register(self.close)

    def __enter__(self):
        """The lab itself."""
        return self

    def __exit__(self, *exc_info):
        """Remove everything the lab made."""
        self.close()

    def namespace(self, name):
        """A new namespace with loopback up, not wired to anything."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,19}", name):
            raise ValueError(f"namespace name {name!r}: use a-z, 0-9 and -, 1-20 long")
        namespace = Namespace(self, self.prefix + name)
        run(["ip", "netns", "add", namespace.name])
        self.namespaces.append(namespace)

        # no duplicate address detection: addresses work the moment they are set
        namespace.run(
            "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        )  # fmt: skip
        namespace.run("ip", "link", "set", "lo", "up")
        return namespace

    def add_host(self, name, ipv4=None, ipv6=None):
        """A namespace on the lab's bridge with the given addresses."""
        addresses = [documentation_address(a) for a in (ipv4, ipv6) if a is not None]
        switch = self._switch()
        port = f"p{len(self.namespaces)}"
        host = self.namespace(name)

        # wire the host to the bridge: one veth end in the switch, one in the host
        switch.run(
            "ip", "link", "add", port, "type", "veth",
            "peer", "name", HOST_LINK, "netns", host.name,
        )  # fmt: skip
        switch.run("ip", "link", "set", port, "master", BRIDGE, "up")
        host.run("ip", "link", "set", HOST_LINK, "up")

        # host addresses, and every documentation range on the link itself
        for address in addresses:
            flags = ["nodad"] if address.version == 6 else []
            host_prefix = f"{address}/{address.max_prefixlen}"
            host.run("ip", "addr", "add", host_prefix, "dev", HOST_LINK, *flags)
            host.addresses.append(str(address))
        for network in DOCUMENTATION_RANGES:
            host.run("ip", "route", "add", str(network), "dev", HOST_LINK)

        self.hosts[name] = host
        return host

    def close(self):
        """Stop every process started here and delete every namespace; repeatable."""
        for process in self.processes:
            stop(process)
        self.processes.clear()

        for namespace in reversed(self.namespaces):
            leftover = run(["ip", "netns", "pids", namespace.name], check=False)
            for pid in leftover.stdout.split():
                run(["kill", "-KILL", pid], check=False)
            run(["ip", "netns", "del", namespace.name], check=False)
        self.namespaces.clear()
        self.hosts.clear()
        self.switch = None
        atexit.unregister(self.close)

    def _switch(self):
        """The namespace holding the bridge, made on first use."""
        if self.switch is None:
            self.switch = self.namespace("switch")
            self.switch.run("ip", "link", "add", BRIDGE, "type", "bridge")
            self.switch.run(
                "ip", "link", "set", BRIDGE, "type", "bridge", "mcast_snooping", "0"
            )
            self.switch.run("ip", "link", "set", BRIDGE, "up")
        return self.switch


def stop(process, grace=5):
    """Terminate a process we started, killing it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(grace)
    for pipe in (process.stdout, process.stderr):
        if pipe:
            pipe.close()


def wait_for_line(process, expected, timeout):
    """Read a process's output until a line equal to `expected`; bounded in time."""
    deadline = time.monotonic() + timeout
    watch = selectors.DefaultSelector()
    watch.register(process.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not watch.select(deadline - time.monotonic()):
                break
            line = process.stdout.readline()
            if not line:
                break
            if line.strip() == expected:
                return
    finally:
        watch.close()
    process.terminate()
    _output, errors = process.communicate(timeout=10)
    raise NetnsError(
        f"`{' '.join(process.args)}` never printed {expected!r}: {errors.strip()}"
    )
