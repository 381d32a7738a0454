"""Property tests for reference parsing and pull-through cache rewriting."""

from __future__ import annotations

import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from imgcache.reference import REFERENCE_PATTERN, InvalidReference, parse
from imgcache.rewrite import PullThroughRule, Rewriter

# Each property gets a modest number of examples to keep the unit suite fast.
# database=None keeps Hypothesis from writing a .hypothesis folder into the tree.
FUZZ = settings(max_examples=150, deadline=None, database=None)

LOWER_ALNUM = string.ascii_lowercase + string.digits
TAG_FIRST = string.ascii_letters + string.digits + "_"
TAG_REST = TAG_FIRST + ".-"
REFERENCE_CHARACTERS = "abcAB019.-_:/@[]+ "

REWRITER = Rewriter(
    [
        PullThroughRule("docker-hub", "registry-1.docker.io", "123456789012", "us-west-2"),
        PullThroughRule("quay", "quay.io", "123456789012", "us-west-2"),
        PullThroughRule("team", "quay.io", "123456789012", "us-west-2", "team-a"),
        PullThroughRule("local", "localhost:5000", "123456789012", "us-west-2"),
    ]
)


@st.composite
def path_components(draw: st.DrawFn) -> str:
    parts = [draw(st.text(LOWER_ALNUM, min_size=1, max_size=8))]
    for _ in range(draw(st.integers(0, 2))):
        parts.append(draw(st.sampled_from([".", "_", "__", "-", "--"])))
        parts.append(draw(st.text(LOWER_ALNUM, min_size=1, max_size=8)))
    return "".join(parts)


@st.composite
def host_names(draw: st.DrawFn) -> str:
    labels = draw(st.lists(st.text(LOWER_ALNUM, min_size=1, max_size=10), min_size=2, max_size=3))
    host = ".".join(labels)
    if draw(st.booleans()):
        host += f":{draw(st.integers(1, 65535))}"
    return host


REGISTRIES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "quay.io",
            "localhost",
            "localhost:5000",
            "[::1]:5000",
            "123456789012.dkr.ecr.us-west-2.amazonaws.com",
        ]
    ),
    host_names(),
)
PATHS = st.one_of(
    st.lists(path_components(), min_size=1, max_size=4).map("/".join),
    path_components().map(lambda name: f"team-a/{name}"),
)
TAGS = st.one_of(
    st.none(),
    st.builds(
        lambda first, rest: first + rest,
        st.sampled_from(TAG_FIRST),
        st.text(TAG_REST, max_size=30),
    ),
)
DIGESTS = st.one_of(
    st.none(),
    st.text("0123456789abcdef", min_size=64, max_size=64).map(
        lambda hex_digits: "sha256:" + hex_digits
    ),
    st.text("0123456789abcdef", min_size=128, max_size=128).map(
        lambda hex_digits: "sha512:" + hex_digits
    ),
)


@st.composite
def valid_references(draw: st.DrawFn) -> tuple[str, str | None, str | None]:
    registry = draw(REGISTRIES)
    path = draw(PATHS)
    tag = draw(TAGS)
    digest = draw(DIGESTS)

    # Without a registry, a first component with a "." would be read as a host.
    first_component = path.split("/")[0]
    if registry is None and "/" in path and "." in first_component:
        registry = "docker.io"

    text = path if registry is None else f"{registry}/{path}"
    if tag is not None:
        text += f":{tag}"
    if digest is not None:
        text += f"@{digest}"
    return text, tag, digest


def parse_or_none(text: str) -> object:
    # Any exception other than InvalidReference fails the calling test.
    try:
        return parse(text)
    except InvalidReference:
        return None


@FUZZ
@given(st.text(max_size=300))
def test_parse_arbitrary_text(text: str) -> None:
    parse_or_none(text)


@FUZZ
@given(st.text(REFERENCE_CHARACTERS, max_size=60))
def test_parse_reference_like_text(text: str) -> None:
    parse_or_none(text)


@FUZZ
@given(st.text(REFERENCE_CHARACTERS, max_size=60))
def test_pattern_accepts_parsed_text(text: str) -> None:
    if parse_or_none(text) is not None:
        assert re.fullmatch(REFERENCE_PATTERN, text)


@FUZZ
@given(valid_references())
def test_parse_valid_round_trip(case: tuple[str, str | None, str | None]) -> None:
    text, _, _ = case
    ref = parse(text)

    assert parse(str(ref)) == ref


@FUZZ
@given(valid_references())
def test_parse_valid_keeps_tag_and_digest(case: tuple[str, str | None, str | None]) -> None:
    text, tag, digest = case
    ref = parse(text)

    assert ref.digest == digest
    assert ref.tag == ("latest" if tag is None and digest is None else tag)


@FUZZ
@given(valid_references())
def test_pattern_accepts_valid(case: tuple[str, str | None, str | None]) -> None:
    text, _, _ = case

    assert re.fullmatch(REFERENCE_PATTERN, text)


@FUZZ
@given(valid_references())
def test_rewrite_round_trip(case: tuple[str, str | None, str | None]) -> None:
    text, _, _ = case
    ref = parse(text)
    result = REWRITER.rewrite(ref).result

    assert parse(str(result)) == result
    assert result.tag == ref.tag
    assert result.digest == ref.digest
