"""The one module that talks to kubernetes_asyncio.

Everything else in imgcache works on plain JSON dicts and typed objects, so the client
library can change without touching controller logic. Requests skip the generated
models: they are sent on the library's aiohttp session with its configuration
(credentials, TLS, proxy), and list and watch responses are parsed straight from JSON,
which keeps memory small with thousands of nodes and CPU low per request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import anyio
import yaml
from aiohttp.helpers import get_env_proxy_for_url
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config.config_exception import ConfigException
from yarl import URL

JSON = dict[str, Any]
JSONList = list[JSON]
FIELD_MANAGER = "imgcache"
# The read buffer that kubernetes_asyncio 36.1 gives its session, so that one watch
# event with a large object fits.
_READ_BUFFER_BYTES = 2**21


@dataclass(frozen=True)
class Resource:
    """A Kubernetes resource collection: API prefix, plural name and scope."""

    prefix: str
    plural: str
    namespaced: bool
    kind: str

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        parts = [self.prefix]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        return "/".join(parts)


NODES = Resource("/api/v1", "nodes", False, "Node")
PODS = Resource("/api/v1", "pods", True, "Pod")
EVENTS = Resource("/api/v1", "events", True, "Event")
DAEMONSETS = Resource("/apis/apps/v1", "daemonsets", True, "DaemonSet")
LEASES = Resource("/apis/coordination.k8s.io/v1", "leases", True, "Lease")
IMAGECACHES = Resource("/apis/imgcache.io/v1alpha1", "imagecaches", True, "ImageCache")


class KubeConfigError(Exception):
    """The kubeconfig or in-cluster configuration cannot be loaded."""


def _check_mapping(path: str) -> None:
    """Raise ValueError unless the file holds a YAML mapping, as every kubeconfig does.

    The client library reports other YAML, such as plain text, with a Python type error.
    """
    with open(path, encoding="utf-8") as file:
        content = yaml.safe_load(file)
    if not isinstance(content, dict):
        found = "nothing" if content is None else f"a YAML {type(content).__name__}"
        raise ValueError(f"the file contains {found} instead of a mapping with clusters, users and contexts")


class ApiError(Exception):
    """A Kubernetes API request failed with an HTTP status or a connection error.

    ``status`` is 0 when no HTTP response arrived (connection refused, reset, timeout).
    """

    def __init__(self, verb: str, path: str, status: int, reason: str, message: str) -> None:
        super().__init__(f"{verb} {path} failed: {status} {reason}: {message}")
        self.verb = verb
        self.path = path
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409 and self.reason != "AlreadyExists"

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def forbidden(self) -> bool:
        return self.status == 403

    @property
    def gone(self) -> bool:
        return self.status == 410


class WatchTimeout(Exception):
    """A watch stream sent nothing, not even a bookmark, for longer than the read timeout."""


ErrorHook = Callable[[str, int], None]


def _use_environment_proxy(configuration: k8s_client.Configuration) -> None:
    """Set the proxy that HTTPS_PROXY, HTTP_PROXY and NO_PROXY give for the API server, if any.

    aiohttp's own lookup, which a session with ``trust_env`` runs on every request, is
    done here once, because the server's address does not change while the process runs.
    """
    try:
        proxy, auth = get_env_proxy_for_url(URL(str(configuration.host)))
    except LookupError:
        return
    configuration.proxy = str(proxy)
    if auth is not None:
        configuration.proxy_headers = {"Proxy-Authorization": auth.encode()}


def _stop_environment_lookups(api: k8s_client.ApiClient) -> None:
    """Replace the client's session with one that does not read the environment per request.

    kubernetes_asyncio opens its session with ``trust_env=True``, so aiohttp 3.14 looks
    up the proxy variables and ~/.netrc in worker threads on every request, and the
    event loop waits for them. ``_use_environment_proxy`` resolves the proxy once
    instead. ~/.netrc is not read, because an entry for the API server would clash with
    the bearer token's Authorization header, which aiohttp rejects with ValueError.
    """
    rest = api.rest_client
    connector = rest.pool_manager.connector
    rest.pool_manager.detach()
    rest.pool_manager = aiohttp.ClientSession(
        connector=connector, trust_env=False, read_bufsize=_READ_BUFFER_BYTES
    )


class Kube:
    """An authenticated connection to one API server."""

    def __init__(self, api: k8s_client.ApiClient, on_error: ErrorHook | None = None) -> None:
        self._api = api
        self._on_error = on_error

    @classmethod
    async def connect(cls, kubeconfig: str | None, on_error: ErrorHook | None = None) -> Kube:
        """Connect with ``kubeconfig``, or with the pod's ServiceAccount when it is None."""
        configuration = k8s_client.Configuration()
        try:
            if kubeconfig:
                _check_mapping(kubeconfig)
                await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            else:
                k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError, ValueError, TypeError, KeyError, yaml.YAMLError) as error:
            source = f"kubeconfig {kubeconfig!r}" if kubeconfig else "in-cluster configuration"
            hint = (
                "check the path and that its current context names a cluster and user"
                if kubeconfig
                else "run inside a pod with a ServiceAccount token, or pass --kubeconfig PATH"
            )
            # YAML errors span several lines; the message stays on one.
            detail = " ".join(str(error).split()).rstrip(".")
            raise KubeConfigError(f"cannot load {source}: {detail}. Fix: {hint}") from error
        if not configuration.proxy:
            _use_environment_proxy(configuration)
        api = k8s_client.ApiClient(configuration)
        _stop_environment_lookups(api)
        return cls(api, on_error)

    @property
    def server(self) -> str:
        return str(self._api.configuration.host)

    async def version(self, timeout: float = 10.0) -> JSON:
        """Return the API server's /version; raise ApiError if it is unreachable or rejects the credentials."""
        return await self._json("get", "GET", "/version", timeout=timeout)

    async def close(self) -> None:
        await self._api.close()

    # -- raw requests ------------------------------------------------------

    async def _request(
        self,
        verb: str,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | aiohttp.ClientTimeout = 30.0,
    ) -> aiohttp.ClientResponse:
        """Send one request on the client's session with its authentication, TLS and proxy.

        The bodies are plain JSON already, so they skip ``ApiClient.call_api``, which
        copies every body through the generated models' serializer. That copy cost about
        a third of imgcache's CPU time per pod create.
        """
        url = f"{self._api.configuration.host}{path}"
        params = [(key, value) for key, value in (query or {}).items() if value is not None]
        if params:
            url += "?" + urlencode(params)
        headers = {**self._api.default_headers, "Accept": "application/json", "Content-Type": content_type}
        headers.update(await self._auth_headers())
        rest = self._api.rest_client
        options: dict[str, Any] = {}
        if rest.proxy:
            options["proxy"] = rest.proxy
        if rest.proxy_headers:
            options["proxy_headers"] = rest.proxy_headers
            if url.startswith("http:"):
                # aiohttp sends proxy headers only in the CONNECT of an HTTPS request. A
                # plain HTTP request goes to the proxy itself, so it carries them.
                headers.update(rest.proxy_headers)
        if rest.server_hostname:
            options["server_hostname"] = rest.server_hostname
        if not isinstance(timeout, aiohttp.ClientTimeout):
            timeout = aiohttp.ClientTimeout(total=timeout)
        try:
            response = await rest.pool_manager.request(
                method,
                url,
                headers=headers,
                data=None if body is None else json.dumps(body),
                timeout=timeout,
                **options,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            self._count_error(verb, 0)
            raise ApiError(verb, path, 0, type(error).__name__, str(error)) from error
        if response.status >= 300:
            await self._raise_for_status(verb, path, response)
        return response

    async def _auth_headers(self) -> dict[str, str]:
        """Return the bearer token header, after the configuration's refresh hook has run.

        In a pod, that hook rereads the ServiceAccount token before it expires.
        """
        setting = (await self._api.configuration.auth_settings()).get("BearerToken")
        if not setting or not setting.get("value"):
            # Client certificates authenticate in the TLS handshake instead.
            return {}
        return {str(setting["key"]): str(setting["value"])}

    async def _raise_for_status(self, verb: str, path: str, response: aiohttp.ClientResponse) -> None:
        text = await response.text()
        response.release()
        reason, message = response.reason or "", text
        try:
            status = json.loads(text)
            reason = status.get("reason") or reason
            message = status.get("message") or message
        except ValueError:
            pass
        self._count_error(verb, response.status)
        raise ApiError(verb, path, response.status, str(reason), str(message))

    def _count_error(self, verb: str, status: int) -> None:
        if self._on_error is not None:
            self._on_error(verb, status)

    async def _json(self, verb: str, method: str, path: str, **kwargs: Any) -> JSON:
        response = await self._request(verb, method, path, **kwargs)
        try:
            data: JSON = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError, TimeoutError) as error:
            self._count_error(verb, 0)
            raise ApiError(verb, path, 0, type(error).__name__, str(error)) from error
        finally:
            response.release()
        return data

    # -- verbs -------------------------------------------------------------

    async def get(self, resource: Resource, name: str, namespace: str | None = None) -> JSON:
        return await self._json("get", "GET", resource.path(namespace, name))

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
        transform: Callable[[JSON], JSON] | None = None,
    ) -> tuple[JSONList, str]:
        """List every object, page by page; return the items and the list's resourceVersion.

        ``transform`` is applied to each page's items as the page arrives, so that only
        one page of whole objects is held at a time.
        """
        items: JSONList = []
        continue_token: str | None = None
        while True:
            page = await self._json(
                "list",
                "GET",
                resource.path(namespace),
                query={
                    "labelSelector": label_selector,
                    "fieldSelector": field_selector,
                    "limit": page_size,
                    "continue": continue_token,
                },
            )
            page_items = page.get("items") or []
            items.extend(page_items if transform is None else map(transform, page_items))
            metadata = page.get("metadata") or {}
            continue_token = metadata.get("continue")
            if not continue_token:
                return items, str(metadata.get("resourceVersion", ""))

    async def watch(
        self,
        resource: Resource,
        resource_version: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
        read_timeout: float = 330.0,
    ) -> AsyncIterator[JSON]:
        """Yield watch events from ``resource_version`` with bookmarks on.

        The server closes the stream after ``timeout_seconds``. If no bytes arrive for
        ``read_timeout`` seconds the connection is presumed dead and WatchTimeout is raised.
        """
        response = await self._request(
            "watch",
            "GET",
            resource.path(namespace),
            query={
                "watch": "true",
                "allowWatchBookmarks": "true",
                "resourceVersion": resource_version,
                "timeoutSeconds": timeout_seconds,
                "labelSelector": label_selector,
                "fieldSelector": field_selector,
            },
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        )
        buffer = b""
        try:
            while True:
                with anyio.move_on_after(read_timeout) as scope:
                    chunk = await response.content.readany()
                if scope.cancelled_caught:
                    raise WatchTimeout(f"watch {resource.plural} sent nothing for {read_timeout:.0f} s")
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, OSError) as error:
            self._count_error("watch", 0)
            raise ApiError("watch", resource.path(namespace), 0, type(error).__name__, str(error)) from error
        finally:
            response.close()

    async def create(self, resource: Resource, body: JSON, namespace: str | None = None) -> JSON:
        return await self._json(
            "create", "POST", resource.path(namespace), body=body, query={"fieldManager": FIELD_MANAGER}
        )

    async def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        grace_period_seconds: int | None = None,
        uid: str | None = None,
    ) -> bool:
        """Delete an object; return False if it was already gone."""
        options: JSON = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            response = await self._request("delete", "DELETE", resource.path(namespace, name), body=options)
        except ApiError as error:
            if error.not_found:
                return False
            raise
        response.release()
        return True

    async def delete_collection(
        self,
        resource: Resource,
        namespace: str,
        *,
        label_selector: str,
        field_selector: str | None = None,
        grace_period_seconds: int | None = None,
    ) -> None:
        options: JSON = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        response = await self._request(
            "deletecollection",
            "DELETE",
            resource.path(namespace),
            query={"labelSelector": label_selector, "fieldSelector": field_selector},
            body=options,
        )
        response.release()

    async def merge_patch(
        self,
        resource: Resource,
        name: str,
        patch: JSON,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> JSON:
        path = resource.path(namespace, name) + (f"/{subresource}" if subresource else "")
        return await self._json(
            "patch",
            "PATCH",
            path,
            body=patch,
            content_type="application/merge-patch+json",
            query={"fieldManager": FIELD_MANAGER},
        )

    async def json_patch(
        self, resource: Resource, name: str, operations: JSONList, namespace: str | None = None
    ) -> JSON:
        return await self._json(
            "patch",
            "PATCH",
            resource.path(namespace, name),
            body=operations,
            content_type="application/json-patch+json",
            query={"fieldManager": FIELD_MANAGER},
        )

    async def apply(
        self,
        resource: Resource,
        name: str,
        body: JSON,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> JSON:
        """Server-side apply ``body`` as field manager ``imgcache``, taking over conflicts."""
        path = resource.path(namespace, name) + (f"/{subresource}" if subresource else "")
        return await self._json(
            "apply",
            "PATCH",
            path,
            body=body,
            content_type="application/apply-patch+yaml",
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
        )

    async def replace(self, resource: Resource, name: str, body: JSON, namespace: str | None = None) -> JSON:
        return await self._json(
            "update", "PUT", resource.path(namespace, name), body=body, query={"fieldManager": FIELD_MANAGER}
        )
