"""The cloud client's deadline covers the DNS lookup too (edgelm/cloud.py, ``_resolve``).

httpcore connects with socket.create_connection, whose getaddrinfo runs before (and outside) the socket's
timeout, so a stuck resolver could hold a call far past ``timeout=``. Here socket.getaddrinfo is replaced by a
fake resolver that knows a few made-up ``.invalid`` names (slow, late, failing, or pointing at a loopback test
server) and refuses every other name: no real host is ever looked up or contacted. Numeric addresses go to the
real getaddrinfo, which does not ask DNS for them.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
import uuid

import pytest

pytest.importorskip("httpx")

from edgelm.cloud import CloudClient  # noqa: E402
from edgelm.errors import CloudError, CloudTimeoutError  # noqa: E402

from faults import FaultServer, hang, ok  # noqa: E402

KEY = "sk-dns-SECRET-0123456789abcdef"
MSGS = [{"role": "user", "content": "Tell me a story."}]
STUCK_FOR = 4.0  # how long the fake resolver holds a "stuck" lookup (a bound, so a broken client fails, not hangs)
MARGIN = 0.6     # scheduling slack on a shared 2-core machine


class FakeResolver:
    """socket.getaddrinfo for made-up names: ``slow`` ones block (until released or STUCK_FOR), ``late`` ones
    answer 127.0.0.1 after ``late_by`` seconds, ``local`` ones at once, ``bad`` ones fail; every other name is
    refused. ``names`` records each name looked up (numeric addresses are not recorded)."""

    def __init__(self, real):
        self.real = real
        self.release = threading.Event()
        self.names: list[str] = []
        self.slow: set[str] = set()
        self.late: dict[str, float] = {}
        self.local: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(name)
            return self.real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except ValueError:
            pass
        with self._lock:
            self.names.append(name)
        if name in self.slow:
            self.release.wait(STUCK_FOR)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if name in self.late:
            time.sleep(self.late[name])
        if name in self.late or name in self.local:
            return self.real("127.0.0.1", port, family, type, proto, flags | socket.AI_NUMERICHOST)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def name(self, kind: str, **kw) -> str:
        """A fresh made-up name of ``kind`` (fresh per test: a stuck lookup is shared by whoever asks for it)."""
        made = f"{kind}-{uuid.uuid4().hex[:8]}.invalid"
        {"slow": lambda: self.slow.add(made), "local": lambda: self.local.add(made), "bad": lambda: None,
         "late": lambda: self.late.__setitem__(made, kw["late_by"])}[kind]()
        return made


@pytest.fixture
def resolver(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeResolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield fake
    fake.release.set()  # stuck lookups end now, not STUCK_FOR later


def client(url: str, **kw) -> CloudClient:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("backoff_max", 0.05)
    kw.setdefault("connect_timeout", 1.0)
    return CloudClient(url, model="big", api_key=KEY, **kw)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_stuck_resolver_times_out_within_the_call_deadline(resolver, streamed):
    host = resolver.name("slow")
    with client(f"http://{host}:8000/v1", timeout=0.8, connect_timeout=5.0, max_retries=3) as c:
        t0 = time.monotonic()
        with pytest.raises(CloudTimeoutError) as info:
            list(c.stream(MSGS)) if streamed else c.chat(MSGS)
        elapsed = time.monotonic() - t0
    assert elapsed < 0.8 + MARGIN, elapsed
    message = str(info.value)
    assert host in message and "looking up the host name" in message and " s" in message
    assert "DNS" in info.value.hint and KEY not in message
    assert resolver.names == [host]  # every attempt waited on the one lookup: one thread, not one per attempt


def test_the_lookup_is_bounded_by_connect_timeout_and_names_it(resolver):
    host = resolver.name("slow")
    with client(f"http://{host}:8000/v1", timeout=5.0, connect_timeout=0.3, max_retries=0) as c:
        t0 = time.monotonic()
        with pytest.raises(CloudTimeoutError) as info:
            c.chat(MSGS)
        elapsed = time.monotonic() - t0
    assert elapsed < 0.3 + MARGIN, elapsed
    assert f"{host} took longer than 0.3 s" in str(info.value)


def test_a_lookup_that_answers_late_serves_the_retry(resolver):
    """The first attempt gives up on the lookup after connect_timeout; the retry finds it finished."""
    with FaultServer(ok("found it")) as srv:
        host = resolver.name("late", late_by=0.5)
        with client(f"http://{host}:{srv.port}/v1", timeout=4.0, connect_timeout=0.3, max_retries=3) as c:
            assert c.chat(MSGS).text == "found it"
    assert resolver.names == [host] and len(srv.requests) == 1


def test_a_looked_up_name_reaches_the_server_under_its_own_name(resolver):
    """Connecting to the address looked up keeps the URL's host name where it belongs (the Host header; TLS's
    server name comes from the URL too)."""
    with FaultServer(ok("hello by name")) as srv:
        host = resolver.name("local")
        with client(f"http://{host}:{srv.port}/v1") as c:
            assert c.chat(MSGS).text == "hello by name"
            assert "".join(c.stream(MSGS)) == "hello by name"
    assert [r.headers["host"] for r in srv.requests] == [f"{host}:{srv.port}"] * 2


def test_a_name_that_does_not_resolve_is_a_quick_cloud_error_not_a_timeout(resolver):
    host = resolver.name("bad")
    with client(f"http://{host}:8000/v1", max_retries=1) as c:
        t0 = time.monotonic()
        with pytest.raises(CloudError) as info:
            c.chat(MSGS)
    assert time.monotonic() - t0 < 1.0
    assert not isinstance(info.value, CloudTimeoutError)
    assert "Could not reach" in str(info.value) and host in str(info.value)


def test_a_loopback_address_is_not_looked_up_and_still_works(resolver):
    with FaultServer(ok("loopback")) as srv, client(srv.url) as c:
        assert c.chat(MSGS).text == "loopback"
    assert resolver.names == []  # 127.0.0.1 never went to the resolver as a name
    with FaultServer(hang()) as srv, client(srv.url, timeout=0.6, max_retries=5) as c:  # the old deadline holds
        t0 = time.monotonic()
        with pytest.raises(CloudTimeoutError):
            c.chat(MSGS)
    assert time.monotonic() - t0 < 0.6 + MARGIN


def test_hybrid_answers_locally_when_the_lookup_is_stuck(resolver):
    from test_hybrid import LocalDouble

    from edgelm.hybrid import Hybrid, Router, Rule

    host = resolver.name("slow")
    local = LocalDouble()
    cloud = client(f"https://{host}/v1", timeout=0.7, connect_timeout=5.0, max_retries=2)
    hy = Hybrid(local, cloud, Router(rules=[Rule("cloud", tags=["x"])]))
    t0 = time.monotonic()
    r = hy.generate("anything", tags=["x"])
    assert time.monotonic() - t0 < 0.7 + MARGIN
    assert (r.source, r.signal) == ("local", "rule") and local.calls == ["anything"]
    assert r.fallback.startswith("cloud timed out") and host in r.fallback and KEY not in r.fallback
