"""A real private Postfix in a namespace logs what the sender profiler reads."""

import re
import subprocess

import pytest

try:
    from tests.conftest import require_root_tools
    from tests.netns import Lab
    from tests.postfix_lab import PostfixInstance
    from tests.postfix_lab import swaks
except ModuleNotFoundError:  # tests/ is no package: pytest put it on sys.path
    from conftest import require_root_tools
    from netns import Lab
    from postfix_lab import PostfixInstance
    from postfix_lab import swaks

APPLIANCE_V4 = "192.0.2.1"
APPLIANCE_V6 = "2001:db8::1"
SENDER_V4 = "192.0.2.10"
SENDER_V6 = "2001:db8:1::10"

# "Dec 04 15:31:46 mx postfix/smtpd[5888]: text", the stamp maillog_file writes
LOG_LINE = re.compile(
    r"[A-Z][a-z]{2} \d{2} \d{2}:\d{2}:\d{2} mx postfix/([a-z-]+)\[\d+\]: (.*)"
)


def messages(mx, program):
    """The texts `program` (smtpd, qmgr, ...) logged, each line's format checked."""
    texts = []
    for line in mx.log_lines():
        match = LOG_LINE.fullmatch(line)
        assert match, f"unexpected log line format: {line!r}"
        if match[1] == program:
            texts.append(match[2])
    return texts


def queue_id(result):
    """The queue id of the message swaks got accepted."""
    match = re.search(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)", result.stdout)
    assert match, result.stdout + result.stderr
    return match[1]


@pytest.fixture(scope="module")
def lab():
    """Appliance and sender namespaces on one lab bridge: (appliance, sender)."""
    require_root_tools("ip", "postfix", "swaks")
    with Lab() as lab:
        appliance = lab.add_host("mx", APPLIANCE_V4, APPLIANCE_V6)
        sender = lab.add_host("sender", SENDER_V4, SENDER_V6)
        yield appliance.name, sender.name


@pytest.fixture
def mx(lab, tmp_path):
    """A fresh Postfix MX for example.test at 192.0.2.1 and 2001:db8::1."""
    appliance, _ = lab
    with PostfixInstance(appliance, tmp_path, [APPLIANCE_V4, APPLIANCE_V6]) as mx:
        yield mx


@pytest.fixture
def sender(lab):
    """The namespace the test mail comes from."""
    return lab[1]


def test_unknown_recipient_refused_at_rcpt(mx, sender):
    """An unknown example.test recipient gets 550 5.1.1 and a NOQUEUE reject."""
    result = swaks(
        sender,
        APPLIANCE_V4,
        "x@example.test",
        mail_from="harvester@example.org",
        source_ip=SENDER_V4,
    )

    assert result.returncode == 24, result.stdout  # swaks: every RCPT refused
    mx.wait_for_log("disconnect from")
    assert messages(mx, "smtpd") == [
        "connect from unknown[192.0.2.10]",
        "NOQUEUE: reject: RCPT from unknown[192.0.2.10]: 550 5.1.1 <x@example.test>:"
        " Recipient address rejected: User unknown in relay recipient table;"
        " from=<harvester@example.org> to=<x@example.test> proto=ESMTP"
        " helo=<client.example.org>",
        "disconnect from unknown[192.0.2.10] ehlo=1 mail=1 rcpt=0/1 quit=1"
        " commands=3/4",
    ]


def test_known_recipient_accepted_and_queued(mx, sender):
    """Mail to alice is queued: smtpd client= and qmgr from= share its queue id."""
    result = swaks(
        sender,
        APPLIANCE_V4,
        "alice@example.test",
        mail_from="friend@example.org",
        source_ip=SENDER_V4,
    )

    assert result.returncode == 0, result.stdout
    queued = queue_id(result)
    mx.wait_for_log(f"{queued}: removed")
    assert f"{queued}: client=unknown[192.0.2.10]" in messages(mx, "smtpd")
    [active, removed] = messages(mx, "qmgr")
    assert re.fullmatch(
        rf"{queued}: from=<friend@example\.org>, size=\d+, nrcpt=1 \(queue active\)",
        active,
    )
    assert removed == f"{queued}: removed"


def test_unknown_recipient_beside_known_one_logged_with_queue_id(mx, sender):
    """Once a RCPT was accepted, a later reject carries the queue id, not NOQUEUE."""
    result = swaks(
        sender,
        APPLIANCE_V4,
        ["bob@example.test", "y@example.test"],
        mail_from="mixed@example.org",
        source_ip=SENDER_V4,
    )

    assert result.returncode == 0, result.stdout
    queued = queue_id(result)
    mx.wait_for_log("disconnect from")
    rejects = [text for text in messages(mx, "smtpd") if "reject:" in text]
    assert rejects == [
        f"{queued}: reject: RCPT from unknown[192.0.2.10]: 550 5.1.1"
        " <y@example.test>: Recipient address rejected: User unknown in relay"
        " recipient table; from=<mixed@example.org> to=<y@example.test>"
        " proto=ESMTP helo=<client.example.org>"
    ]
    assert messages(mx, "smtpd")[-1] == (
        "disconnect from unknown[192.0.2.10] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1"
        " commands=5/6"
    )


def test_ipv6_sender_accepted(mx, sender):
    """An IPv6 client is logged by its bare address in brackets."""
    result = swaks(
        sender,
        APPLIANCE_V6,
        "bob@example.test",
        mail_from="friend6@example.org",
        source_ip=SENDER_V6,
    )

    assert result.returncode == 0, result.stdout
    queued = queue_id(result)
    mx.wait_for_log(f"{queued}: removed")
    assert messages(mx, "smtpd")[:2] == [
        "connect from unknown[2001:db8:1::10]",
        f"{queued}: client=unknown[2001:db8:1::10]",
    ]
    assert messages(mx, "qmgr")[0].startswith(f"{queued}: from=<friend6@example.org>")


def test_null_sender_dsn_queued_from_empty_sender(mx, sender):
    """A bounce (MAIL FROM:<>) to alice shows in qmgr as from=<>."""
    result = swaks(
        sender,
        APPLIANCE_V4,
        "alice@example.test",
        mail_from="",
        source_ip=SENDER_V4,
    )

    assert result.returncode == 0, result.stdout
    assert "MAIL FROM:<>" in result.stdout
    queued = queue_id(result)
    mx.wait_for_log(f"{queued}: removed")
    assert messages(mx, "qmgr")[0].startswith(f"{queued}: from=<>, size=")


def test_stop_leaves_no_process_in_namespace(lab, tmp_path):
    """After stop() nothing runs in the namespace any more."""
    appliance, _ = lab
    mx = PostfixInstance(appliance, tmp_path, [APPLIANCE_V4])

    mx.start()
    running = subprocess.run(
        ["ip", "netns", "pids", appliance], capture_output=True, text=True, timeout=10
    ).stdout.split()
    mx.stop()

    assert len(running) >= 3  # master, qmgr, pickup at least
    left = subprocess.run(
        ["ip", "netns", "pids", appliance], capture_output=True, text=True, timeout=10
    ).stdout.split()
    assert left == []
    assert mx.wait_for_log("stopping the Postfix mail system", timeout=10)


def test_swaks_refuses_a_server_outside_the_lab():
    """swaks() never talks to an address outside the documentation ranges."""
    with pytest.raises(ValueError, match="outside the lab"):
        swaks("sf-pf-unused", "203.0.113.5", "alice@example.test")
