"""Parse the messages of kubelet ``Pulled`` events.

The kubelet reports pull durations and image sizes only in the free-text message
of its ``Pulled`` events, and the wording changed across Kubernetes releases.
The controller reads these messages to export pull times and sizes, so this
module parses the old wordings as well as the current one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

_NANOSECONDS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # MICRO SIGN, which Go's Duration.String() writes
    "\u03bcs": 1_000,  # GREEK SMALL LETTER MU, which time.ParseDuration also accepts
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_NANOSECONDS_PER_SECOND = 1_000_000_000
# time.Duration is an int64 count of nanoseconds. Its longest String() form,
# "-2562047h47m16.854775808s", has 25 characters, so 64 leaves room for the
# redundant forms ParseDuration accepts while keeping Decimal far from overflow.
_MAX_DURATION_NANOSECONDS = 2**63 - 1
_MAX_DURATION_TEXT_LENGTH = 64

# "ms" is listed before "m" so that "500ms" is not read as 500 minutes and an "s".
_UNIT = "|".join(re.escape(unit) for unit in sorted(_NANOSECONDS_PER_UNIT, key=len, reverse=True))
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DURATION_PART_RE = re.compile(rf"({_NUMBER})({_UNIT})")
_DURATION = rf"[-+]?(?:0|(?:{_NUMBER}(?:{_UNIT}))+)"
_DURATION_RE = re.compile(_DURATION)

# Some `kubectl describe` versions print the event's field path in front of the
# message, as in "spec.containers{web}: Container image ...".
_FIELD_PATH_PREFIX = r"(?:spec\.(?:initContainers|containers|ephemeralContainers)\{[^}]*\}: )?"
_IMAGE = r'"(?P<image>[^"]+)"'

# Matches the four wordings: the image alone (1.18 and earlier), " in <duration>"
# (1.19 to 1.25), " in <pull> (<total> including waiting)" (1.26, backported to
# 1.23 to 1.25 patch releases), and that plus ". Image size: <N> bytes." (about 1.30).
_PULLED_RE = re.compile(
    rf"{_FIELD_PATH_PREFIX}Successfully pulled image {_IMAGE}"
    rf"(?: in (?P<first>{_DURATION})"
    rf"(?: \((?P<total>{_DURATION}) including waiting\)"
    rf"(?:\. Image size: (?P<size>[0-9]+) bytes\.)?)?)?"
)
_ALREADY_PRESENT_RE = re.compile(
    rf"{_FIELD_PATH_PREFIX}Container image {_IMAGE} already present on machine"
    r"(?: and can be accessed by the pod)?"
)


@dataclass(frozen=True)
class PulledMessage:
    """Facts from one ``Pulled`` event message.

    ``image`` is the image as the pod spec names it. ``pull_seconds`` is the time
    the container runtime spent pulling, and ``total_seconds`` includes the time
    the pull waited in the kubelet's queue. Fields the message does not contain
    are None.
    """

    image: str
    pull_seconds: float | None
    total_seconds: float | None
    size_bytes: int | None
    already_present: bool


def parse_pulled(message: str) -> PulledMessage | None:
    """Parse a ``Pulled`` event message, or return None for any other message."""
    text = message.strip()

    present = _ALREADY_PRESENT_RE.fullmatch(text)
    if present is not None:
        return PulledMessage(
            image=present["image"],
            pull_seconds=None,
            total_seconds=None,
            size_bytes=None,
            already_present=True,
        )

    pulled = _PULLED_RE.fullmatch(text)
    if pulled is None:
        return None
    return _pulled_message(pulled)


def _pulled_message(pulled: re.Match[str]) -> PulledMessage | None:
    try:
        first = None if pulled["first"] is None else parse_go_duration(pulled["first"])
        total = None if pulled["total"] is None else parse_go_duration(pulled["total"])
    except ValueError:
        return None

    if total is None:
        # Before 1.26 the single duration was measured from the pull request,
        # so it includes the queue wait and is the total, not the pull time.
        pull_seconds, total_seconds = None, first
    else:
        pull_seconds, total_seconds = first, total

    size = None if pulled["size"] is None else int(pulled["size"])
    return PulledMessage(
        image=pulled["image"],
        pull_seconds=pull_seconds,
        total_seconds=total_seconds,
        size_bytes=size,
        already_present=False,
    )


def parse_go_duration(text: str) -> float:
    """Convert a Go ``time.Duration`` string such as ``1m2.5s`` to seconds.

    Accepts what Go's ``time.ParseDuration`` accepts: an optional sign, then
    "0" or one or more decimal numbers with a unit (ns, us, µs, ms, s, m, h).
    Raises ValueError naming the text otherwise.
    """
    if len(text) > _MAX_DURATION_TEXT_LENGTH or _DURATION_RE.fullmatch(text) is None:
        raise ValueError(
            f"invalid Go duration {text!r}: expected numbers with units ns, us, µs, ms, s, m "
            "or h, as in '1.503s', '500ms' or '1m2.5s'"
        )

    # Decimal keeps "1.503s" exact until the final division.
    nanoseconds = Decimal(0)
    for number, unit in _DURATION_PART_RE.findall(text):
        nanoseconds += Decimal(number) * _NANOSECONDS_PER_UNIT[unit]
    if nanoseconds > _MAX_DURATION_NANOSECONDS:
        raise ValueError(f"invalid Go duration {text!r}: longer than Go's maximum of about 292 years")
    if text.startswith("-"):
        nanoseconds = -nanoseconds
    return float(nanoseconds / _NANOSECONDS_PER_SECOND)
