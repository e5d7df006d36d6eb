"""The upstream HTTP/1.1 client (backends/http1.py) against real sockets on loopback: verified TLS with a
configured CA, HTTP proxies (CONNECT for https, absolute-form for http, Basic proxy credentials), the
pool's limit and wait, and a keep-alive connection the upstream closed while idle."""

from __future__ import annotations

import abc
import asyncio
import base64
import datetime
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from seekserve.backends.http1 import ConnectFailed, ConnectionPool, ConnectTimedOut, Origin, proxy_for

HOST = "upstream.test"      # reached only through the test proxy, which maps it to loopback
BODY = b'data: {"choices":[]}\n\ndata: [DONE]\n\n'
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -- certificates: a throwaway CA and a server certificate for HOST and localhost ---------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key)."""
    out = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("seekserve test CA")).issuer_name(_name("seekserve test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(HOST)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST), x509.DNSName("localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = out / "ca.pem", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _server_tls(certs: tuple[Path, Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs[1], certs[2])
    return context


# -- tiny servers ---------------------------------------------------------------------------------------------
async def _read_head(reader: asyncio.StreamReader) -> list[str]:
    raw = await reader.readuntil(b"\r\n\r\n")
    return raw.decode("latin-1").split("\r\n")[:-2]


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close: bool = False) -> list[str]:
    """Read one POST, answer it with an event stream; the request's head lines."""
    head = await _read_head(reader)
    length = next(int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length"))
    await reader.readexactly(length)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n%s\r\n%s"
                 % (len(BODY), b"Connection: close\r\n" if close else b"", BODY))
    await writer.drain()
    return head


class _Server(abc.ABC):
    """A loopback server for one test: `async with Upstream() as up:` serves on `up.port` until the block ends."""
    tls: ssl.SSLContext | None = None
    port = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    @abc.abstractmethod
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection (Upstream and Proxy say what they do with it)."""


class Upstream(_Server):
    """Answers every request on a connection; `heads` records each request's head, `connections` counts."""

    def __init__(self, tls: ssl.SSLContext | None = None, close_after: int | None = None,
                 say_close: bool = False) -> None:
        self.tls, self.close_after, self.say_close = tls, close_after, say_close
        self.heads: list[list[str]] = []
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while not reader.at_eof():
                self.heads.append(await _answer(reader, writer, close=self.say_close))
                if self.say_close:
                    break
                served += 1
                if self.close_after is not None and served >= self.close_after:
                    break       # an idle keep-alive connection the server drops
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


class Proxy(_Server):
    """An HTTP forward proxy: CONNECT host:port tunnels to loopback (any host name), refused with 403 when
    `refuse`; a request in absolute-form is answered by the proxy itself. Records what it was asked."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.requests: list[list[str]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await _read_head(reader)
            self.requests.append(head)
            method, target, _ = head[0].split(" ")
            if method != "CONNECT":
                length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length"))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(BODY), BODY))
                await writer.drain()
                return
            if self.refuse:
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            port = int(target.rsplit(":", 1)[1])
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                finally:
                    dst.close()
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def pool(url: str, **kw: object) -> ConnectionPool:
    options: dict[str, object] = {"connect_timeout": 2.0, "read_timeout": 2.0, "max_connections": 4}
    return ConnectionPool(url, **{**options, **kw})  # type: ignore[arg-type]


async def body_of(p: ConnectionPool, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    response = await p.post(path, b'{"model":"m"}')
    data = b"".join([part async for part in response])
    await response.aclose()
    return response.status, data


# -- tests ----------------------------------------------------------------------------------------------------
def test_tls_is_verified_against_the_configured_ca(certs: tuple[Path, Path, Path]) -> None:
    async def go() -> None:
        async with Upstream(tls=_server_tls(certs)) as upstream:
            trusted = pool(f"https://localhost:{upstream.port}/v1", ca_file=str(certs[0]))
            assert await body_of(trusted) == (200, BODY)
            assert upstream.heads[0][0] == "POST /v1/chat/completions HTTP/1.1"
            assert f"Host: localhost:{upstream.port}" in upstream.heads[0]
            await trusted.aclose()
            with pytest.raises(ConnectFailed, match="TLS handshake failed"):   # not our CA: refused
                await body_of(pool(f"https://localhost:{upstream.port}/v1"))
    asyncio.run(go())


def test_https_goes_through_a_connect_tunnel_with_proxy_credentials(certs: tuple[Path, Path, Path]) -> None:
    async def go() -> None:
        async with Upstream(tls=_server_tls(certs)) as upstream, Proxy() as proxy:
            p = pool(f"https://{HOST}:{upstream.port}", ca_file=str(certs[0]),
                     proxy=f"http://alice:s%3Acret@127.0.0.1:{proxy.port}")
            assert await body_of(p) == (200, BODY)
            assert await body_of(p) == (200, BODY)       # the tunnel is a pooled keep-alive connection
            assert len(proxy.requests) == 1 and upstream.connections == 1
            connect = proxy.requests[0]
            assert connect[0] == f"CONNECT {HOST}:{upstream.port} HTTP/1.1"
            assert f"Proxy-Authorization: Basic {base64.b64encode(b'alice:s:cret').decode()}" in connect
            # the upstream sees an ordinary request: no proxy credentials ride inside the tunnel
            assert not any(h.lower().startswith("proxy-authorization") for h in upstream.heads[0])
            await p.aclose()
    asyncio.run(go())


def test_http_through_a_proxy_uses_absolute_form() -> None:
    async def go() -> None:
        async with Proxy() as proxy:
            p = pool(f"http://{HOST}:8000/v1", proxy=f"http://bob:pw@127.0.0.1:{proxy.port}")
            assert await body_of(p) == (200, BODY)
            head = proxy.requests[0]
            assert head[0] == f"POST http://{HOST}:8000/v1/chat/completions HTTP/1.1"
            assert f"Host: {HOST}:8000" in head
            assert f"Proxy-Authorization: Basic {base64.b64encode(b'bob:pw').decode()}" in head
    asyncio.run(go())


def test_a_proxy_that_refuses_the_tunnel_is_a_connect_failure(certs: tuple[Path, Path, Path]) -> None:
    async def go() -> None:
        async with Proxy(refuse=True) as proxy:
            with pytest.raises(ConnectFailed, match="refused the tunnel: HTTP/1.1 403"):
                await body_of(pool(f"https://{HOST}:443", proxy=f"http://127.0.0.1:{proxy.port}"))
    asyncio.run(go())


def test_a_full_pool_waits_for_a_connection_then_gives_up() -> None:
    async def go() -> None:
        async with Upstream() as upstream:
            p = pool(f"http://127.0.0.1:{upstream.port}", max_connections=1, connect_timeout=0.3)
            held = await p.post("/v1/completions", b"{}")        # its body is not read: the connection stays busy
            with pytest.raises(ConnectTimedOut, match="all 1 connections stayed busy"):
                await p.post("/v1/completions", b"{}")
            waiting = asyncio.ensure_future(body_of(p))           # waits for the held connection ...
            await asyncio.sleep(0.05)
            assert not waiting.done()
            _ = [part async for part in held]
            await held.aclose()                                   # ... and gets it, kept alive
            assert await waiting == (200, BODY)
            assert upstream.connections == 1 and p.num_open == 1
    asyncio.run(go())


def test_an_idle_connection_the_upstream_closed_is_replaced() -> None:
    async def go() -> None:
        async with Upstream(close_after=1) as upstream:     # drops each connection after one answer, without saying so
            p = pool(f"http://127.0.0.1:{upstream.port}")
            for _ in range(3):
                assert await body_of(p) == (200, BODY)
                await asyncio.sleep(0.05)           # the close arrives while the connection idles in the pool
            assert upstream.connections == 3 and len(upstream.heads) == 3
    asyncio.run(go())


def test_connection_close_answers_are_not_pooled() -> None:
    async def go() -> None:
        async with Upstream(say_close=True) as upstream:     # "Connection: close" on every answer
            p = pool(f"http://127.0.0.1:{upstream.port}")
            for _ in range(3):
                assert await body_of(p) == (200, BODY)
            assert upstream.connections == 3 and p.num_open == 0
    asyncio.run(go())


def test_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    cloud = Origin.of("https://api.deepseek.com/v1")
    assert proxy_for(cloud, None) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.bank.internal:3128")
    assert proxy_for(cloud, None) == Origin("http", "proxy.bank.internal", 3128)
    assert proxy_for(Origin.of("http://vllm.internal:8000"), None) is None       # HTTPS_PROXY is for https only
    assert proxy_for(Origin.of("https://127.0.0.1:9000"), None) is None           # loopback: never proxied
    monkeypatch.setenv("NO_PROXY", ".deepseek.com")
    assert proxy_for(cloud, None) is None
    assert proxy_for(cloud, "proxy2:8080") == Origin("http", "proxy2", 8080)      # configured: used as is
    with pytest.raises(ValueError, match="only http:// proxies"):
        proxy_for(cloud, "socks5://proxy:1080")
