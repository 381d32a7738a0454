"""Tests of flag and IMGCACHE_* environment parsing, validation and documented defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from imgcache import config
from imgcache.config import ConfigError, Settings, build_parser, load
from imgcache.rewrite import parse_static_rule
from imgcache.scheduler import Limits

THIS_FILE = str(Path(__file__))
OTHER_FILE = str(Path(__file__).with_name("factories.py"))
RULE_A = "docker-hub=registry-1.docker.io@123456789012/us-west-2"
RULE_B = "quay=quay.io@123456789012/eu-west-1"
RULE_C = "k8s=registry.k8s.io@210987654321/us-east-1"

# flag: (flag value, env value, setting from the flag value, setting from the env value).
# Each env value differs from the default and each flag value from the env value, so
# every assertion below can tell which source was used.
OPTION_VALUES: dict[str, tuple[str, str, Any, Any]] = {
    "--kubeconfig": (THIS_FILE, OTHER_FILE, THIS_FILE, OTHER_FILE),
    "--namespace": ("ns-flag", "ns-env", "ns-flag", "ns-env"),
    "--identity": ("id-flag", " id-env ", "id-flag", "id-env"),
    "--http-port": ("9090", "9091", 9090, 9091),
    "--http-address": ("127.0.0.1", "::1", "127.0.0.1", "::1"),
    "--log-level": ("DEBUG", "warning", "debug", "warning"),
    "--leader-election": ("true", "false", True, False),
    "--lease-name": ("lease-flag", "lease-env", "lease-flag", "lease-env"),
    "--lease-duration": ("30", "40", 30.0, 40.0),
    "--renew-deadline": ("12", "11", 12.0, 11.0),
    "--retry-period": ("3", "4", 3.0, 4.0),
    "--helper-image": ("helper:flag", "helper:env", "helper:flag", "helper:env"),
    "--pinner": ("on", "off", True, False),
    "--priority-class": ("pc-flag", "pc-env", "pc-flag", "pc-env"),
    "--pin-debounce": ("1.5", "2.5", 1.5, 2.5),
    "--prepull": ("1", "0", True, False),
    "--host-network": ("yes", "no", True, False),
    "--max-inflight": ("50", "60", 50, 60),
    "--max-inflight-per-node": ("2", "3", 2, 3),
    "--registry-qps": ("30", "25.5", 30.0, 25.5),
    "--registry-burst": ("5", "7", 5, 7),
    "--registry-min-qps": ("1", "0.25", 1.0, 0.25),
    "--node-pull-qps": ("0", "2.5", 0.0, 2.5),
    "--node-pull-burst": ("3", "20", 3, 20),
    "--prepull-deadline": ("100", "200", 100.0, 200.0),
    "--pod-deadline": ("300", "400", 300, 400),
    "--retry-initial": ("1", "2", 1.0, 2.0),
    "--retry-max": ("60", "90", 60.0, 90.0),
    "--startup-taint": (
        "imgcache.io/warming",
        "karpenter.sh/unregistered",
        "imgcache.io/warming",
        "karpenter.sh/unregistered",
    ),
    "--startup-taint-deadline": ("120", "240", 120.0, 240.0),
    "--progress-interval": ("1", "2", 1.0, 2.0),
    "--status-interval": ("20", "30", 20.0, 30.0),
    "--watch-timeout": ("60", "90", 60, 90),
    "--watch-read-timeout": ("200", "300", 200.0, 300.0),
    "--watch-cluster-events": ("false", "true", False, True),
    "--pull-through-cache": ("TRUE", "False", True, False),
    "--pull-through-rule": (RULE_A, RULE_B, (parse_static_rule(RULE_A),), (parse_static_rule(RULE_B),)),
    "--pull-through-refresh": ("60", "120", 60.0, 120.0),
    "--aws-region": ("us-east-1", "eu-west-1", "us-east-1", "eu-west-1"),
    "--aws-account": ("123456789012", "210987654321", "123456789012", "210987654321"),
    "--aws-endpoint-url": (
        "http://127.0.0.1:4566",
        "http://127.0.0.1:4567",
        "http://127.0.0.1:4566",
        "http://127.0.0.1:4567",
    ),
    "--ecr-quota-awareness": ("off", "on", False, True),
    "--shutdown-timeout": ("5", "7", 5.0, 7.0),
}

# flag: a value that its parser rejects.
INVALID_VALUES: dict[str, str] = {
    "--kubeconfig": "/nonexistent/imgcache/kubeconfig",
    "--namespace": "Not_A_Namespace",
    "--identity": "   ",
    "--http-port": "70000",
    "--http-address": "   ",
    "--log-level": "verbose",
    "--leader-election": "maybe",
    "--lease-name": "Lease.Name",
    "--lease-duration": "-15",
    "--renew-deadline": "0",
    "--retry-period": "soon",
    "--helper-image": "   ",
    "--pinner": "2",
    "--priority-class": "   ",
    "--pin-debounce": "nan",
    "--prepull": "enabled",
    "--host-network": "tru",
    "--max-inflight": "0",
    "--max-inflight-per-node": "1.5",
    "--registry-qps": "-1",
    "--registry-burst": "many",
    "--registry-min-qps": "0",
    "--node-pull-qps": "-1",
    "--node-pull-burst": "0",
    "--prepull-deadline": "15m",
    "--pod-deadline": "600s",
    "--retry-initial": "-5",
    "--retry-max": "0",
    "--startup-taint": "bad key!",
    "--startup-taint-deadline": "never",
    "--progress-interval": "0",
    "--status-interval": "-10",
    "--watch-timeout": "2.5",
    "--watch-read-timeout": "0",
    "--watch-cluster-events": "sometimes",
    "--pull-through-cache": "nope",
    "--pull-through-rule": "docker-hub=registry-1.docker.io",
    "--pull-through-refresh": "0",
    "--aws-region": "   ",
    "--aws-account": "   ",
    "--aws-endpoint-url": "   ",
    "--ecr-quota-awareness": "perhaps",
    "--shutdown-timeout": "forever",
}

# Options whose help describes a default computed at start instead of a literal value.
DESCRIBED_DEFAULTS: dict[str, Any] = {
    "kubeconfig": None,
    "namespace": "imgcache-system",
    "identity": "imgcache",
    "helper_image": None,
    "aws_region": None,
    "aws_account": None,
    "aws_endpoint_url": None,
}
_DEFAULT_TEXT = re.compile(r"\(default(?P<colon>:?) (?P<text>[^;)]*)")


def _options() -> dict[str, tuple[str, str]]:
    """Return flag: (dest, env variable) for every option of the parser."""
    options = {}
    for action in build_parser()._actions:
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if not flags or action.dest == "help":
            continue
        flag = flags[0]
        env = "IMGCACHE_" + flag[2:].replace("-", "_").upper()
        options[flag] = (action.dest, env)
    return options


def _help(flag: str) -> str:
    for action in build_parser()._actions:
        if flag in action.option_strings:
            return action.help or ""
    raise KeyError(flag)


OPTIONS = _options()


@pytest.fixture(autouse=True)
def _no_service_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests must not depend on running inside a pod.
    monkeypatch.setattr(config, "_SA_NAMESPACE_FILE", tmp_path / "no-namespace-file")


def test_tables_cover_every_flag() -> None:
    assert set(OPTION_VALUES) == set(OPTIONS)
    assert set(INVALID_VALUES) == set(OPTIONS)


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_help_names_env_twin(flag: str) -> None:
    _, env = OPTIONS[flag]

    assert _help(flag).endswith(f"[env {env}]")


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_load_flag_value(flag: str) -> None:
    dest, _ = OPTIONS[flag]
    flag_value, _, expected, _ = OPTION_VALUES[flag]

    settings = load([f"{flag}={flag_value}"], {})

    assert getattr(settings, dest) == expected


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_load_env_value(flag: str) -> None:
    dest, env = OPTIONS[flag]
    _, env_value, _, expected = OPTION_VALUES[flag]

    settings = load([], {env: env_value})

    assert getattr(settings, dest) == expected


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_load_flag_beats_env(flag: str) -> None:
    dest, env = OPTIONS[flag]
    flag_value, env_value, expected, _ = OPTION_VALUES[flag]

    settings = load([f"{flag}={flag_value}"], {env: env_value})

    assert getattr(settings, dest) == expected


@pytest.mark.parametrize("flag", sorted(flag for flag in OPTIONS if OPTION_VALUES[flag][2] is True))
def test_load_bare_boolean_flag(flag: str) -> None:
    dest, env = OPTIONS[flag]

    settings = load([flag], {env: "false"})

    assert getattr(settings, dest) is True


def test_load_bare_boolean_before_other_flag() -> None:
    settings = load(["--pinner", "--max-inflight", "7"], {"IMGCACHE_PINNER": "false"})

    assert settings.pinner is True
    assert settings.max_inflight == 7


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_load_invalid_flag(flag: str) -> None:
    value = INVALID_VALUES[flag]

    with pytest.raises(ConfigError) as caught:
        load([f"{flag}={value}"], {})

    assert flag in str(caught.value)
    assert value in str(caught.value)


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_load_invalid_env(flag: str) -> None:
    _, env = OPTIONS[flag]
    value = INVALID_VALUES[flag]

    with pytest.raises(ConfigError) as caught:
        load([], {env: value})

    assert env in str(caught.value)
    assert value in str(caught.value)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        pytest.param("--http-port", "0", id="port-zero"),
        pytest.param("--http-port", "http", id="port-text"),
        pytest.param("--lease-duration", "inf-ish", id="float-text"),
        pytest.param("--max-inflight", "-3", id="int-negative"),
        pytest.param("--namespace", "-leading-dash", id="namespace-dash"),
        pytest.param("--namespace", "a" * 64, id="namespace-too-long"),
        pytest.param("--startup-taint", "/no-prefix", id="taint-empty-prefix"),
        pytest.param("--pull-through-rule", "", id="rule-empty"),
    ],
)
def test_load_invalid_flag_more(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load([f"{flag}={value}"], {})

    assert flag in str(caught.value)
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        pytest.param(["--renew-deadline=15"], ("--renew-deadline", "--lease-duration"), id="renew-equals-lease"),
        pytest.param(
            ["--renew-deadline=20", "--lease-duration=15"],
            ("--renew-deadline", "--lease-duration"),
            id="renew-over-lease",
        ),
        pytest.param(["--retry-period=10"], ("--retry-period", "--renew-deadline"), id="retry-period-equals-renew"),
        pytest.param(
            ["--max-inflight-per-node=5", "--max-inflight=4"],
            ("--max-inflight-per-node", "--max-inflight"),
            id="per-node-over-global",
        ),
        pytest.param(["--registry-min-qps=21"], ("--registry-min-qps", "--registry-qps"), id="min-qps-over-qps"),
        pytest.param(["--retry-initial=121"], ("--retry-initial", "--retry-max"), id="retry-initial-over-max"),
        pytest.param(
            ["--watch-read-timeout=120"],
            ("--watch-read-timeout", "--watch-timeout"),
            id="read-timeout-equals-watch-timeout",
        ),
        pytest.param(
            ["--watch-timeout=200"],
            ("--watch-read-timeout", "--watch-timeout"),
            id="watch-timeout-over-read-timeout",
        ),
    ],
)
def test_load_relation_rejected(argv: list[str], names: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(argv, {})

    for name in names:
        assert name in str(caught.value)


def test_load_relation_names_values() -> None:
    with pytest.raises(ConfigError) as caught:
        load(["--renew-deadline=20", "--lease-duration=15"], {})

    assert "20 s" in str(caught.value)
    assert "15 s" in str(caught.value)


def test_load_relation_checks_env_values() -> None:
    with pytest.raises(ConfigError) as caught:
        load([], {"IMGCACHE_MAX_INFLIGHT": "2"})

    assert "--max-inflight-per-node (4)" in str(caught.value)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--renew-deadline=14.9"], id="renew-just-under-lease"),
        pytest.param(["--max-inflight-per-node=40"], id="per-node-equals-global"),
        pytest.param(["--registry-min-qps=20"], id="min-qps-equals-qps"),
        pytest.param(["--retry-initial=120"], id="retry-initial-equals-max"),
        pytest.param(["--watch-read-timeout=120.5"], id="read-timeout-just-over"),
    ],
)
def test_load_relation_boundary_accepted(argv: list[str]) -> None:
    load(argv, {})


def test_load_rule_repeatable() -> None:
    settings = load([f"--pull-through-rule={RULE_A}", "--pull-through-rule", RULE_B], {})

    assert settings.pull_through_rules == (parse_static_rule(RULE_A), parse_static_rule(RULE_B))


def test_load_rule_env_comma_separated() -> None:
    settings = load([], {"IMGCACHE_PULL_THROUGH_RULE": f" {RULE_A} ,{RULE_B},, {RULE_C} ,"})

    assert settings.pull_through_rules == (
        parse_static_rule(RULE_A),
        parse_static_rule(RULE_B),
        parse_static_rule(RULE_C),
    )


def test_load_rule_flags_replace_env() -> None:
    settings = load([f"--pull-through-rule={RULE_C}"], {"IMGCACHE_PULL_THROUGH_RULE": f"{RULE_A},{RULE_B}"})

    assert settings.pull_through_rules == (parse_static_rule(RULE_C),)


def test_load_rule_env_empty() -> None:
    assert load([], {"IMGCACHE_PULL_THROUGH_RULE": " , "}).pull_through_rules == ()


def test_load_rule_env_invalid_item() -> None:
    with pytest.raises(ConfigError) as caught:
        load([], {"IMGCACHE_PULL_THROUGH_RULE": f"{RULE_A},quay=quay.io@12345/us-west-2"})

    assert "IMGCACHE_PULL_THROUGH_RULE" in str(caught.value)
    assert "'12345' is not 12 digits" in str(caught.value)


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_help_default_matches_settings(flag: str) -> None:
    dest, _ = OPTIONS[flag]
    default = getattr(Settings(), dest)
    match = _DEFAULT_TEXT.search(_help(flag))

    if match is None:
        # Only the repeatable rule list has no default to document: it starts empty.
        assert dest == "pull_through_rules"
        assert default == ()
    elif match["colon"] and match["text"] == "none":
        assert default is None
    elif match["colon"]:
        assert dest in DESCRIBED_DEFAULTS
        assert default == DESCRIBED_DEFAULTS[dest]
    else:
        documented = match["text"].split(",")[0].strip()
        assert getattr(load([f"{flag}={documented}"], {}), dest) == default


# The namespace and identity defaults come from the pod's environment and have tests of their own.
@pytest.mark.parametrize("flag", sorted(set(OPTIONS) - {"--namespace", "--identity"}))
def test_load_default_matches_settings(flag: str) -> None:
    dest, _ = OPTIONS[flag]

    assert getattr(load([], {}), dest) == getattr(Settings(), dest)


def test_limits_defaults_match_settings() -> None:
    settings = Settings()

    for field in dataclasses.fields(Limits):
        assert getattr(Limits(), field.name) == getattr(settings, field.name), field.name


def test_load_namespace_fallback() -> None:
    assert load([], {}).namespace == "imgcache-system"


def test_load_namespace_from_pod_env() -> None:
    assert load([], {"POD_NAMESPACE": "platform"}).namespace == "platform"


def test_load_namespace_from_service_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("from-file\n")
    monkeypatch.setattr(config, "_SA_NAMESPACE_FILE", namespace_file)

    assert load([], {}).namespace == "from-file"


def test_load_namespace_flag_beats_pod_env() -> None:
    assert load(["--namespace=explicit"], {"POD_NAMESPACE": "platform"}).namespace == "explicit"


def test_load_invalid_pod_namespace() -> None:
    with pytest.raises(ConfigError) as caught:
        load([], {"POD_NAMESPACE": "Bad_Namespace"})

    assert "POD_NAMESPACE" in str(caught.value)


def test_load_identity_from_pod_name() -> None:
    settings = load([], {"POD_NAME": "imgcache-7d9f-abcde"})

    assert settings.identity == "imgcache-7d9f-abcde"
    assert settings.pod_name == "imgcache-7d9f-abcde"


def test_load_identity_flag_beats_pod_name() -> None:
    settings = load(["--identity=replica-1"], {"POD_NAME": "imgcache-7d9f-abcde"})

    assert settings.identity == "replica-1"
    assert settings.pod_name == "imgcache-7d9f-abcde"


def test_load_ignores_unrelated_env() -> None:
    assert load([], {"MAX_INFLIGHT": "1", "IMGCACHE_UNKNOWN": "x"}) == load([], {})
