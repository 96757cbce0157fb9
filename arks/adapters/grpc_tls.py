"""TLS on a gRPC server's port, as envoyproxy/ratelimit serves it (`GRPC_SERVER_USE_TLS`): the
server's certificate and key from PEM files, read again when they change; with a client CA,
client certificates required and verified against it; with a client SAN, a name each client
certificate must hold."""

from __future__ import annotations

import inspect
import ipaddress
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from arks.adapters import files

log = logging.getLogger("arks.grpc_tls")


@dataclass(frozen=True)
class ServerTls:
    cert: Path  # the certificate chain, PEM
    key: Path  # its private key, PEM
    client_ca: Path | None = None  # client certificates required and verified against this CA
    client_san: str = ""  # a name every client certificate must hold (only with client_ca)


class TlsFilesError(ValueError):
    """A file of a ServerTls that cannot be used; `role` says which: cert, key, pair, client_ca."""

    def __init__(self, role: str, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.role = role
        self.path = path


class _Changing(Exception):
    """The files changed while they were read: read them again later."""


_Stamp = tuple[files.Stamp | None, ...]


class CertificateFiles:
    """The fetcher of `grpc.dynamic_ssl_server_credentials`: gRPC calls it at every handshake,
    and it reads the files again only when one of them changed (inode, size or mtime: a
    Kubernetes Secret's update swaps a symlink). A change that does not load keeps the last good
    certificate, logged once; envoyproxy/ratelimit's CertProvider does the same on its watch."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        for _ in range(3):
            try:
                self._stamp, self.initial = self._load()
                return
            except _Changing:
                continue
        raise TlsFilesError("cert", tls.cert, "the files keep changing while they are read")

    def _paths(self) -> tuple[Path, ...]:
        tls = self.tls
        return (tls.cert, tls.key) if tls.client_ca is None else (tls.cert, tls.key, tls.client_ca)

    def _now(self) -> _Stamp:
        return tuple(files.stamp(path) for path in self._paths())

    def _load(self) -> tuple[_Stamp, grpc.ServerCertificateConfiguration]:
        """The files as a configuration, checked as a key pair and a CA; TlsFilesError."""
        tls = self.tls
        before = self._now()
        cert, key = _read("cert", tls.cert), _read("key", tls.key)
        ca = None if tls.client_ca is None else _read("client_ca", tls.client_ca)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:  # the password callback keeps OpenSSL from prompting for an encrypted key
            context.load_cert_chain(tls.cert, tls.key, password=lambda: b"")
        except (ssl.SSLError, OSError) as err:
            raise TlsFilesError(
                "pair", tls.cert, f"not a certificate with its key {tls.key} ({_reason(err)})"
            ) from None
        if tls.client_ca is not None:
            try:
                context.load_verify_locations(cafile=tls.client_ca)
            except (ssl.SSLError, OSError) as err:
                raise TlsFilesError("client_ca", tls.client_ca, _reason(err)) from None
        if self._now() != before:
            raise _Changing
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        return before, config

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """None: keep the configuration in force (gRPC's protocol for the fetcher)."""
        with self._lock:
            stamp = self._now()
            if stamp == self._stamp:
                return None
            try:
                self._stamp, config = self._load()
            except _Changing:
                return None  # mid-update: the next handshake looks again
            except TlsFilesError as err:
                self._stamp = stamp  # logged once per change, not per handshake
                log.error("TLS certificate not reloaded, keeping the last good one: %s", err)
                return None
            log.info("TLS certificate reloaded from %s and %s", self.tls.cert, self.tls.key)
            return config


def _read(role: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise TlsFilesError(role, path, err.strerror or str(err)) from None


def _reason(err: OSError) -> str:
    return (err.reason if isinstance(err, ssl.SSLError) else None) or err.strerror or str(err)


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """The credentials of a port serving `tls`, its files reloaded on change; TlsFilesError when
    they cannot be read now."""
    files = CertificateFiles(tls)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files, require_client_authentication=tls.client_ca is not None
    )


def interceptors(tls: ServerTls | None) -> list[grpc.aio.ServerInterceptor]:
    """The per-call check of the client SAN, when there is one to check. Without a client CA no
    client certificate is asked for, so, as upstream, there is no SAN to check."""
    if tls is None or tls.client_ca is None or not tls.client_san:
        return []
    return [ClientSanCheck(tls.client_san)]


# --- the client certificate's SAN --------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip  # Go's IP.Equal: ::ffff:a.b.c.d is a.b.c.d


def _name_matches(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if not pattern or not name:
        return False
    if pattern == name:
        return True
    wanted, given = pattern.split("."), name.split(".")
    return len(wanted) == len(given) and wanted[0] == "*" and wanted[1:] == given[1:]


def san_matches(san: str, dns_names: Sequence[str], ip_addresses: Sequence[str]) -> bool:
    """Go's x509.Certificate.VerifyHostname(san), which upstream's verifyClient asks of the client
    certificate: an IP address (bare or in brackets) against the IP SANs; a name against the DNS
    SANs, ignoring case and a trailing dot, `*` as a whole first label matching any one label."""
    bare = san[1:-1] if len(san) >= 3 and san[0] == "[" and san[-1] == "]" else san
    ip = _ip(bare)
    if ip is not None:
        return any(_ip(address) == ip for address in ip_addresses)
    return any(_name_matches(pattern, san) for pattern in dns_names)


_PEERS_LOGGED = 64  # distinct refused certificates logged; then silence (a client retries)


class ClientSanCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc's is untyped
    """Refuses, with UNAUTHENTICATED, every call whose client certificate lacks the SAN.

    Upstream refuses such a certificate in the TLS handshake (Go's VerifyPeerCertificate), so the
    client sees the connection fail. Python's gRPC has no hook in the handshake, so the
    connection is made and each call is checked here, from the peer's auth context (its DNS and
    IP SANs, as gRPC reads them from the verified certificate). No call is served either way."""

    def __init__(self, san: str) -> None:
        self.san = san
        self._logged: set[tuple[bytes, ...]] = set()

    def allowed(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        auth = context.auth_context()
        dns = [v.decode(errors="replace") for v in auth.get("peer_dns", ())]
        ips = [v.decode(errors="replace") for v in auth.get("peer_ip", ())]
        if san_matches(self.san, dns, ips):
            return True
        names = tuple(auth.get("x509_subject_alternative_name", ()))
        if names not in self._logged and len(self._logged) < _PEERS_LOGGED:
            self._logged.add(names)
            log.warning(
                "refused a client certificate (peer %s) without the SAN %r: it holds %s",
                context.peer(),
                self.san,
                [n.decode(errors="replace") for n in names] or "none",
            )
        return False

    async def _refuse_unless_allowed(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self.allowed(context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the client certificate does not hold the SAN {self.san!r}",
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # an unknown method: gRPC answers UNIMPLEMENTED
        return _guarded(handler, self._refuse_unless_allowed)


def _guarded(
    handler: grpc.RpcMethodHandler,
    check: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]],
) -> grpc.RpcMethodHandler:
    """`handler` with `check` awaited before its behaviour, whichever of the four kinds it is
    and whether it streams by yielding or by `context.write`."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    kind, make = next(
        (kind, make)
        for kind, make in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        if getattr(handler, kind) is not None
    )
    inner = getattr(handler, kind)
    if inspect.isasyncgenfunction(inner):

        async def yielding(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            stream: AsyncIterator[Any] = inner(request, context)
            async for item in stream:
                yield item

        return make(yielding, **codec)

    async def calling(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await check(context)
        result = inner(request, context)
        return await result if inspect.isawaitable(result) else result

    return make(calling, **codec)
