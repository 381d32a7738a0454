"""Requests that imgcache.kube sends, checked against a small HTTP endpoint on 127.0.0.1.

Kube sends requests on the library's aiohttp session itself, so these tests check what
reaches the server: method, path, query, headers, body, and the proxy from the environment.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest
from kubernetes_asyncio import client as k8s_client

from imgcache.kube import NODES, PODS, ApiError, Kube

TOKEN = "test-token"
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                    "no_proxy")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@dataclass
class Received:
    method: str
    url: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Endpoint:
    """Records every request and replies with the next queued (status, body), else 200 {}."""

    received: list[Received] = field(default_factory=list)
    replies: list[tuple[int, Any]] = field(default_factory=list)

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.received.append(
            Received(
                method=request.method,
                url=str(request.url),
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
                body=await request.read(),
            )
        )
        status, body = self.replies.pop(0) if self.replies else (200, {})
        return aiohttp.web.json_response(body, status=status)


@asynccontextmanager
async def serve(endpoint: Endpoint) -> AsyncIterator[str]:
    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", endpoint.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def write_kubeconfig(path: Path, server: str) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "users": [{"name": "user", "user": {"token": TOKEN}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "user"}}],
        "current-context": "local",
    }
    path.write_text(json.dumps(config))
    return str(path)


@asynccontextmanager
async def connected(endpoint: Endpoint, tmp_path: Path) -> AsyncIterator[Kube]:
    async with serve(endpoint) as server:
        kube = await Kube.connect(write_kubeconfig(tmp_path / "kubeconfig", server))
        try:
            yield kube
        finally:
            await kube.close()


@pytest.mark.anyio
async def test_create_sends_json_with_token(tmp_path: Path) -> None:
    endpoint = Endpoint(replies=[(201, {"metadata": {"name": "p1", "uid": "u1"}})])
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1"}, "spec": {"nodeName": "n1"}}

    async with connected(endpoint, tmp_path) as kube:
        created = await kube.create(PODS, body, "cache")

    assert created == {"metadata": {"name": "p1", "uid": "u1"}}
    request = endpoint.received[0]
    assert request.method == "POST"
    assert request.path == "/api/v1/namespaces/cache/pods"
    assert request.query == {"fieldManager": "imgcache"}
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert json.loads(request.body) == body


@pytest.mark.anyio
async def test_list_encodes_selector_and_pages(tmp_path: Path) -> None:
    endpoint = Endpoint(
        replies=[
            (200, {"items": [{"metadata": {"name": "a"}}], "metadata": {"continue": "next page"}}),
            (200, {"items": [{"metadata": {"name": "b"}}], "metadata": {"resourceVersion": "42"}}),
        ]
    )

    async with connected(endpoint, tmp_path) as kube:
        items, version = await kube.list(NODES, label_selector="pool in (a,b),zone!=x", page_size=1)

    assert [item["metadata"]["name"] for item in items] == ["a", "b"]
    assert version == "42"
    first, second = endpoint.received
    assert first.method == "GET"
    assert first.path == "/api/v1/nodes"
    assert first.query == {"labelSelector": "pool in (a,b),zone!=x", "limit": "1"}
    assert second.query == {"labelSelector": "pool in (a,b),zone!=x", "limit": "1", "continue": "next page"}
    assert first.body == b""


@pytest.mark.anyio
async def test_list_transforms_each_page(tmp_path: Path) -> None:
    endpoint = Endpoint(
        replies=[
            (200, {"items": [{"metadata": {"name": "a"}, "big": 1}], "metadata": {"continue": "2"}}),
            (200, {"items": [{"metadata": {"name": "b"}, "big": 2}], "metadata": {"resourceVersion": "9"}}),
        ]
    )
    # Each item with the number of requests sent when it was transformed.
    seen: list[tuple[str, int]] = []

    def name_only(obj: dict[str, Any]) -> dict[str, Any]:
        seen.append((obj["metadata"]["name"], len(endpoint.received)))
        return {"metadata": obj["metadata"]}

    async with connected(endpoint, tmp_path) as kube:
        items, version = await kube.list(NODES, page_size=1, transform=name_only)

    assert items == [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]
    assert seen == [("a", 1), ("b", 2)]
    assert version == "9"


@pytest.mark.anyio
async def test_merge_patch_content_type(tmp_path: Path) -> None:
    endpoint = Endpoint()
    patch = {"metadata": {"annotations": {"a": "1", "b": None}}}

    async with connected(endpoint, tmp_path) as kube:
        await kube.merge_patch(NODES, "n1", patch)

    request = endpoint.received[0]
    assert request.method == "PATCH"
    assert request.path == "/api/v1/nodes/n1"
    assert request.headers["Content-Type"] == "application/merge-patch+json"
    assert json.loads(request.body) == patch


@pytest.mark.anyio
async def test_delete_sends_options(tmp_path: Path) -> None:
    endpoint = Endpoint(replies=[(404, {"kind": "Status", "reason": "NotFound", "message": "gone"})])

    async with connected(endpoint, tmp_path) as kube:
        deleted = await kube.delete(PODS, "p1", "cache", grace_period_seconds=0, uid="u1")

    assert deleted is False
    request = endpoint.received[0]
    assert request.method == "DELETE"
    assert request.path == "/api/v1/namespaces/cache/pods/p1"
    assert json.loads(request.body) == {
        "kind": "DeleteOptions",
        "apiVersion": "v1",
        "propagationPolicy": "Background",
        "gracePeriodSeconds": 0,
        "preconditions": {"uid": "u1"},
    }


@pytest.mark.anyio
async def test_error_status_raises_api_error(tmp_path: Path) -> None:
    status = {"kind": "Status", "reason": "AlreadyExists", "message": "pods \"p1\" already exists"}
    endpoint = Endpoint(replies=[(409, status)])
    errors: list[tuple[str, int]] = []

    async with serve(endpoint) as server:
        kube = await Kube.connect(write_kubeconfig(tmp_path / "kubeconfig", server),
                                  on_error=lambda verb, code: errors.append((verb, code)))
        try:
            with pytest.raises(ApiError) as raised:
                await kube.create(PODS, {"metadata": {"name": "p1"}}, "cache")
        finally:
            await kube.close()

    assert raised.value.status == 409
    assert raised.value.already_exists
    assert raised.value.message == "pods \"p1\" already exists"
    assert errors == [("create", 409)]


@pytest.mark.anyio
async def test_refreshed_token_sent(tmp_path: Path) -> None:
    endpoint = Endpoint()
    tokens = iter(["first", "second"])

    def refresh(configuration: k8s_client.Configuration) -> None:
        configuration.api_key["BearerToken"] = f"Bearer {next(tokens)}"

    async with serve(endpoint) as server:
        configuration = k8s_client.Configuration(host=server)
        configuration.api_key["BearerToken"] = "Bearer stale"
        configuration.refresh_api_key_hook = refresh
        kube = Kube(k8s_client.ApiClient(configuration))
        try:
            await kube.get(NODES, "n1")
            await kube.get(NODES, "n2")
        finally:
            await kube.close()

    assert [r.headers["Authorization"] for r in endpoint.received] == ["Bearer first", "Bearer second"]


@pytest.mark.anyio
async def test_proxy_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A plain HTTP proxy receives the absolute URL of the target in the request line.
    proxy = Endpoint(replies=[(200, {"gitVersion": "v1.36.0"})])
    async with serve(proxy) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("http://", "http://user:secret@"))
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://api.cluster.test:6443")
        kube = await Kube.connect(kubeconfig)
        try:
            version = await kube.version()
        finally:
            await kube.close()

    assert version == {"gitVersion": "v1.36.0"}
    request = proxy.received[0]
    assert request.url == "http://api.cluster.test:6443/version"
    assert request.headers["Proxy-Authorization"] == aiohttp.encode_basic_auth("user", "secret")


@pytest.mark.anyio
async def test_no_proxy_environment_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = Endpoint()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    async with connected(endpoint, tmp_path) as kube:
        await kube.get(NODES, "n1")

    assert [r.path for r in endpoint.received] == ["/api/v1/nodes/n1"]


@pytest.mark.anyio
async def test_session_skips_environment_per_request(tmp_path: Path) -> None:
    endpoint = Endpoint()

    async with connected(endpoint, tmp_path) as kube:
        session = kube._api.rest_client.pool_manager
        assert session.trust_env is False
        await kube.get(NODES, "n1")

    assert len(endpoint.received) == 1
