"""Table tests for image reference parsing and normalization."""

from __future__ import annotations

import re

import pytest

from imgcache.reference import (
    REFERENCE_PATTERN,
    ImageRef,
    InvalidReference,
    image_hash,
    is_docker_hub,
    is_ecr_private_registry,
    is_ecr_registry,
    parse,
)

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8
ECR = "123456789012.dkr.ecr.us-west-2.amazonaws.com"

# (input, registry, repository, tag, digest)
VALID = [
    pytest.param("nginx", "docker.io", "library/nginx", "latest", None, id="bare-name"),
    pytest.param("nginx:1.27", "docker.io", "library/nginx", "1.27", None, id="bare-name-tag"),
    pytest.param("library/nginx", "docker.io", "library/nginx", "latest", None, id="library"),
    pytest.param("bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2", None, id="namespace"),
    pytest.param("docker.io/nginx", "docker.io", "library/nginx", "latest", None, id="docker-io"),
    pytest.param(
        "index.docker.io/library/nginx:1",
        "docker.io",
        "library/nginx",
        "1",
        None,
        id="index-docker-io",
    ),
    pytest.param(
        "registry-1.docker.io/nginx",
        "registry-1.docker.io",
        "nginx",
        "latest",
        None,
        id="registry-1-kept",
    ),
    pytest.param(
        "quay.io/prometheus/node-exporter:v1.8.2",
        "quay.io",
        "prometheus/node-exporter",
        "v1.8.2",
        None,
        id="quay",
    ),
    pytest.param("registry.k8s.io/pause:3.10", "registry.k8s.io", "pause", "3.10", None, id="k8s"),
    pytest.param(
        f"ghcr.io/org/team/app@{SHA256}", "ghcr.io", "org/team/app", None, SHA256, id="digest"
    ),
    pytest.param(
        f"nginx:1.27@{SHA256}", "docker.io", "library/nginx", "1.27", SHA256, id="tag-and-digest"
    ),
    pytest.param(f"app@{SHA512}", "docker.io", "library/app", None, SHA512, id="sha512"),
    pytest.param(
        "app@blake3:" + "ab" * 32,
        "docker.io",
        "library/app",
        None,
        "blake3:" + "ab" * 32,
        id="other-algorithm",
    ),
    pytest.param("localhost/app", "localhost", "app", "latest", None, id="localhost"),
    pytest.param(
        "localhost:5000/app:dev", "localhost:5000", "app", "dev", None, id="localhost-port"
    ),
    pytest.param("10.0.0.1:5000/a/b", "10.0.0.1:5000", "a/b", "latest", None, id="ipv4-port"),
    pytest.param("[::1]:5000/app", "[::1]:5000", "app", "latest", None, id="ipv6-port"),
    pytest.param("myhost:5000/app", "myhost:5000", "app", "latest", None, id="host-port"),
    pytest.param(f"{ECR}/team/app:v1", ECR, "team/app", "v1", None, id="ecr"),
    pytest.param(
        "Registry.Example.com/app", "Registry.Example.com", "app", "latest", None, id="host-case"
    ),
    pytest.param("foo:5000", "docker.io", "library/foo", "5000", None, id="port-like-tag"),
    pytest.param(
        "a__b/c--d/e.f_g", "docker.io", "a__b/c--d/e.f_g", "latest", None, id="separators"
    ),
    pytest.param("app:V1_x.y-z", "docker.io", "library/app", "V1_x.y-z", None, id="tag-characters"),
    pytest.param(
        "app:_" + "a" * 127, "docker.io", "library/app", "_" + "a" * 127, None, id="tag-128"
    ),
    pytest.param(
        "example.com/" + "a" * 243, "example.com", "a" * 243, "latest", None, id="name-255"
    ),
]


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), VALID)
def test_parse_valid(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse(text)

    assert ref.registry == registry
    assert ref.repository == repository
    assert ref.tag == tag
    assert ref.digest == digest


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), VALID)
def test_parse_round_trip(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse(text)

    assert parse(str(ref)) == ref


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), VALID)
def test_pattern_accepts_valid(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    assert re.fullmatch(REFERENCE_PATTERN, text)


# (input, expected text in the error message)
INVALID = [
    pytest.param("", "the reference is empty", id="empty"),
    pytest.param("   ", "the reference is empty or only whitespace", id="whitespace-only"),
    pytest.param(" nginx", "leading or trailing whitespace. Write 'nginx'", id="leading-space"),
    pytest.param("nginx\n", "leading or trailing whitespace. Write 'nginx'", id="trailing-newline"),
    pytest.param("ng inx", "contains whitespace", id="inner-space"),
    pytest.param("nginx\x00", "control", id="control-character"),
    pytest.param("caf\u00e9", "non-ASCII", id="non-ascii"),
    pytest.param("Nginx", "must be lowercase. Write 'nginx'", id="uppercase-bare"),
    pytest.param("Foo/bar", "must be lowercase. Write 'foo/bar'", id="uppercase-first-component"),
    pytest.param(
        "docker.io/Library/Nginx:V1",
        "must be lowercase. Write 'docker.io/library/nginx:V1'",
        id="uppercase-keeps-tag",
    ),
    pytest.param("Bad$Name", "Write the repository path in lowercase", id="uppercase-and-junk"),
    pytest.param("https://quay.io/a", "no URL scheme such as 'https://'", id="scheme"),
    pytest.param("nginx:", "the tag after ':' is empty", id="empty-tag"),
    pytest.param("nginx@", "the digest after '@' is empty", id="empty-digest"),
    pytest.param("nginx:-bad", "starts with '.' or '-'", id="tag-leading-dash"),
    pytest.param("nginx:a+b", "contains a character other than", id="tag-character"),
    pytest.param("nginx:" + "a" * 129, "the tag is 129 characters long", id="tag-129"),
    pytest.param("nginx@sha256:abc", "64 lowercase hex digits", id="digest-short"),
    pytest.param("nginx@sha256:" + "A" * 64, "64 lowercase hex digits", id="digest-uppercase"),
    pytest.param(
        "nginx@sha512:" + "a" * 64, "'sha512:' followed by 128", id="digest-sha512-length"
    ),
    pytest.param("nginx@md5x:" + "a" * 31, "the digest", id="digest-hex-under-32"),
    pytest.param("nginx@1sha:" + "a" * 32, "the digest", id="digest-algorithm"),
    pytest.param("nginx@sha256", "the digest", id="digest-no-colon"),
    pytest.param(f"nginx@{SHA256}@x", "the digest", id="digest-two-at"),
    pytest.param("foo//bar", "has an empty component", id="empty-component"),
    pytest.param("foo/", "has an empty component", id="trailing-slash"),
    pytest.param("quay.io/", "the repository path is empty", id="registry-only"),
    pytest.param("-foo", "component '-foo' is invalid", id="component-leading-dash"),
    pytest.param("foo_-bar", "component 'foo_-bar' is invalid", id="component-mixed-separator"),
    pytest.param("foo...bar", "component 'foo...bar' is invalid", id="component-dots"),
    pytest.param("nginx:a/b", "registry host 'nginx:a' is invalid", id="port-not-numeric"),
    pytest.param("-bad.com/foo", "registry host '-bad.com' is invalid", id="host-leading-dash"),
    pytest.param("a.b_c/d", "registry host 'a.b_c' is invalid", id="dotted-first-component"),
    pytest.param("a" * 238, "is 256 characters long, over the maximum of 255", id="name-256"),
]


@pytest.mark.parametrize(("text", "expected"), INVALID)
def test_parse_invalid(text: str, expected: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse(text)

    assert expected in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), INVALID)
def test_parse_invalid_names_value(text: str, expected: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse(text)

    assert str(caught.value).startswith("invalid image reference ")
    assert caught.value.value == text


def test_parse_invalid_message_example() -> None:
    with pytest.raises(InvalidReference) as caught:
        parse("Nginx")

    assert str(caught.value) == (
        "invalid image reference 'Nginx': repository names must be lowercase. Write 'nginx'"
    )


def test_parse_invalid_long_value_shortened() -> None:
    with pytest.raises(InvalidReference) as caught:
        parse("UPPER" * 1000)

    assert len(str(caught.value)) < 600


def test_invalid_reference_is_value_error() -> None:
    assert issubclass(InvalidReference, ValueError)


PATTERN_REJECTS = [
    pytest.param("", id="empty"),
    pytest.param("ng inx", id="space"),
    pytest.param(" nginx", id="leading-space"),
    pytest.param("Nginx", id="uppercase"),
    pytest.param("Foo/bar", id="uppercase-first-component"),
    pytest.param("quay.io/Team/app", id="uppercase-path"),
    pytest.param("nginx:", id="empty-tag"),
    pytest.param("nginx:-x", id="tag-leading-dash"),
    pytest.param("nginx:" + "a" * 129, id="tag-129"),
    pytest.param("nginx@sha256:abc", id="digest-short"),
    pytest.param("https://quay.io/a", id="scheme"),
    pytest.param("foo//bar", id="empty-component"),
    pytest.param("nginx\n", id="trailing-newline"),
]


@pytest.mark.parametrize("text", PATTERN_REJECTS)
def test_pattern_rejects_junk(text: str) -> None:
    assert re.fullmatch(REFERENCE_PATTERN, text) is None


def test_pattern_is_anchored() -> None:
    assert REFERENCE_PATTERN.startswith("^")
    assert REFERENCE_PATTERN.endswith("$")


@pytest.mark.parametrize(
    "construct",
    [
        pytest.param("(?=", id="lookahead"),
        pytest.param("(?!", id="negative-lookahead"),
        pytest.param("(?<", id="lookbehind-or-named-group"),
        pytest.param("\\d", id="unicode-digit-class"),
        pytest.param("\\w", id="unicode-word-class"),
        pytest.param("\\1", id="backreference"),
    ],
)
def test_pattern_avoids_construct(construct: str) -> None:
    assert construct not in REFERENCE_PATTERN


def test_str_canonical_tag_and_digest() -> None:
    ref = ImageRef(registry="quay.io", repository="a/b", tag="v1", digest=SHA256)

    assert str(ref) == f"quay.io/a/b:v1@{SHA256}"


def test_str_canonical_digest_only() -> None:
    ref = ImageRef(registry="quay.io", repository="a/b", tag=None, digest=SHA256)

    assert str(ref) == f"quay.io/a/b@{SHA256}"


def test_name_without_tag() -> None:
    assert parse("nginx:1.27").name == "docker.io/library/nginx"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("nginx", False, id="tag"),
        pytest.param(f"nginx@{SHA256}", True, id="digest"),
        pytest.param(f"nginx:1@{SHA256}", True, id="tag-and-digest"),
    ],
)
def test_pinned(text: str, expected: bool) -> None:
    assert parse(text).pinned is expected


def test_image_hash_known_value() -> None:
    # sha256("docker.io/library/nginx:latest"), first 10 hex digits.
    assert image_hash(parse("nginx")) == "86cee2c108"


def test_image_hash_same_for_equivalent_input() -> None:
    assert image_hash(parse("nginx")) == image_hash(parse("docker.io/library/nginx:latest"))


def test_image_hash_differs_by_tag() -> None:
    assert image_hash(parse("nginx:1")) != image_hash(parse("nginx:2"))


def test_image_hash_label_safe() -> None:
    assert re.fullmatch(r"[0-9a-f]{10}", image_hash(parse(f"quay.io/a@{SHA256}")))


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        pytest.param("docker.io", True, id="docker-io"),
        pytest.param("index.docker.io", True, id="index"),
        pytest.param("registry-1.docker.io", True, id="registry-1"),
        pytest.param("Docker.IO", True, id="case"),
        pytest.param("quay.io", False, id="quay"),
        pytest.param("docker.io.example.com", False, id="lookalike"),
    ],
)
def test_is_docker_hub(registry: str, expected: bool) -> None:
    assert is_docker_hub(registry) is expected


@pytest.mark.parametrize(
    ("registry", "private", "any_ecr"),
    [
        pytest.param(ECR, True, True, id="private"),
        pytest.param("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", True, True, id="china"),
        pytest.param("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com", True, True, id="fips"),
        pytest.param("public.ecr.aws", False, True, id="public"),
        pytest.param("1234.dkr.ecr.us-west-2.amazonaws.com", False, False, id="short-account"),
        pytest.param("quay.io", False, False, id="quay"),
    ],
)
def test_is_ecr_registry(registry: str, private: bool, any_ecr: bool) -> None:
    assert is_ecr_private_registry(registry) is private
    assert is_ecr_registry(registry) is any_ecr
