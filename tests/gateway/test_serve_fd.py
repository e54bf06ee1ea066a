"""``gateway serve --fd N``: serving on an inherited, bound socket (gateway/cli.py), as
the test harness starts its gateway processes (tests/conftest.py GatewayProcess: the
port is held by the harness from its choice on, no other process can take it)."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import inherited_socket_port
from tests.conftest import ROOT, GatewayProcess


def serve_with_fd(fd: int, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``gateway serve --fd fd``, expected to be refused before it serves."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--fd", str(fd)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        pass_fds=pass_fds,
    )


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def test_the_port_is_the_bound_sockets() -> None:
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        assert inherited_socket_port(tcp.fileno()) == tcp.getsockname()[1]
        assert os.fstat(tcp.fileno())  # its own descriptor left open (a copy was read)
    with socket.socket(socket.AF_INET6) as tcp6:
        tcp6.bind(("::1", 0))
        assert inherited_socket_port(tcp6.fileno()) == tcp6.getsockname()[1]
    with socket.socket(socket.AF_UNIX) as unix:
        assert inherited_socket_port(unix.fileno()) is None  # no port: the default stays


def test_what_is_no_bound_stream_socket_is_refused(udp: socket.socket) -> None:
    with socket.socket() as unbound:
        cases = {
            -1: "not a file descriptor",
            1_000_000: "not an open file descriptor",
            0: "not a socket",  # stdin
            udp.fileno(): "not a stream socket",
            unbound.fileno(): "not bound to a port",
        }
        for fd, reason in cases.items():
            with pytest.raises(ValueError, match=reason) as caught:
                inherited_socket_port(fd)
            assert str(caught.value).startswith(f"--fd {fd}: ")


def test_gateway_serve_refuses_a_bad_fd_with_one_line(udp: socket.socket) -> None:
    """Exit 2 and one ``gateway: --fd ...`` line, before the app is made (no traceback
    from uvicorn's start on a descriptor that is no listening socket)."""
    for fd, passed, reason in (
        (udp.fileno(), (udp.fileno(),), "not a stream socket"),
        (987, (), "not an open file descriptor"),
    ):
        done = serve_with_fd(fd, passed)
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"gateway: --fd {fd}: {reason}" + (
            " (Bad file descriptor)\n" if fd == 987 else "\n"
        )


def test_gateway_serve_rejects_an_fd_that_is_no_number() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--fd", "3; rm -rf /"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "argument --fd: invalid int value" in done.stderr


_PIDFD_GETFD = 438  # the same number on every Linux architecture (asm-generic)


def tcp_nodelay_of(pid: int, peer: tuple[str, int]) -> int:
    """TCP_NODELAY of process ``pid``'s socket connected to ``peer`` (Linux: each of its
    descriptors copied with pidfd_getfd and looked at)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            if not os.readlink(Path(f"/proc/{pid}/fd", name)).startswith("socket:"):
                continue
            copy = libc.syscall(_PIDFD_GETFD, pidfd, int(name), 0)
            if copy < 0:
                code = ctypes.get_errno()
                raise OSError(code, f"pidfd_getfd: {errno.errorcode.get(code, code)}")
            with socket.socket(fileno=copy) as sock:
                if sock.family != socket.AF_INET:
                    continue
                try:
                    if sock.getpeername() == peer:
                        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                except OSError:  # not connected (the listening socket)
                    continue
    finally:
        os.close(pidfd)
    raise AssertionError(f"process {pid} holds no socket connected to {peer}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd_getfd is Linux's")
def test_a_connection_to_an_inherited_tcp_socket_has_nagle_off() -> None:
    """A gateway served with --fd (as every GatewayProcess is) sets TCP_NODELAY on its
    connections as on a port it binds itself. uvicorn's own --fd wraps the descriptor as
    an AF_UNIX socket, so asyncio left Nagle on: each answer on a kept-alive connection
    waited for the client's delayed ACK (about 40 ms)."""
    gateway = GatewayProcess({}).start()
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as client:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert client.recv(65536).startswith(b"HTTP/1.1 200 ")  # accepted, served
            assert gateway.proc is not None
            assert tcp_nodelay_of(gateway.proc.pid, client.getsockname()) == 1
    finally:
        gateway.stop()
