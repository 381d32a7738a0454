"""Table tests for parsing kubelet Pulled event messages and Go durations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgcache.kubelet_events import PulledMessage, parse_go_duration, parse_pulled

DIGEST_IMAGE = "registry.k8s.io/pause@sha256:" + "ab" * 32

PULLED = [
    pytest.param(
        'Successfully pulled image "nginx:1.27"',
        PulledMessage("nginx:1.27", None, None, None, already_present=False),
        id="before-1.19",
    ),
    pytest.param(
        'Successfully pulled image "nginx:1.27" in 3.215493872s',
        PulledMessage("nginx:1.27", None, 3.215493872, None, already_present=False),
        id="1.19-total-only",
    ),
    pytest.param(
        'Successfully pulled image "quay.io/a/b:v1" in 1m2.5s',
        PulledMessage("quay.io/a/b:v1", None, 62.5, None, already_present=False),
        id="1.19-minutes",
    ),
    pytest.param(
        'Successfully pulled image "nginx:1.27" in 1.503s (2.001s including waiting)',
        PulledMessage("nginx:1.27", 1.503, 2.001, None, already_present=False),
        id="1.26-waiting",
    ),
    pytest.param(
        'Successfully pulled image "busybox" in 830ms (830ms including waiting)',
        PulledMessage("busybox", 0.83, 0.83, None, already_present=False),
        id="1.26-milliseconds",
    ),
    pytest.param(
        'Successfully pulled image "nginx:1.27" in 1.503s (2.001s including waiting). Image size: '
        "72132455 bytes.",
        PulledMessage("nginx:1.27", 1.503, 2.001, 72132455, already_present=False),
        id="1.30-size",
    ),
    pytest.param(
        f'Successfully pulled image "{DIGEST_IMAGE}" in 1h0m3s (1h2m0s including waiting). '
        "Image size: 4204439320 bytes.",
        PulledMessage(DIGEST_IMAGE, 3603.0, 3720.0, 4204439320, already_present=False),
        id="1.30-digest-hours",
    ),
    pytest.param(
        'Successfully pulled image "nginx" in 0s (0s including waiting). Image size: 0 bytes.',
        PulledMessage("nginx", 0.0, 0.0, 0, already_present=False),
        id="1.30-zero",
    ),
    pytest.param(
        'Container image "nginx:1.27" already present on machine',
        PulledMessage("nginx:1.27", None, None, None, already_present=True),
        id="already-present",
    ),
    pytest.param(
        'Container image "nginx:1.27" already present on machine and can be accessed by the pod',
        PulledMessage("nginx:1.27", None, None, None, already_present=True),
        id="already-present-accessible",
    ),
    pytest.param(
        'spec.containers{web}: Container image "nginx:1.27" already present on machine and can be '
        "accessed by the pod",
        PulledMessage("nginx:1.27", None, None, None, already_present=True),
        id="describe-field-path",
    ),
    pytest.param(
        'spec.initContainers{init}: Successfully pulled image "busybox" in 1.627s '
        "(1.627s including waiting). Image size: 2222260 bytes.",
        PulledMessage("busybox", 1.627, 1.627, 2222260, already_present=False),
        id="describe-init-container",
    ),
    pytest.param(
        'Successfully pulled image "nginx:1.27" in 1.503s\n',
        PulledMessage("nginx:1.27", None, 1.503, None, already_present=False),
        id="trailing-newline",
    ),
]


@pytest.mark.parametrize(("message", "expected"), PULLED)
def test_parse_pulled(message: str, expected: PulledMessage) -> None:
    assert parse_pulled(message) == expected


NOT_PULLED = [
    pytest.param("", id="empty"),
    pytest.param('Pulling image "nginx:1.27"', id="pulling"),
    pytest.param('Failed to pull image "nginx:1.27": not found', id="failed"),
    pytest.param('Back-off pulling image "nginx:1.27"', id="back-off"),
    pytest.param("Successfully pulled image nginx:1.27", id="unquoted"),
    pytest.param('Successfully pulled image "nginx" in soon', id="bad-duration"),
    pytest.param('Successfully pulled image "nginx" in 1.5s (including waiting)', id="no-total"),
    pytest.param('Successfully pulled image "nginx" in 1.5s. Image size: 5 bytes.', id="size-only"),
    pytest.param('Successfully pulled image "nginx" in 1.5s and more', id="trailing-text"),
    pytest.param('Container image "nginx" is not present with pull policy of Never', id="never"),
    pytest.param('Successfully pulled image "nginx" in ' + "9" * 80 + "h", id="duration-too-long"),
]


@pytest.mark.parametrize("message", NOT_PULLED)
def test_parse_pulled_other(message: str) -> None:
    assert parse_pulled(message) is None


PULLED_PIECES = st.sampled_from(
    [
        'Successfully pulled image "',
        'Container image "',
        '" in ',
        " (",
        " including waiting)",
        ". Image size: ",
        " bytes.",
        "1.5s",
        "0",
        "ms",
        "µs",
        "9" * 70,
        '"',
        "x",
    ]
)


@given(st.text(max_size=200) | st.lists(PULLED_PIECES, max_size=12).map("".join))
@settings(max_examples=150, deadline=None, database=None)
def test_parse_pulled_never_raises(message: str) -> None:
    parsed = parse_pulled(message)

    assert parsed is None or isinstance(parsed, PulledMessage)


DURATIONS = [
    pytest.param("1.503s", 1.503, id="seconds"),
    pytest.param("500ms", 0.5, id="milliseconds"),
    pytest.param("1m2.5s", 62.5, id="minutes"),
    pytest.param("1h0m3s", 3603.0, id="hours"),
    pytest.param("850\u00b5s", 0.00085, id="micro-sign"),
    pytest.param("850\u03bcs", 0.00085, id="greek-mu"),
    pytest.param("850us", 0.00085, id="us"),
    pytest.param("12ns", 1.2e-08, id="nanoseconds"),
    pytest.param("0s", 0.0, id="zero-seconds"),
    pytest.param("0", 0.0, id="bare-zero"),
    pytest.param("-1.5s", -1.5, id="negative"),
    pytest.param("+2s", 2.0, id="plus"),
    pytest.param(".5s", 0.5, id="leading-dot"),
    pytest.param("2562047h47m16.854775807s", 9223372036.854775807, id="int64-max"),
]


@pytest.mark.parametrize(("text", "expected"), DURATIONS)
def test_parse_go_duration(text: str, expected: float) -> None:
    assert parse_go_duration(text) == pytest.approx(expected, rel=1e-12)


BAD_DURATIONS = [
    pytest.param("", id="empty"),
    pytest.param("1", id="no-unit"),
    pytest.param("1.5", id="fraction-no-unit"),
    pytest.param("s", id="unit-only"),
    pytest.param("1d", id="days"),
    pytest.param("1 s", id="space"),
    pytest.param("1e3s", id="exponent"),
    pytest.param("1s ", id="trailing-space"),
    pytest.param("\u0661s", id="arabic-digit"),
    pytest.param("2562047h47m16.854775808s", id="over-int64"),
    pytest.param("9" * 65 + "s", id="too-long"),
]


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_parse_go_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid Go duration"):
        parse_go_duration(text)
