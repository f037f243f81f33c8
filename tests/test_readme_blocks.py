"""The helpers that run README blocks leave the machine as they found it.

The README's local Ray block needs 127.0.0.1:8265 for `ray start --head`'s dashboard. A
forward left listening there by the cluster-block test made that dashboard fail to start
silently and `ray job submit` hang for 15 minutes (Ray's job start timeout): CI's failure.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from readme_blocks import forward, port_is_free


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_forward_pipes_bytes_and_frees_its_port_when_closed():
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(1)

    def echo() -> None:
        conn, _ = upstream.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=echo, daemon=True).start()
    port = _free_port()
    with forward(port, upstream.getsockname()[1]):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(100) == b"PING"
        assert not port_is_free(port)
    upstream.close()
    assert port_is_free(port)


def test_a_client_of_a_forward_whose_far_end_is_gone_is_closed_not_left_hanging():
    gone = _free_port()  # nothing listens there
    port = _free_port()
    with forward(port, gone), socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        # Closed at once (EOF or reset), as ssh -L does when the far end refuses.
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(100) == b""
