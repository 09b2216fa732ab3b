"""A Debian 12 disk image for the VM test, built once and reused while unchanged.

The image holds every Debian package the playbook installs (read from the
role's defaults), Debian's ansible-core to run it inside, and openssh-server
for the test to drive it, so the VM needs no network beyond the test's lab.
It is made with debootstrap from the mirror this machine's apt uses, packed
with `mkfs.ext4 -d` (no loop mount), and kept under SCRATCH keyed by what went
into it; an older image there is removed when a new one is built.
"""

import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCRATCH = Path("/var/tmp/sender-filter-vm")
DEFAULTS = REPO / "provisioning/roles/sender_filter/defaults/main.yml"
SUITE = "bookworm"
DISK_SIZE = "3G"
# bump when the steps below change what ends up in the image
RECIPE = 1

# what debootstrap can resolve by itself; the rest goes in with apt-get
BOOTSTRAP = ["systemd", "systemd-sysv", "udev", "kmod", "iproute2", "python3"]
EXTRA = [
    "linux-image-amd64",
    "initramfs-tools",
    "openssh-server",
    "ansible-core",
    "python3-apt",
    "ca-certificates",
]
NETWORK_FILE = """\
[Match]
Name=eth0

[Network]
Address=192.0.2.2/24
"""


class ImageError(RuntimeError):
    """A build step failed; the message quotes the command."""


def role_packages():
    """The Debian packages the role installs, from its defaults."""
    defaults = yaml.safe_load(DEFAULTS.read_text())
    return list(defaults["sender_filter_packages"])


def mirror():
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    listed = Path("/etc/apt/sources.list.d")
    sources = [Path("/etc/apt/sources.list"), *sorted(listed.glob("*"))]
    for path in sources:
        text = path.read_text() if path.is_file() else ""
        for url in re.findall(r"(?:URIs:|^deb)\s+(\S+)", text, re.MULTILINE):
            if url.rstrip("/").endswith("/debian"):
                return url
    raise ImageError("no Debian mirror found in apt's sources")


def image_key(packages):
    """A short hash of everything that decides the image's contents."""
    recipe = json.dumps([RECIPE, SUITE, BOOTSTRAP, EXTRA, sorted(packages)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def run(argv, timeout=1200, **kwargs):
    """Run one build command; ImageError quoting it on failure."""
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise ImageError(f"`{' '.join(argv)}` exited {result.returncode}: {tail}")
    return result


def ensure_image(log=print):
    """The directory of a ready image (disk.img, vmlinuz, initrd.img, ssh key)."""
    packages = role_packages()
    key = image_key(packages)
    image = SCRATCH / f"image-{key}"
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with open(SCRATCH / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (image / "ready").exists():
            log(f"reusing VM image {image}")
            return image
        for old in SCRATCH.glob("image-*"):
            shutil.rmtree(old, ignore_errors=True)
        started = time.monotonic()
        try:
            build(image, packages, log)
        except BaseException:
            unmount_all(image / "root")
            shutil.rmtree(image, ignore_errors=True)
            raise
        (image / "ready").write_text(f"{time.monotonic() - started:.0f}\n")
        log(f"built VM image {image} in {time.monotonic() - started:.0f} s")
    return image


def build(image, packages, log):
    """debootstrap a root, add packages and settings, pack it into disk.img."""
    root = image / "root"
    image.mkdir(parents=True)
    log(f"debootstrap {SUITE} from {mirror()}")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BOOTSTRAP)}",
            SUITE,
            str(root),
            mirror(),
        ]
    )

    try:
        for kind, target in (("proc", "proc"), ("sysfs", "sys")):
            run(["mount", "-t", kind, kind, str(root / target)])
        install(root, [*EXTRA, *packages])
    finally:
        unmount_all(root)
    configure(root, image)

    shutil.copy(root / "vmlinuz", image / "vmlinuz")
    shutil.copy(root / "initrd.img", image / "initrd.img")
    disk = image / "disk.img"
    run(["mkfs.ext4", "-q", "-L", "root", "-d", str(root), str(disk), DISK_SIZE])
    shutil.rmtree(root)


def unmount_all(root):
    """Unmount everything under the root (postinst scripts may mount too)."""
    for _attempt in range(10):
        with open("/proc/mounts") as mounts:
            inside = [
                line.split()[1]
                for line in mounts
                if line.split()[1].startswith(f"{root}/")
            ]
        if not inside:
            return
        for path in sorted(inside, reverse=True):
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=60)
    raise ImageError(f"cannot unmount what is mounted under {root}")


def install(root, packages):
    """apt-get install inside the root, no service started, Postfix unconfigured."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    chroot = ["chroot", str(root)]
    env = {
        "DEBIAN_FRONTEND": "noninteractive",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    run(
        [*chroot, "debconf-set-selections"],
        input="postfix postfix/main_mailer_type select No configuration\n",
        env=env,
    )
    run([*chroot, "apt-get", "update", "-qq"], env=env)
    run(
        [*chroot, "apt-get", "install", "-y", "-qq", "--no-install-recommends"]
        + packages,
        env=env,
    )
    run([*chroot, "apt-get", "clean"], env=env)
    policy.unlink()


def configure(root, image):
    """Host name, network, fstab, root's ssh key, no waiting for a network."""
    (root / "etc/hostname").write_text("appliance\n")
    (root / "etc/hosts").write_text(
        "127.0.0.1 localhost\n192.0.2.2 appliance.example.org appliance\n"
    )
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    (root / "etc/resolv.conf").write_text("")
    (root / "etc/systemd/network/10-lab.network").write_text(NETWORK_FILE)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    networkd = wants / "systemd-networkd.service"
    if not networkd.exists():
        networkd.symlink_to("/lib/systemd/system/systemd-networkd.service")

    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(image / "id")])
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(image / "id.pub", ssh_dir / "authorized_keys")
    (ssh_dir / "authorized_keys").chmod(0o600)
