"""A service's start waits for its port while closing connections hold it, and refuses a foreign listener.

Real sockets on 127.0.0.1: the kernel's own bind rules are what is under test.
"""

import contextlib
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from devstack.config import EPHEMERAL_PORTS_START, INSTANCE_ENV, INSTANCES, load_config
from devstack.process import StackError, ensure_port_free, port_bindable


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server
    server.close()


def connect_from_own_port(server: socket.socket) -> tuple[socket.socket, socket.socket, int]:
    """A connection to ``server`` whose client end holds a port of its own, as an outgoing connection does.

    The port lies below the kernel's ephemeral range, as the stack's do: a port inside it may also be the local
    end of any other process's outgoing connection (to another address), which would hold it after the test's
    connection closed. Once, in a full run with the suite's services busy, the port was still held 10 s after
    both ends had closed."""
    rng = random.Random()
    for _ in range(100):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            client.bind(("127.0.0.1", rng.randrange(20_000, EPHEMERAL_PORTS_START)))
        except OSError:
            client.close()
            continue
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        return client, accepted, client.getsockname()[1]
    raise AssertionError("no free port below the ephemeral range")


def test_a_free_port_is_taken_at_once():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    ensure_port_free("svc", port, timeout=5)
    assert time.monotonic() - started < 1


def test_a_foreign_listener_is_refused(listener):
    port = listener.getsockname()[1]
    with pytest.raises(StackError, match="already in use by a process this stack did not start"):
        ensure_port_free("svc", port, timeout=5)


def test_a_closed_connections_time_wait_holds_the_port(listener):
    # The incident: the client end of another stack's connection had used our port, and had just closed.
    client, accepted, port = connect_from_own_port(listener)
    client.close()  # the end that closes first keeps the port in TIME-WAIT
    time.sleep(0.1)
    accepted.close()
    time.sleep(0.1)
    assert not port_bindable(port)
    with pytest.raises(StackError, match="still held by another process's connection after 1s"):
        ensure_port_free("svc", port, timeout=1)


def test_the_start_goes_on_once_the_connection_lets_the_port_go(listener):
    client, accepted, port = connect_from_own_port(listener)
    assert not port_bindable(port)

    def close_later() -> None:
        time.sleep(1)
        accepted.close()  # the server's end closes first, so the client's port is released when it closes
        time.sleep(0.1)
        client.close()

    closer = threading.Thread(target=close_later)
    closer.start()
    started = time.monotonic()
    ensure_port_free("svc", port, timeout=10)
    waited = time.monotonic() - started
    closer.join()
    assert 1 <= waited < 5


@pytest.mark.parametrize("instance", sorted(INSTANCES))
def test_every_instances_ports_lie_below_the_ephemeral_range(instance: str, monkeypatch: pytest.MonkeyPatch):
    # Inside it, any outgoing connection on the machine can hold a stack port when the service binds it.
    for variable in [name for name in os.environ if name.startswith("STACK_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv(INSTANCE_ENV, instance)
    config = load_config()
    ports = {name: value for name, value in vars(config).items() if name.endswith("_port")}
    assert len(ports) == 8
    low = EPHEMERAL_PORTS_START
    with contextlib.suppress(OSError):  # the machine's own range, where it can be read
        low = min(low, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    assert {name: port for name, port in ports.items() if port >= low} == {}
