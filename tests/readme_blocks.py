"""Helpers to run the README's shell blocks as written: find a block, forward a port.

`ray dashboard ray_cluster.yaml` is an SSH port forward from 127.0.0.1:8265 to the head's
dashboard; `forward` is the same thing without SSH, for a head on this machine.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Iterator

from conftest import ROOT


def bash_block(heading: str, text: str | None = None) -> str:
    """The first ```bash block after `heading` in README.md."""
    text = text if text is not None else (ROOT / "README.md").read_text()
    start = text.index(heading)
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no bash block after {heading!r}"
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


@contextlib.contextmanager
def forward(listen_port: int, target_port: int) -> Iterator[None]:
    """Accept on 127.0.0.1:listen_port and pipe each connection to 127.0.0.1:target_port.

    On leaving, the port is free again (checked): the next test or README block may need it.
    """
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(64)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", target_port))
            except OSError:
                client.close()  # as an SSH tunnel does when the far end refuses: the client sees EOF
                continue
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield
    finally:
        # close() alone leaves the port listening on Linux while another thread sits in
        # accept() (the call holds the socket); shutdown() wakes it with an error first.
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        acceptor.join(timeout=10)
    assert port_is_free(listen_port), f"127.0.0.1:{listen_port} still taken after the forward closed"


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now. SO_REUSEADDR as servers set it
    (aiohttp, Ray's GCS): a closed connection's TIME_WAIT does not count, a listener does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
