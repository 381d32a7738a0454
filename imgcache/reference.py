"""Parse container image references the way container runtimes resolve them.

The controller compares images from CRD entries, pod specs and kubelet events,
names pods and metric labels after them, and rewrites them to a pull-through
cache. All of that needs one normalized form, so ``parse`` follows the grammar of
github.com/distribution/reference, which containerd and the kubelet also follow,
and fills in the defaults a runtime applies: ``nginx`` becomes
``docker.io/library/nginx:latest``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
OFFICIAL_IMAGE_NAMESPACE = "library"

# The distribution reference library rewrites this legacy host to DEFAULT_REGISTRY.
# "registry-1.docker.io" is kept as written, as the library does.
LEGACY_DOCKER_HUB_REGISTRY = "index.docker.io"
DOCKER_HUB_REGISTRIES = frozenset({DEFAULT_REGISTRY, LEGACY_DOCKER_HUB_REGISTRY, "registry-1.docker.io"})

MAX_NAME_LENGTH = 255
MAX_TAG_LENGTH = 128
MAX_SHOWN_VALUE_LENGTH = 200

# Grammar fragments. Character classes are spelled out instead of \w or \d,
# because Python's \w and \d also match non-ASCII letters and digits, and because
# REFERENCE_PATTERN must compile unchanged in Go's RE2 (the API server) and in ECMA-262.
_PATH_ALNUM = r"[a-z0-9]+"
_PATH_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_PATH_ALNUM}(?:{_PATH_SEPARATOR}{_PATH_ALNUM})*"
_PATH = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"

_HOST_LABEL = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)"
_HOST_NAME = rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*"
_IPV6_HOST = r"\[[0-9A-Fa-f:]+\]"
_PORT = r"[0-9]+"
_DOMAIN = rf"(?:{_HOST_NAME}|{_IPV6_HOST})(?::{_PORT})?"

# A first path component is a registry only with a ".", a ":" or when it is
# "localhost", so the CRD pattern spells out those three shapes.
_DOMAIN_IN_REFERENCE = (
    rf"(?:localhost(?::{_PORT})?"
    rf"|{_HOST_LABEL}(?:\.{_HOST_LABEL})+(?::{_PORT})?"
    rf"|{_HOST_LABEL}:{_PORT}"
    rf"|{_IPV6_HOST}(?::{_PORT})?)"
)

_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST_ALGORITHM = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*"
_DIGEST_HEX = r"[0-9a-fA-F]{32,}"
_DIGEST = rf"{_DIGEST_ALGORITHM}:{_DIGEST_HEX}"

REFERENCE_PATTERN: str = rf"^(?:{_DOMAIN_IN_REFERENCE}/)?{_PATH}(?::{_TAG})?(?:@{_DIGEST})?$"
"""Anchored pattern for the CRD OpenAPI schema, valid in RE2 and ECMA-262.

It is looser than ``parse`` in two ways: it does not limit the name to 255
characters, and it accepts any digest algorithm with 32 or more hex digits
(``parse`` requires exactly 64 lowercase hex digits for sha256, for example).
"""

_DOMAIN_RE = re.compile(_DOMAIN)
_PATH_COMPONENT_RE = re.compile(_PATH_COMPONENT)
_TAG_CHARACTERS_RE = re.compile(r"[A-Za-z0-9_.-]+")
_TAG_RE = re.compile(_TAG)
_DIGEST_ALGORITHM_RE = re.compile(_DIGEST_ALGORITHM)
_DIGEST_HEX_RE = re.compile(_DIGEST_HEX)
_LOWER_HEX_RE = re.compile(r"[0-9a-f]+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

# Hex lengths that github.com/opencontainers/go-digest requires for the
# algorithms it registers. It accepts only lowercase hex for them.
_KNOWN_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}

_ECR_PRIVATE_REGISTRY_RE = re.compile(r"[0-9]{12}\.dkr\.ecr(?:-fips)?\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?")
ECR_PUBLIC_REGISTRY = "public.ecr.aws"

_TAG_CHARACTERS = "letters, digits, '_', '.' and '-'"
_EXAMPLE_REFERENCE = "'nginx:1.27' or 'registry.example.com/team/app@sha256:<64 hex digits>'"


class InvalidReference(ValueError):
    """Raised when a string is not a valid container image reference.

    ``value`` is the rejected input, ``problem`` what is wrong with it and ``fix``
    what to write instead.
    """

    def __init__(self, value: str, problem: str, fix: str) -> None:
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"invalid image reference {_shorten(value)}: {problem}. {fix}")


@dataclass(frozen=True)
class ImageRef:
    """Normalized image reference.

    ``registry`` is the host as written (with any port), except that
    ``index.docker.io`` becomes ``docker.io``. ``repository`` is the path on that
    registry, with ``library/`` for Docker Hub official images. At least one of
    ``tag`` and ``digest`` is set when the reference comes from ``parse``.
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """Registry and repository without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def pinned(self) -> bool:
        """Whether a digest fixes the image content."""
        return self.digest is not None

    @property
    def on_docker_hub(self) -> bool:
        """Whether the registry is one of Docker Hub's host names."""
        return is_docker_hub(self.registry)


def parse(text: str) -> ImageRef:
    """Parse and normalize an image reference such as ``nginx:1.27``.

    Raises InvalidReference, with the reason and a fix, when the text does not
    follow the distribution reference grammar.
    """
    _check_characters(text)

    remainder, digest = _split_digest(text)
    name, tag = _split_tag(text, remainder)
    registry, path = _split_registry(name)

    _check_registry(text, registry)
    _check_path(text, registry, path, name)
    if tag is not None:
        _check_tag(text, tag)
    if digest is not None:
        _check_digest(text, digest)

    registry, repository = _normalize_name(registry, path)
    full_name = f"{registry}/{repository}"
    if len(full_name) > MAX_NAME_LENGTH:
        raise InvalidReference(
            text,
            f"the normalized name '{full_name[:60]}...' is {len(full_name)} characters long, "
            f"over the maximum of {MAX_NAME_LENGTH}",
            "Shorten the registry host or the repository path",
        )

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)


def image_hash(ref: ImageRef) -> str:
    """Return the first 10 hex digits of the SHA-256 of the canonical reference.

    The value fits Kubernetes names and label values and stays the same across
    releases, because it depends only on ``str(ref)``.
    """
    return hashlib.sha256(str(ref).encode()).hexdigest()[:10]


def is_registry_host(text: str) -> bool:
    """Return whether ``text`` is a valid registry host with an optional port."""
    return _DOMAIN_RE.fullmatch(text) is not None


def is_docker_hub(registry: str) -> bool:
    """Return whether ``registry`` is one of Docker Hub's host names."""
    return registry.lower() in DOCKER_HUB_REGISTRIES


def is_ecr_registry(registry: str) -> bool:
    """Return whether ``registry`` is a private ECR registry or ECR Public."""
    host = registry.lower()
    return host == ECR_PUBLIC_REGISTRY or _ECR_PRIVATE_REGISTRY_RE.fullmatch(host) is not None


def is_ecr_private_registry(registry: str) -> bool:
    """Return whether ``registry`` is an ``<account>.dkr.ecr.<region>`` registry host."""
    return _ECR_PRIVATE_REGISTRY_RE.fullmatch(registry.lower()) is not None


def _shorten(value: str) -> str:
    quoted = repr(value)
    if len(quoted) > MAX_SHOWN_VALUE_LENGTH:
        quoted = quoted[: MAX_SHOWN_VALUE_LENGTH - 4] + "...'"
    return quoted


def _check_characters(text: str) -> None:
    stripped = text.strip()
    if not stripped:
        raise InvalidReference(
            text,
            "the reference is empty or only whitespace",
            f"Set an image such as {_EXAMPLE_REFERENCE}",
        )
    if stripped != text and not any(char.isspace() for char in stripped):
        raise InvalidReference(text, "it has leading or trailing whitespace", f"Write {_shorten(stripped)}")
    if any(char.isspace() or not char.isprintable() or not char.isascii() for char in text):
        raise InvalidReference(
            text,
            "it contains whitespace, control or non-ASCII characters",
            "Remove them, because image references are plain ASCII without spaces",
        )

    scheme = _SCHEME_RE.match(text)
    if scheme is not None:
        raise InvalidReference(
            text,
            f"image references have no URL scheme such as {_shorten(scheme.group())}",
            f"Write {_shorten(text[scheme.end() :])}",
        )


def _split_digest(text: str) -> tuple[str, str | None]:
    remainder, separator, digest = text.partition("@")
    if not separator:
        return text, None
    if not digest:
        raise InvalidReference(text, "the digest after '@' is empty", "Remove the '@' or add 'sha256:<64 hex digits>'")
    return remainder, digest


def _split_tag(text: str, remainder: str) -> tuple[str, str | None]:
    # A ":" before the last "/" belongs to a registry port, not to a tag.
    colon = remainder.rfind(":")
    if colon == -1 or colon < remainder.rfind("/"):
        return remainder, None

    tag = remainder[colon + 1 :]
    if not tag:
        raise InvalidReference(
            text,
            "the tag after ':' is empty",
            f"Remove the ':' or add a tag, as in {_EXAMPLE_REFERENCE}",
        )
    return remainder[:colon], tag


def _split_registry(name: str) -> tuple[str | None, str]:
    first, separator, rest = name.partition("/")
    if separator and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


def _check_registry(text: str, registry: str | None) -> None:
    if registry is None or is_registry_host(registry):
        return
    raise InvalidReference(
        text,
        f"the registry host {_shorten(registry)} is invalid",
        "Write a host name, IPv4 address or bracketed IPv6 address, "
        "optionally followed by ':' and a port, as in 'registry.example.com:5000'",
    )


def _check_path(text: str, registry: str | None, path: str, name: str) -> None:
    if not path:
        raise InvalidReference(text, "the repository path is empty", f"Add a repository, as in {_EXAMPLE_REFERENCE}")

    if path != path.lower():
        raise InvalidReference(text, "repository names must be lowercase", _lowercase_fix(text, registry, path, name))

    for component in path.split("/"):
        if not component:
            raise InvalidReference(
                text,
                f"the repository path {_shorten(path)} has an empty component",
                "Remove the doubled, leading or trailing '/'",
            )
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise InvalidReference(
                text,
                f"the repository path component {_shorten(component)} is invalid",
                "Use lowercase letters and digits, separated by one '.', one or two '_', or any number of '-'",
            )


def _lowercase_fix(text: str, registry: str | None, path: str, name: str) -> str:
    prefix = "" if registry is None else f"{registry}/"
    suggestion = prefix + path.lower() + text[len(name) :]
    try:
        parse(suggestion)
    except InvalidReference:
        return "Write the repository path in lowercase"
    return f"Write {_shorten(suggestion)}"


def _check_tag(text: str, tag: str) -> None:
    if len(tag) > MAX_TAG_LENGTH:
        raise InvalidReference(
            text,
            f"the tag is {len(tag)} characters long",
            f"Use a tag of at most {MAX_TAG_LENGTH} characters",
        )
    if _TAG_RE.fullmatch(tag):
        return

    if _TAG_CHARACTERS_RE.fullmatch(tag):
        problem = f"the tag {_shorten(tag)} starts with '.' or '-'"
    else:
        problem = f"the tag {_shorten(tag)} contains a character other than {_TAG_CHARACTERS}"
    fix = f"Start the tag with a letter, digit or '_', and use only {_TAG_CHARACTERS}"
    raise InvalidReference(text, problem, fix)


def _check_digest(text: str, digest: str) -> None:
    algorithm, separator, encoded = digest.partition(":")
    expected_length = _KNOWN_DIGEST_HEX_LENGTHS.get(algorithm)
    valid = False

    if separator and expected_length is not None:
        valid = len(encoded) == expected_length and _LOWER_HEX_RE.fullmatch(encoded) is not None
    elif separator:
        valid = bool(_DIGEST_ALGORITHM_RE.fullmatch(algorithm) and _DIGEST_HEX_RE.fullmatch(encoded))

    if valid:
        return
    if expected_length is None:
        fix = "Write the digest as 'sha256:' followed by 64 lowercase hex digits"
    else:
        fix = f"Write the digest as '{algorithm}:' followed by {expected_length} lowercase hex digits"
    raise InvalidReference(text, f"the digest {_shorten(digest)} is invalid", fix)


def _normalize_name(registry: str | None, path: str) -> tuple[str, str]:
    if registry is None or registry == LEGACY_DOCKER_HUB_REGISTRY:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"{OFFICIAL_IMAGE_NAMESPACE}/{path}"
    return registry, path
