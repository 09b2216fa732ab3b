"""The appliance VM: qemu (software emulation) on a lab bridge, driven over ssh.

The VM boots the cached image through a throwaway qcow2 overlay, with a tap
device on the bridge of a tests/netns.py lab, so the lab's hosts reach it at
192.0.2.2. The checkout is shared read-only at /vagrant and the wheelhouse at
the role's default wheelhouse path (9p), the way Vagrant's synced folder and
the Vagrantfile's wheelhouse step lay them out for ansible_local.
"""

import json
import re
import shutil
import subprocess
import time

from tests.netns import NetnsError
from tests.vm.image import REPO
from tests.vm.image import SCRATCH

ADDRESS = "192.0.2.2"
WHEELHOUSE = "/var/cache/sender-filter/wheelhouse"
BOOT_TIMEOUT = 300
PLAYBOOK_TIMEOUT = 1500
RECAP = re.compile(
    r"^appliance\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
INVENTORY = "[mail_gateways]\nappliance ansible_connection=local\n"


class MachineError(RuntimeError):
    """The VM did not boot, or a command in it failed; the message says which."""


def build_wheelhouse(directory):
    """provisioning/build-wheelhouse with Debian's python3, as the VM runs it."""
    result = subprocess.run(
        [str(REPO / "provisioning/build-wheelhouse"), str(directory)],
        capture_output=True,
        text=True,
        timeout=900,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(directory.parent)},
    )
    if result.returncode != 0:
        raise MachineError(f"build-wheelhouse failed: {result.stderr.strip()}")
    return sorted(path.name for path in directory.glob("*.whl"))


class Machine:
    """One appliance VM on a lab's bridge; `stop` removes what it made."""

    def __init__(self, lab, image, workdir, control):
        """A VM booting `image` from an overlay in `workdir`, reached via `control`."""
        self.lab = lab
        self.image = image
        self.workdir = workdir
        self.control = control
        self.console_log = workdir / "console.log"
        self.process = None

    def boot(self, wheelhouse):
        """Start qemu on the lab's bridge; return once ssh answers."""
        overlay = self.workdir / "overlay.qcow2"
        subprocess.run(
            [
                "qemu-img", "create", "-q", "-f", "qcow2",
                "-b", str(self.image / "disk.img"), "-F", "raw", str(overlay),
            ],
            check=True,
            timeout=60,
        )  # fmt: skip
        switch = self.lab._switch()
        switch.run("ip", "tuntap", "add", "dev", "tap0", "mode", "tap")
        switch.run("ip", "link", "set", "tap0", "master", "br0", "up")

        # qemu writes the serial console here; our handle is closed once it runs
        output = open(self.console_log, "w")
        self.process = switch.spawn_logged(
            output,
            "qemu-system-x86_64",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "2048",
            "-nographic", "-no-reboot", "-monitor", "none",
            "-kernel", str(self.image / "vmlinuz"),
            "-initrd", str(self.image / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-netdev", "tap,id=lan,ifname=tap0,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=lan",
            "-virtfs", f"local,path={REPO},mount_tag=vagrant,"
            "security_model=none,readonly=on",
            "-virtfs", f"local,path={wheelhouse},mount_tag=wheelhouse,"
            "security_model=none,readonly=on",
        )  # fmt: skip
        output.close()

        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MachineError(f"qemu exited: {self.console_tail()}")
            if self.ssh("true", check=False, timeout=20).returncode == 0:
                return
            time.sleep(2)
        raise MachineError(f"no ssh within {BOOT_TIMEOUT} s: {self.console_tail()}")

    def console_tail(self, lines=30):
        """The last lines the VM wrote to its serial console."""
        text = self.console_log.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def ssh(self, command, check=True, timeout=120, stdin=None):
        """Run a shell command as root in the VM, from the control host."""
        argv = [
            "ssh", "-F", "/dev/null", "-i", str(self.image / "id"),
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", f"root@{ADDRESS}", command,
        ]  # fmt: skip
        try:
            result = self.control.run(*argv, check=False, timeout=timeout, stdin=stdin)
        except subprocess.TimeoutExpired as exc:
            raise MachineError(f"`{command}` in the VM took over {timeout} s") from exc
        if check and result.returncode != 0:
            raise MachineError(
                f"`{command}` in the VM exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-3000:]}"
            )
        return result

    def share_checkout(self):
        """Mount the checkout at /vagrant and the wheelhouse, read-only (9p)."""
        self.ssh(
            f"mkdir -p /vagrant {WHEELHOUSE} && "
            "mount -t 9p -o trans=virtio,version=9p2000.L,ro vagrant /vagrant && "
            f"mount -t 9p -o trans=virtio,version=9p2000.L,ro wheelhouse {WHEELHOUSE}"
        )

    def provision(self, extra_vars):
        """ansible-playbook inside the VM as ansible_local runs it; the recap."""
        self.ssh("cat > /root/inventory", stdin=INVENTORY)
        self.ssh("cat > /root/vars.json", stdin=json.dumps(extra_vars))
        result = self.ssh(
            "cd /vagrant && ANSIBLE_NOCOLOR=1 PYTHONUNBUFFERED=1 "
            "ansible-playbook -i /root/inventory -e @/root/vars.json "
            "provisioning/site.yml",
            check=False,
            timeout=PLAYBOOK_TIMEOUT,
        )
        recap = RECAP.search(result.stdout)
        if result.returncode != 0 or recap is None:
            journal = self.ssh(
                "journalctl -u sender-filter -u sender-filter-web --no-pager -n 60",
                check=False,
            )
            raise MachineError(
                f"ansible-playbook exited {result.returncode}:\n"
                f"{result.stdout[-6000:]}\n{result.stderr[-2000:]}\n"
                f"the services' journal:\n{journal.stdout[-6000:]}"
            )
        return {key: int(value) for key, value in recap.groupdict().items()}, result

    def stop(self):
        """Power the VM off (killing qemu if it lingers) and delete its files."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.ssh("systemctl poweroff", check=False, timeout=20)
            except (MachineError, NetnsError):
                pass
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.workdir.is_relative_to(SCRATCH):
            shutil.rmtree(self.workdir, ignore_errors=True)
