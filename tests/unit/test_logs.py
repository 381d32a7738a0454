"""The --log-level flag: JSON log lines below the configured level are left out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Configured in a child process, because structlog's configuration is global and cached.
SCRIPT = """
import sys
import structlog
from imgcache import config, logs
logs.configure(config.load(sys.argv[1:], {}).log_level)
log = structlog.get_logger("test")
log.debug("at.debug")
log.info("at.info")
log.warning("at.warning")
log.error("at.error")
"""


def logged_events(*flags: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *flags], capture_output=True, text=True, check=True, timeout=60
    )
    return [json.loads(line)["event"] for line in result.stdout.splitlines()]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param((), ["at.info", "at.warning", "at.error"], id="default-info"),
        pytest.param(("--log-level=debug",), ["at.debug", "at.info", "at.warning", "at.error"], id="debug"),
        pytest.param(("--log-level=warning",), ["at.warning", "at.error"], id="warning"),
        pytest.param(("--log-level=error",), ["at.error"], id="error"),
    ],
)
def test_log_level_filters_events(flags: tuple[str, ...], expected: list[str]) -> None:
    assert logged_events(*flags) == expected
