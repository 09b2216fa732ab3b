"""A real, private Postfix MX inside a network namespace, and swaks to drive it."""

import ipaddress
import os
import pwd
import shlex
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

LAB_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32")
)
DOMAIN = "example.test"
RECIPIENTS = ("alice", "bob")
SMTP_PORT = 25
MAIL_OWNER = "postfix"

# every service chroot-free; postlog is what makes maillog_file work (Postfix 3.4+)
MASTER_CF = """\
smtp       inet       n - n - - smtpd
pickup     unix       n - n 60 1 pickup
cleanup    unix       n - n - 0 cleanup
qmgr       unix       n - n 300 1 qmgr
rewrite    unix       - - n - - trivial-rewrite
bounce     unix       - - n - 0 bounce
defer      unix       - - n - 0 bounce
trace      unix       - - n - 0 bounce
verify     unix       - - n - 1 verify
flush      unix       n - n 1000? 0 flush
proxymap   unix       - - n - - proxymap
proxywrite unix       - - n - 1 proxymap
smtp       unix       - - n - - smtp
relay      unix       - - n - - smtp
showq      unix       n - n - - showq
error      unix       - - n - - error
retry      unix       - - n - - error
discard    unix       - - n - - discard
anvil      unix       - - n - 1 anvil
scache     unix       - - n - 1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def lab_address(text):
    """The address `text`, refused unless it lies in the lab's documentation ranges."""
    address = ipaddress.ip_address(str(text))
    if not any(address in net for net in LAB_NETWORKS):
        raise ValueError(f"{address} is outside the lab ranges {LAB_NETWORKS}")
    return address


def _bracketed(address):
    """An address as Postfix and swaks write it next to a port: IPv6 in []."""
    return f"[{address}]" if address.version == 6 else str(address)


def _main_cf(instance):
    """main.cf of an internet-facing MX that never looks anything up in DNS."""
    interfaces = ", ".join(_bracketed(a) for a in instance.addresses)
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": instance.queue_dir,
        "data_directory": instance.data_dir,
        "maillog_file": instance.log_path,
        "maillog_file_prefixes": instance.directory,
        "myhostname": f"mx.{DOMAIN}",
        "mydomain": DOMAIN,
        "myorigin": "$myhostname",
        "inet_interfaces": interfaces,
        "inet_protocols": "all",
        "mynetworks": "127.0.0.0/8 [::1]/128",
        # mail for example.test is relayed; only the listed recipients exist
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "relay_domains": DOMAIN,
        "relay_recipient_maps": f"texthash:{instance.config_dir / 'recipients'}",
        # accepted mail never leaves the lab
        "relayhost": "",
        "relay_transport": "discard:",
        "default_transport": "discard:",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "lmtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        "smtpd_banner": "$myhostname ESMTP",
        "smtpd_helo_required": "yes",
        "smtpd_delay_reject": "yes",
        "disable_vrfy_command": "yes",
        "smtpd_reject_unlisted_recipient": "yes",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": "reject_non_fqdn_recipient, permit",
        "smtpd_data_restrictions": "reject_unauth_pipelining",
        "biff": "no",
    }
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


def _grant_search(directory, uid):
    """Let user `uid` (only) pass through `directory`: a POSIX ACL, else o+x."""
    mode = directory.stat().st_mode
    undefined = 0xFFFFFFFF
    group = (mode >> 3) & 7
    entries = (
        (0x01, (mode >> 6) & 7, undefined),  # owner
        (0x02, 1, uid),  # the mail owner: search only
        (0x04, group, undefined),  # owning group
        (0x10, group | 1, undefined),  # mask
        (0x20, mode & 7, undefined),  # others
    )
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(directory, "system.posix_acl_access", acl)
    except OSError:
        os.chmod(directory, (mode & 0o7777) | 0o001)


def _process_group(pgid):
    """Pids of the live processes in process group `pgid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


class PostfixInstance:
    """A private Postfix MX for example.test on port 25 inside namespace `ns`."""

    # Everything lives under `directory`: config/, queue/, data/ and mail.log.
    # Only `recipients` (local parts) exist in example.test: any other
    # recipient there is refused at RCPT time with 550 5.1.1 User unknown.

    def __init__(self, ns, directory, addresses, recipients=RECIPIENTS):
        """Describe the instance; nothing is written or started yet."""
        self.ns = ns
        self.directory = Path(directory).resolve()
        self.addresses = [lab_address(a) for a in addresses]
        self.recipients = tuple(recipients)
        self.config_dir = self.directory / "config"
        self.queue_dir = self.directory / "queue"
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "mail.log"
        self.master_pid = None

    def __enter__(self):
        """Start, and hand back the running instance."""
        return self.start()

    def __exit__(self, *exc_info):
        """Stop, leaving no process behind."""
        self.stop()

    def postfix(self, *args, timeout=30.0, terminal=False):
        """Run the postfix command for this instance inside the namespace."""
        command = ["ip", "netns", "exec", self.ns, "postfix", "-c"]
        command += [str(self.config_dir), *args]
        if terminal and shutil.which("script"):
            # postfix prints why it fails on stderr only when that is a terminal
            command = ["script", "-qec", shlex.join(command), "/dev/null"]
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout=30.0):
        """Write the configuration, start the master, wait for port 25; self."""
        deadline = time.monotonic() + timeout
        self._prepare_directories()
        self._wait_for_addresses(deadline)

        result = self.postfix("start", timeout=timeout)
        if result.returncode != 0:
            check = self.postfix("check", timeout=timeout, terminal=True)
            reason = check.stdout.replace("\r", "").strip()
            raise RuntimeError(
                f"postfix -c {self.config_dir} start in {self.ns} exited "
                f"{result.returncode}; postfix check says: {reason}\n"
                + "\n".join(self.log_lines()[-10:])
            )
        self.master_pid = int((self.queue_dir / "pid" / "master.pid").read_text())

        try:
            self._wait_for_listeners(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout=15.0):
        """Stop the master and make sure none of its processes is left."""
        if self.master_pid is None:
            return
        self.postfix("stop", timeout=timeout)

        deadline = time.monotonic() + timeout
        while _process_group(self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = _process_group(self.master_pid)
        for pid in leftover:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.master_pid = None
        if leftover:
            raise RuntimeError(f"postfix processes {leftover} ignored SIGTERM")

    def log_lines(self):
        """Every line of mail.log so far."""
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_for_log(self, text, count=1, timeout=10.0):
        """The lines containing `text` once there are `count`; else TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines()
            found = [line for line in lines if text in line]
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                tail = "\n".join(lines[-15:])
                raise TimeoutError(
                    f"{len(found)}/{count} lines with {text!r} in "
                    f"{self.log_path} after {timeout}s; log ends:\n{tail}"
                )
            time.sleep(0.05)

    def _prepare_directories(self):
        """Config files, and directories that postfix start can complete and reach."""
        owner = pwd.getpwnam(MAIL_OWNER)
        # postfix start creates the rest (post-install create-missing)
        for directory in (self.config_dir, self.queue_dir):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        # daemons running as the mail owner open data_directory by its full path
        for directory in (self.directory, *self.directory.parents):
            if not directory.stat().st_mode & 0o001:
                _grant_search(directory, owner.pw_uid)

        files = {
            "main.cf": _main_cf(self),
            "master.cf": MASTER_CF,
            "recipients": "".join(f"{name}@{DOMAIN} OK\n" for name in self.recipients),
        }
        settled = time.time() - 60
        for name, text in files.items():
            path = self.config_dir / name
            path.write_text(text)
            # Postfix re-reads a file changed in the last 2 s until it is older
            os.utime(path, (settled, settled))

    def _wait_for_addresses(self, deadline):
        """Wait until every listen address is past IPv6 duplicate detection."""
        wanted = {str(a) for a in self.addresses}
        while True:
            output = subprocess.run(
                ["ip", "-n", self.ns, "-o", "addr", "show"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            ready, tentative = set(), set()
            for line in output.splitlines():
                address = line.split()[3].split("/")[0]
                (tentative if "tentative" in line else ready).add(address)
            if wanted - ready - tentative:
                raise RuntimeError(f"{wanted - ready - tentative} not in {self.ns}")
            if wanted <= ready:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{wanted - ready} still tentative in {self.ns}")
            time.sleep(0.1)

    def _wait_for_listeners(self, deadline):
        """Wait until the namespace listens on port 25 of every address."""
        wanted = {(a, SMTP_PORT) for a in self.addresses}
        while True:
            output = subprocess.run(
                ["ip", "netns", "exec", self.ns, "ss", "-Hltn"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            listening = set()
            for line in output.splitlines():
                host, _, port = line.split()[3].rpartition(":")
                host = host.strip("[]").split("%")[0]
                if host not in ("*", "0.0.0.0", "::"):
                    listening.add((ipaddress.ip_address(host), int(port)))
            if wanted <= listening:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no SMTP listener on {wanted - listening}")
            time.sleep(0.05)


def swaks(
    ns,
    server_ip,
    to,
    mail_from="sender@example.org",
    *,
    source_ip=None,
    helo="client.example.org",
    timeout=10,
    extra=(),
):
    """One SMTP transaction by swaks from namespace `ns`; its CompletedProcess."""
    # mail_from "" or "<>" is the null sender; swaks exits 24 when every
    # recipient was refused and 0 when the message was queued
    server = lab_address(server_ip)
    recipients = [to] if isinstance(to, str) else list(to)
    target = f"{_bracketed(server)}:{SMTP_PORT}"
    command = ["ip", "netns", "exec", ns, "swaks", "--config"]  # no ~/.swaksrc
    command += [f"-{server.version}"]
    command += ["--server", target, "--to", ",".join(recipients)]
    command += ["--from", mail_from or "<>", "--helo", helo]
    command += ["--timeout", f"{timeout}s", "--suppress-data"]
    if source_ip is not None:
        command += ["--local-interface", str(lab_address(source_ip))]
    return subprocess.run(
        [*command, *extra],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
