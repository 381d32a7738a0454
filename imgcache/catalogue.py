"""The image catalogue: every ImageCache object merged into one deduplicated list.

Teams declare images in their own namespaces. The catalogue normalizes each reference as
container runtimes do, applies the pull-through rewrite, and merges declarations of the
same image, so the pinner and the prepuller see each image once. An invalid entry is
recorded for its own object's status and never affects the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from imgcache.model import JSON, Node
from imgcache.reference import ImageRef, InvalidReference, image_hash, parse
from imgcache.rewrite import Rewriter

log = structlog.get_logger(__name__)

# The static helper binary is built for Linux only, so Windows nodes get no pods.
SUPPORTED_OS = "linux"
MAX_ENTRIES = 256


@dataclass(frozen=True)
class Scope:
    """The nodes and uses (pin, prepull) that one declaration requests for an image."""

    node_selector: tuple[tuple[str, str], ...]
    platforms: frozenset[str] | None
    pin: bool
    prepull: bool

    def matches(self, node: Node) -> bool:
        if node.os != SUPPORTED_OS:
            return False
        if self.platforms is not None and not self.allows_platform(node.os, node.arch):
            return False
        return all(node.labels.get(key) == value for key, value in self.node_selector)

    def allows_platform(self, os: str, arch: str) -> bool:
        if self.platforms is None:
            return True
        return any(p.split("/")[:2] == [os, arch] for p in self.platforms)


@dataclass
class CatalogueImage:
    """One distinct image with every declaration (scope) that requests it."""

    ref: ImageRef
    resolved: ImageRef
    hash: str
    scopes: list[Scope] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)

    def prepull_on(self, node: Node) -> bool:
        return any(s.prepull and s.matches(node) for s in self.scopes)

    def pin_on(self, node: Node) -> bool:
        return any(s.pin and s.matches(node) for s in self.scopes)


@dataclass(frozen=True)
class EntryReport:
    """The outcome of one spec.images entry, for the object's status."""

    image: str
    resolved: str | None
    hash: str | None
    error: str | None


@dataclass
class SourceReport:
    """Everything the status writer needs to know about one ImageCache object."""

    namespace: str
    name: str
    uid: str
    generation: int
    entries: list[EntryReport]
    node_selector: dict[str, str]


def _key(obj: JSON) -> str:
    metadata = obj.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


def _same_spec(old: JSON, new: JSON) -> bool:
    old_metadata = old.get("metadata") or {}
    new_metadata = new.get("metadata") or {}
    return bool(
        old_metadata.get("uid") == new_metadata.get("uid")
        and old_metadata.get("generation")
        and old_metadata.get("generation") == new_metadata.get("generation")
    )


def _selector(spec: JSON) -> tuple[tuple[str, str], ...]:
    raw = spec.get("nodeSelector") or {}
    if not isinstance(raw, dict):
        raise ValueError("spec.nodeSelector must be a map of label keys to values")
    return tuple(sorted((str(k), str(v)) for k, v in raw.items()))


class Catalogue:
    """Merged view of all ImageCache objects; implements the watch Handler interface."""

    def __init__(self, rewriter: Rewriter | None = None) -> None:
        self._objects: dict[str, JSON] = {}
        self._rewriter = rewriter or Rewriter(())
        self.images: dict[str, CatalogueImage] = {}
        self.reports: dict[str, SourceReport] = {}
        self.version = 0
        self._listeners: list[Callable[[], None]] = []
        # Node label keys that any nodeSelector names, and the prepull list per node shape.
        # Nodes with the same platform and the same values of those labels share a list.
        self._selector_keys: tuple[str, ...] = ()
        self._prepull_lists: dict[tuple[str | None, ...], list[CatalogueImage]] = {}

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def set_rewriter(self, rewriter: Rewriter) -> None:
        self._rewriter = rewriter
        self._rebuild()

    # -- watch Handler -----------------------------------------------------

    def replace(self, objects: list[JSON]) -> None:
        self._objects = {_key(obj): obj for obj in objects}
        self._rebuild()

    def upsert(self, obj: JSON) -> None:
        key = _key(obj)
        previous = self._objects.get(key)
        self._objects[key] = obj
        if previous is not None and _same_spec(previous, obj):
            # imgcache's own status writes come back as updates; the spec is unchanged,
            # so a rebuild would only invalidate every node's cached image list.
            return
        self._rebuild()

    def remove(self, obj: JSON) -> None:
        self._objects.pop(_key(obj), None)
        self._rebuild()

    # -- queries -----------------------------------------------------------

    def prepull_images(self, node: Node) -> list[CatalogueImage]:
        """Return the images to prepull on ``node``; the list is shared, so never change it."""
        shape = (node.os, node.arch, *(node.labels.get(key) for key in self._selector_keys))
        images = self._prepull_lists.get(shape)
        if images is None:
            images = [image for image in self.images.values() if image.prepull_on(node)]
            self._prepull_lists[shape] = images
        return images

    def pinned(self) -> Iterable[CatalogueImage]:
        return (image for image in self.images.values() if any(s.pin for s in image.scopes))

    # -- merging -----------------------------------------------------------

    def _rebuild(self) -> None:
        images: dict[str, CatalogueImage] = {}
        reports: dict[str, SourceReport] = {}
        for key in sorted(self._objects):
            reports[key] = self._merge_object(key, self._objects[key], images)
        before = set(self.images)
        self.images = images
        self.reports = reports
        self.version += 1
        self._selector_keys = tuple(
            sorted({key for image in images.values() for scope in image.scopes for key, _ in scope.node_selector})
        )
        self._prepull_lists = {}
        if before != set(images):
            log.info(
                "catalogue.changed",
                images=len(images),
                added=len(set(images) - before),
                removed=len(before - set(images)),
            )
        for listener in self._listeners:
            listener()

    def _merge_object(self, key: str, obj: JSON, images: dict[str, CatalogueImage]) -> SourceReport:
        metadata = obj.get("metadata") or {}
        spec: JSON = obj.get("spec") or {}
        report = SourceReport(
            namespace=str(metadata.get("namespace", "")),
            name=str(metadata.get("name", "")),
            uid=str(metadata.get("uid", "")),
            generation=int(metadata.get("generation") or 0),
            entries=[],
            node_selector=dict(spec.get("nodeSelector") or {}) if isinstance(spec.get("nodeSelector"), dict) else {},
        )
        try:
            selector = _selector(spec)
        except ValueError as error:
            report.entries.append(EntryReport("", None, None, str(error)))
            return report
        entries = spec.get("images") or []
        if not isinstance(entries, list):
            report.entries.append(EntryReport("", None, None, "spec.images must be a list"))
            return report
        object_pull_through = spec.get("pullThroughCache", True) is not False
        for index, entry in enumerate(entries[:MAX_ENTRIES]):
            report.entries.append(self._merge_entry(key, index, entry, selector, object_pull_through, images))
        if len(entries) > MAX_ENTRIES:
            report.entries.append(
                EntryReport(
                    "", None, None, f"spec.images has {len(entries)} entries; only the first {MAX_ENTRIES} are used"
                )
            )
        return report

    def _merge_entry(
        self,
        key: str,
        index: int,
        entry: Any,
        selector: tuple[tuple[str, str], ...],
        object_pull_through: bool,
        images: dict[str, CatalogueImage],
    ) -> EntryReport:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            return EntryReport(str(entry)[:100], None, None, f"spec.images[{index}] needs an 'image' string")
        text = entry["image"]
        try:
            ref = parse(text)
        except InvalidReference as error:
            return EntryReport(text, None, None, str(error))
        pin = entry.get("pin", True) is not False
        prepull = entry.get("prepull", True) is not False
        if not pin and not prepull:
            return EntryReport(
                text,
                None,
                None,
                "pin and prepull are both false, so imgcache does nothing with this image; "
                "set one of them to true or remove the entry",
            )
        platforms_raw = entry.get("platforms")
        platforms = frozenset(str(p) for p in platforms_raw) if platforms_raw else None
        use_rewrite = object_pull_through and entry.get("pullThroughCache", True) is not False
        try:
            resolved = self._rewriter.rewrite(ref).result if use_rewrite else ref
        except InvalidReference as error:
            return EntryReport(text, None, None, f"pull-through cache rewrite failed: {error}")
        digest = image_hash(resolved)
        scope = Scope(
            node_selector=selector,
            platforms=platforms,
            pin=pin,
            prepull=prepull,
        )
        image = images.get(digest)
        if image is None:
            image = images[digest] = CatalogueImage(ref=ref, resolved=resolved, hash=digest)
        image.scopes.append(scope)
        image.sources.add(key)
        return EntryReport(text, str(resolved), digest, None)
