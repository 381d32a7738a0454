"""List-then-watch loop that keeps a local copy of one resource collection.

The API server's watch stream is the only way to learn about new nodes within a second
without polling. The loop lists, watches from the list's resourceVersion with bookmarks,
and on 410 Gone lists again and reports the difference, so no change in the gap is lost.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import structlog

from imgcache.kube import JSON, ApiError, Kube, Resource, WatchTimeout

log = structlog.get_logger(__name__)


class Handler(Protocol):
    """Receives a collection's state: a full snapshot after each list, then single changes."""

    def replace(self, objects: list[JSON]) -> None: ...

    def upsert(self, obj: JSON) -> None: ...

    def remove(self, obj: JSON) -> None: ...


@dataclass
class WatchSettings:
    """Timeouts and back-off of one watch loop, in seconds."""

    server_timeout: int = 300
    read_timeout: float = 330.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


@dataclass
class Reflector:
    """Mirror one collection into a Handler: list, watch, relist on 410, back off on errors."""

    kube: Kube
    resource: Resource
    handler: Handler
    namespace: str | None = None
    label_selector: str | None = None
    field_selector: str | None = None
    settings: WatchSettings = field(default_factory=WatchSettings)
    on_restart: Callable[[str, str], None] | None = None
    on_synced: Callable[[], None] | None = None
    # Function that reduces each listed object to what the handler reads (see Kube.list).
    slim: Callable[[JSON], JSON] | None = None
    resource_version: str = ""
    synced: bool = False
    _failures: int = 0

    async def run(self) -> None:
        """Run until cancelled; every exit path of a single pass is a restart with a reason."""
        while True:
            reason = await self.run_once()
            self._restarted(reason)
            if reason in ("gone", "stream_closed", "bookmark_only"):
                continue
            await anyio.sleep(self._backoff())

    async def run_once(self) -> str:
        """List if needed and watch until the stream ends; return why it ended."""
        try:
            if not self.resource_version:
                await self.relist()
            await self._watch()
        except WatchTimeout:
            return "read_timeout"
        except ApiError as error:
            if error.gone:
                self.resource_version = ""
                return "gone"
            if error.forbidden:
                log.error(
                    "watch.forbidden",
                    resource=self.resource.plural,
                    namespace=self.namespace,
                    error=error.message,
                    hint=f"grant list and watch on {self.resource.plural} to imgcache's ServiceAccount",
                )
                return "forbidden"
            log.warning(
                "watch.failed",
                resource=self.resource.plural,
                status=error.status,
                error=error.message,
            )
            return "error" if error.status else "connection"
        except ValueError as error:
            log.warning("watch.bad_payload", resource=self.resource.plural, error=str(error))
            return "bad_payload"
        self._failures = 0
        return "stream_closed"

    async def relist(self) -> None:
        items, resource_version = await self.kube.list(
            self.resource,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            transform=self.slim,
        )
        self.handler.replace(items)
        self.resource_version = resource_version
        self._failures = 0
        if not self.synced:
            self.synced = True
            log.info("watch.synced", resource=self.resource.plural, count=len(items))
            if self.on_synced is not None:
                self.on_synced()

    async def _watch(self) -> None:
        events = self.kube.watch(
            self.resource,
            self.resource_version,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            timeout_seconds=self.settings.server_timeout,
            read_timeout=self.settings.read_timeout,
        )
        async for event in events:
            self._apply(event)

    def _apply(self, event: JSON) -> None:
        kind = event.get("type")
        obj: JSON = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            raise ApiError("watch", self.resource.plural, code, str(obj.get("reason", "")), str(obj.get("message", "")))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        if kind in ("ADDED", "MODIFIED"):
            self.handler.upsert(obj)
        elif kind == "DELETED":
            self.handler.remove(obj)
        else:
            log.warning("watch.unknown_event", resource=self.resource.plural, type=kind)
            return
        if version:
            self.resource_version = str(version)

    def _backoff(self) -> float:
        self._failures += 1
        ceiling = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** (self._failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _restarted(self, reason: str) -> None:
        if reason != "stream_closed":
            log.info("watch.restart", resource=self.resource.plural, reason=reason)
        if self.on_restart is not None:
            self.on_restart(self.resource.plural, reason)


def object_key(obj: JSON) -> str:
    metadata: dict[str, Any] = obj.get("metadata") or {}
    namespace = metadata.get("namespace")
    name = str(metadata.get("name", ""))
    return f"{namespace}/{name}" if namespace else name
