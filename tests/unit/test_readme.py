"""The README documents every flag, environment variable and metric the code defines."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgcache.config import _OPTIONS
from imgcache.metrics import Metrics

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("option", _OPTIONS, ids=lambda o: o.flag)
def test_readme_documents_flag(option) -> None:  # type: ignore[no-untyped-def]
    assert f"`{option.flag}`" in README
    assert f"`{option.env}`" in README


def exported_names() -> list[str]:
    names = []
    for family in Metrics().registry.collect():
        if family.name.startswith("imgcache_"):
            names.append(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


@pytest.mark.parametrize("name", exported_names())
def test_readme_documents_metric(name: str) -> None:
    assert f"`{name}`" in README
