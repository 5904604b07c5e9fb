"""The policy port: a ThreadingTCPServer speaking Postfix's policy delegation protocol.

One thread per Postfix connection; each connection carries many requests, one at a
time. Bytes go through the sans-I/O ``codec``; decisions come from the ``Engine``.
Connections stay open as long as Postfix keeps them (it closes idle ones itself after
``smtpd_policy_service_max_idle``); bad input closes only the offending connection.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from ratelimit_policyd.codec import PolicyDecoder, ProtocolError

log = logging.getLogger(__name__)

#: accept() errors that leave the connection waiting and the listening socket readable:
#: retried at once, they would spin the acceptor (see ``PolicyServer.get_request``).
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})
_OUT_OF_MEMORY: Final = frozenset({errno.ENOBUFS, errno.ENOMEM})
#: How long the acceptor pauses when it cannot even refuse a connection.
ACCEPT_BACKOFF: Final = 0.1
#: At most one "out of file descriptors" error line per this many seconds.
FD_LOG_INTERVAL: Final = 10.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port). ValueError when malformed."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port_s}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return host, port


def parse_networks(items: Iterable[str]) -> list[Network]:
    """Addresses or networks (``127.0.0.1``, ``10.0.0.0/8``, ``::1``)."""
    return [ipaddress.ip_network(item.strip(), strict=False) for item in items]


class AccessList:
    """Which client addresses may use the policy port; results cached per address."""

    def __init__(self, networks: list[Network]) -> None:
        self.networks = networks
        self._seen: dict[str, bool] = {}

    def allows(self, address: str) -> bool:
        ok = self._seen.get(address)
        if ok is None:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return False
            mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a v6 socket
            ok = any(ip in net or (mapped is not None and mapped in net)
                     for net in self.networks)
            if len(self._seen) < 10_000:
                self._seen[address] = ok
        return ok


class PolicyHandler(socketserver.BaseRequestHandler):
    """Serves one Postfix connection until it closes, goes idle too long, or misbehaves."""

    server: PolicyServer

    def handle(self) -> None:
        srv = self.server
        sock: socket.socket = self.request
        peer = self.client_address[0]
        handle = srv.handle_request_attrs
        decoder = PolicyDecoder(max_request_bytes=srv.max_request_bytes)
        # A blocking socket with kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO) rather than
        # Python's settimeout(): the latter turns every recv/send into poll()+recv(),
        # two GIL round trips per call, which costs more than the whole decision when
        # hundreds of connection threads compete for the GIL.
        recv = sock.recv
        send = sock.send
        idle_timeout = srv.idle_timeout
        request_timeout = srv.request_timeout
        _set_timeouts(sock, idle_timeout)
        mid_request = False
        deadline = 0.0
        while True:
            try:
                data = recv(16384)
            except BlockingIOError:  # SO_RCVTIMEO expired
                if mid_request:
                    log.warning("client %s sent an incomplete request and then nothing for "
                                "%.0f s; closing", peer, request_timeout)
                else:
                    log.info("client %s idle for %.0f s; closing", peer, idle_timeout)
                return
            except OSError:
                return
            if not data:
                if mid_request:
                    log.warning("client %s closed the connection in the middle of a request",
                                peer)
                return
            try:
                requests = decoder.feed(data)
            except ProtocolError as exc:
                log.warning("client %s: %s; closing the connection", peer, exc)
                return
            if requests:
                # Postfix sends one request at a time; a pipelining client gets its
                # replies in order, in one write.
                if len(requests) == 1:
                    out = handle(requests[0])
                else:
                    out = b"".join([handle(r) for r in requests])
                try:
                    sent = send(out)
                    if sent != len(out):
                        sock.sendall(out[sent:])
                except OSError:  # includes SO_SNDTIMEO expiry: the client stopped reading
                    return
            if decoder.pending:
                # A request has started: it must be complete by its deadline, however
                # slowly the bytes trickle in (a per-receive timeout would let a client
                # sending one byte a second hold the thread for 18 hours).
                now = time.monotonic()
                if not mid_request:
                    mid_request = True
                    deadline = now + request_timeout
                elif now >= deadline:
                    log.warning("client %s did not complete a request within %.0f s; closing",
                                peer, request_timeout)
                    return
                _set_timeouts(sock, deadline - now)
            elif mid_request:
                mid_request = False
                _set_timeouts(sock, idle_timeout)


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    seconds = max(seconds, 0.001)  # a zero timeval would mean "no timeout"
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class PolicyServer(socketserver.ThreadingTCPServer):
    """Threaded policy server; tracks its connections so a stop can drain them."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handle: Callable[[dict[str, str]], bytes], *,
                 allowed: AccessList, max_connections: int = 1000,
                 max_request_bytes: int = 64 * 1024, idle_timeout: float = 600.0,
                 request_timeout: float = 30.0, bind_and_activate: bool = True) -> None:
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.handle_request_attrs = handle
        self.allowed = allowed
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.stopping = False
        self.connections_total = 0
        self.rejected_total = 0
        #: Connections refused because the process was out of file descriptors.
        self.fd_refused_total = 0
        self._fd_refused_unlogged = 0
        self._fd_next_log = 0.0
        self._reserve_fd: int | None = None
        super().__init__(address, PolicyHandler, bind_and_activate)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def connections(self) -> int:
        return len(self._conns)

    def reserve_descriptor(self) -> None:
        """Hold one spare file descriptor, spent to refuse a connection at EMFILE.

        Called once the process is in its final state (after python-daemon has closed
        every descriptor it was not told to keep).
        """
        if self._reserve_fd is None:
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                self._refuse_without_descriptor(exc)
            elif exc.errno in _OUT_OF_MEMORY:
                time.sleep(ACCEPT_BACKOFF)  # the connection waits in the backlog
            raise  # socketserver drops the error and polls again

    def _refuse_without_descriptor(self, exc: OSError) -> None:
        """Out of file descriptors: refuse the waiting connection at once, never spin.

        socketserver would poll again at once, find the listening socket still readable
        (the connection is still queued) and fail again: a busy loop, while Postfix
        waits its full policy timeout for an answer. Instead the reserve descriptor is
        freed to accept the connection and close it: Postfix sees the failure at once
        and retries after its retry_delay, or applies its default action, as for a
        connection over max_connections. Waiting for a descriptor instead (leaving the
        connection queued) would hold Postfix for as long as every connection stays
        open, up to its timeout. Without a reserve (it could not be re-opened), the
        acceptor pauses ACCEPT_BACKOFF instead.
        """
        refused = False
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None
            try:
                conn, _addr = self.socket.accept()
            except OSError:
                pass  # another thread took the freed descriptor, or nothing waits now
            else:
                conn.close()
                refused = True
            with contextlib.suppress(OSError):
                self.reserve_descriptor()
        if refused:
            self.fd_refused_total += 1
            self.rejected_total += 1
            self._fd_refused_unlogged += 1
        now = time.monotonic()
        if now >= self._fd_next_log:
            self._fd_next_log = now + FD_LOG_INTERVAL
            log.error("out of file descriptors (%s) at %d open connections: %d connection(s) "
                      "refused since the last such message; raise the limit of open files "
                      "(LimitNOFILE=, ulimit -n) or lower server.max_connections",
                      exc.strerror or exc, len(self._conns), self._fd_refused_unlogged)
            self._fd_refused_unlogged = 0
        if self._reserve_fd is None:
            time.sleep(ACCEPT_BACKOFF)  # nothing to refuse with: do not spin meanwhile

    def server_close(self) -> None:
        super().server_close()
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        addr = client_address[0]
        if not self.allowed.allows(addr):
            self.rejected_total += 1
            log.warning("client %s not in allowed_hosts; connection closed", addr)
            return False
        if len(self._conns) >= self.max_connections:
            self.rejected_total += 1
            log.warning("client %s refused: %d connections open (max_connections)", addr,
                        len(self._conns))
            return False
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._conns.add(request)
            self.connections_total += 1
        try:
            super().process_request(request, client_address)
        except Exception:
            with self._conn_lock:
                self._conns.discard(request)
            raise

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def drain(self, timeout: float) -> int:
        """After ``shutdown()``: end every connection once its current request is answered.

        Shutting down only the read side makes an idle handler's ``recv`` return EOF,
        while a handler that is deciding a request can still send its reply.
        Returns the number of connections still open at the deadline.
        """
        self.stopping = True
        with self._conn_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        deadline = threading.Event()
        waited = 0.0
        while self._conns and waited < timeout:
            deadline.wait(0.05)
            waited += 0.05
        return len(self._conns)
