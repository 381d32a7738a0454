"""Table tests for rewriting images to an ECR pull-through cache."""

from __future__ import annotations

import pytest

from imgcache.reference import InvalidReference, parse
from imgcache.rewrite import (
    STATIC_RULE_FORMAT,
    PullThroughRule,
    Rewriter,
    cache_registry,
    parse_static_rule,
)

ACCOUNT = "123456789012"
REGION = "us-west-2"
CACHE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
OTHER_ECR = "210987654321.dkr.ecr.eu-west-1.amazonaws.com"
SHA256 = "sha256:" + "0123456789abcdef" * 4


def rule(prefix: str, upstream: str, upstream_prefix: str = "") -> PullThroughRule:
    return PullThroughRule(
        prefix=prefix,
        upstream_registry=upstream,
        account=ACCOUNT,
        region=REGION,
        upstream_repository_prefix=upstream_prefix,
    )


RULES = [
    rule("docker-hub", "registry-1.docker.io"),
    rule("ecr-public", "public.ecr.aws"),
    rule("k8s", "registry.k8s.io"),
    rule("quay", "quay.io"),
    rule("team", "quay.io", "team-a"),
    rule("team-deep", "quay.io", "team-a/sub"),
    rule("github", "ghcr.io"),
    rule("azure", "myregistry.azurecr.io"),
    rule("gitlab", "registry.gitlab.com"),
    rule("chainguard", "cgr.dev"),
    rule("other-ecr", OTHER_ECR),
]
REWRITER = Rewriter(RULES)

# (input, expected result, expected rule prefix or None for pass-through)
REWRITES = [
    pytest.param("nginx", f"{CACHE}/docker-hub/library/nginx:latest", "docker-hub", id="bare"),
    pytest.param(
        "nginx:1.27", f"{CACHE}/docker-hub/library/nginx:1.27", "docker-hub", id="bare-tag"
    ),
    pytest.param(
        "library/nginx:1.27", f"{CACHE}/docker-hub/library/nginx:1.27", "docker-hub", id="library"
    ),
    pytest.param(
        "bitnami/redis:7.2", f"{CACHE}/docker-hub/bitnami/redis:7.2", "docker-hub", id="namespace"
    ),
    pytest.param(
        "docker.io/nginx:1.27",
        f"{CACHE}/docker-hub/library/nginx:1.27",
        "docker-hub",
        id="docker-io",
    ),
    pytest.param(
        "index.docker.io/library/nginx:1.27",
        f"{CACHE}/docker-hub/library/nginx:1.27",
        "docker-hub",
        id="index-docker-io",
    ),
    pytest.param(
        "registry-1.docker.io/nginx:1.27",
        f"{CACHE}/docker-hub/library/nginx:1.27",
        "docker-hub",
        id="registry-1-bare",
    ),
    pytest.param(
        "registry-1.docker.io/bitnami/redis:7.2",
        f"{CACHE}/docker-hub/bitnami/redis:7.2",
        "docker-hub",
        id="registry-1-namespace",
    ),
    pytest.param(
        f"nginx@{SHA256}", f"{CACHE}/docker-hub/library/nginx@{SHA256}", "docker-hub", id="digest"
    ),
    pytest.param(
        f"nginx:1.27@{SHA256}",
        f"{CACHE}/docker-hub/library/nginx:1.27@{SHA256}",
        "docker-hub",
        id="tag-and-digest",
    ),
    pytest.param(
        "public.ecr.aws/nginx/nginx:1.27",
        f"{CACHE}/ecr-public/nginx/nginx:1.27",
        "ecr-public",
        id="ecr-public",
    ),
    pytest.param(
        "registry.k8s.io/pause:3.10", f"{CACHE}/k8s/pause:3.10", "k8s", id="registry-k8s-io"
    ),
    pytest.param(
        f"registry.k8s.io/ingress-nginx/controller:v1.11.2@{SHA256}",
        f"{CACHE}/k8s/ingress-nginx/controller:v1.11.2@{SHA256}",
        "k8s",
        id="registry-k8s-io-tag-and-digest",
    ),
    pytest.param(
        "quay.io/prometheus/node-exporter:v1.8.2",
        f"{CACHE}/quay/prometheus/node-exporter:v1.8.2",
        "quay",
        id="quay",
    ),
    pytest.param(
        "QUAY.IO/prometheus/node-exporter:v1.8.2",
        f"{CACHE}/quay/prometheus/node-exporter:v1.8.2",
        "quay",
        id="quay-host-case",
    ),
    pytest.param(
        "quay.io/team-a/app:1", f"{CACHE}/team/app:1", "team", id="upstream-prefix-replaced"
    ),
    pytest.param(
        "quay.io/team-a/sub/app:1",
        f"{CACHE}/team-deep/app:1",
        "team-deep",
        id="longest-upstream-prefix",
    ),
    pytest.param(
        "quay.io/team-ab/app:1", f"{CACHE}/quay/team-ab/app:1", "quay", id="prefix-component-bound"
    ),
    pytest.param("quay.io/team-a:1", f"{CACHE}/quay/team-a:1", "quay", id="prefix-equals-repo"),
    pytest.param("ghcr.io/org/app:v1", f"{CACHE}/github/org/app:v1", "github", id="ghcr"),
    pytest.param(
        "myregistry.azurecr.io/samples/hello:1",
        f"{CACHE}/azure/samples/hello:1",
        "azure",
        id="azure",
    ),
    pytest.param(
        "registry.gitlab.com/group/project/image:1",
        f"{CACHE}/gitlab/group/project/image:1",
        "gitlab",
        id="gitlab",
    ),
    pytest.param(
        "cgr.dev/chainguard/static:latest",
        f"{CACHE}/chainguard/chainguard/static:latest",
        "chainguard",
        id="chainguard",
    ),
    pytest.param(f"{OTHER_ECR}/app:v1", f"{CACHE}/other-ecr/app:v1", "other-ecr", id="other-ecr"),
    pytest.param(
        f"{CACHE}/docker-hub/library/nginx:1.27",
        f"{CACHE}/docker-hub/library/nginx:1.27",
        None,
        id="already-in-cache",
    ),
    pytest.param(f"{CACHE}/team/app:1", f"{CACHE}/team/app:1", None, id="own-ecr-repository"),
    pytest.param("localhost/app", "localhost/app:latest", None, id="localhost"),
    pytest.param("localhost:5000/app:dev", "localhost:5000/app:dev", None, id="localhost-port"),
    pytest.param("10.0.0.5:5000/app:1", "10.0.0.5:5000/app:1", None, id="host-port"),
    pytest.param(
        "quay.io:443/prometheus/x:1", "quay.io:443/prometheus/x:1", None, id="port-differs"
    ),
    pytest.param(
        "mcr.microsoft.com/dotnet/runtime:8.0",
        "mcr.microsoft.com/dotnet/runtime:8.0",
        None,
        id="no-rule",
    ),
]


@pytest.mark.parametrize(("text", "expected", "prefix"), REWRITES)
def test_rewrite_result(text: str, expected: str, prefix: str | None) -> None:
    assert str(REWRITER.rewrite(parse(text)).result) == expected


@pytest.mark.parametrize(("text", "expected", "prefix"), REWRITES)
def test_rewrite_rule(text: str, expected: str, prefix: str | None) -> None:
    rewrite = REWRITER.rewrite(parse(text))

    assert (None if rewrite.rule is None else rewrite.rule.prefix) == prefix
    assert rewrite.rewritten is (prefix is not None)


@pytest.mark.parametrize(("text", "expected", "prefix"), REWRITES)
def test_rewrite_keeps_original(text: str, expected: str, prefix: str | None) -> None:
    ref = parse(text)

    assert REWRITER.rewrite(ref).original is ref


@pytest.mark.parametrize(("text", "expected", "prefix"), REWRITES)
def test_rewrite_keeps_tag_and_digest(text: str, expected: str, prefix: str | None) -> None:
    ref = parse(text)
    result = REWRITER.rewrite(ref).result

    assert result.tag == ref.tag
    assert result.digest == ref.digest


@pytest.mark.parametrize(
    "upstream",
    [
        pytest.param("docker.io", id="docker-io"),
        pytest.param("index.docker.io", id="index"),
        pytest.param("registry-1.docker.io", id="registry-1"),
    ],
)
@pytest.mark.parametrize(
    "text",
    [
        pytest.param("nginx:1.27", id="bare"),
        pytest.param("index.docker.io/nginx:1.27", id="index-image"),
        pytest.param("registry-1.docker.io/library/nginx:1.27", id="registry-1-image"),
    ],
)
def test_rewrite_docker_hub_aliases(upstream: str, text: str) -> None:
    rewriter = Rewriter([rule("docker-hub", upstream)])

    assert str(rewriter.rewrite(parse(text)).result) == f"{CACHE}/docker-hub/library/nginx:1.27"


def test_rewrite_without_rules_passes_through() -> None:
    ref = parse("nginx:1.27")

    assert Rewriter([]).rewrite(ref).result is ref


def test_rewrite_skips_own_cache_as_upstream() -> None:
    rewriter = Rewriter([rule("self", CACHE)])
    ref = parse(f"{CACHE}/app:v1")

    assert rewriter.rewrite(ref).result is ref


def test_rewrite_skips_cache_of_other_rule() -> None:
    into_cache = rule("other-ecr", OTHER_ECR)
    into_other = PullThroughRule("back", CACHE, "210987654321", "eu-west-1")
    ref = parse(f"{CACHE}/app:v1")

    assert Rewriter([into_cache, into_other]).rewrite(ref).rule is None


def test_rewrite_root_ecr_prefix() -> None:
    rewriter = Rewriter([rule("ROOT", "ghcr.io")])

    assert str(rewriter.rewrite(parse("ghcr.io/org/app:v1")).result) == f"{CACHE}/org/app:v1"


def test_rewrite_empty_ecr_prefix_is_root() -> None:
    rewriter = Rewriter([rule("", "ghcr.io")])

    assert str(rewriter.rewrite(parse("ghcr.io/org/app:v1")).result) == f"{CACHE}/org/app:v1"


def test_rewrite_root_upstream_prefix() -> None:
    rewriter = Rewriter([rule("quay", "quay.io", "ROOT")])

    assert str(rewriter.rewrite(parse("quay.io/a/b:1")).result) == f"{CACHE}/quay/a/b:1"


def test_rewrite_equal_rules_first_wins() -> None:
    rewriter = Rewriter([rule("first", "quay.io"), rule("second", "quay.io")])
    rewrite = rewriter.rewrite(parse("quay.io/a/b:1"))

    assert rewrite.rule is not None
    assert rewrite.rule.prefix == "first"


def test_rewrite_specific_rule_beats_order() -> None:
    rewriter = Rewriter([rule("team", "quay.io", "team-a"), rule("quay", "quay.io")])

    assert str(rewriter.rewrite(parse("quay.io/team-a/x:1")).result) == f"{CACHE}/team/x:1"


def test_rewrite_china_region_host() -> None:
    china = PullThroughRule("quay", "quay.io", ACCOUNT, "cn-north-1")
    result = Rewriter([china]).rewrite(parse("quay.io/a/b:1")).result

    assert result.registry == f"{ACCOUNT}.dkr.ecr.cn-north-1.amazonaws.com.cn"


def test_cache_registry_host() -> None:
    assert cache_registry(rule("quay", "quay.io")) == CACHE


def test_rewrite_too_long_rejected() -> None:
    ref = parse("quay.io/" + "a" * 240 + ":1")

    with pytest.raises(InvalidReference, match="pull-through cache rule for prefix 'quay'"):
        REWRITER.rewrite(ref)


INVALID_INPUT = [
    pytest.param("Nginx:1.27", "must be lowercase. Write 'nginx:1.27'", id="uppercase-bare"),
    pytest.param("quay.io/Team/app", "must be lowercase", id="uppercase-path"),
    pytest.param("nginx:", "the tag after ':' is empty", id="empty-tag"),
    pytest.param("nginx@sha256:abc", "the digest", id="short-digest"),
    pytest.param("https://quay.io/a", "no URL scheme", id="scheme"),
    pytest.param("", "empty", id="empty"),
]


@pytest.mark.parametrize(("text", "expected"), INVALID_INPUT)
def test_rewrite_input_rejected_by_parse(text: str, expected: str) -> None:
    with pytest.raises(InvalidReference, match=expected):
        REWRITER.rewrite(parse(text))


STATIC_RULES = [
    pytest.param(
        "docker-hub=registry-1.docker.io@123456789012/us-west-2",
        PullThroughRule("docker-hub", "registry-1.docker.io", "123456789012", "us-west-2"),
        id="docker-hub",
    ),
    pytest.param(
        "team=quay.io/team-a@123456789012/eu-central-1",
        PullThroughRule("team", "quay.io", "123456789012", "eu-central-1", "team-a"),
        id="upstream-prefix",
    ),
    pytest.param(
        "team/deep=quay.io/team-a/sub@123456789012/ap-southeast-2",
        PullThroughRule("team/deep", "quay.io", "123456789012", "ap-southeast-2", "team-a/sub"),
        id="nested-prefixes",
    ),
    pytest.param(
        "ROOT=ghcr.io@123456789012/us-gov-west-1",
        PullThroughRule("ROOT", "ghcr.io", "123456789012", "us-gov-west-1"),
        id="root-prefix",
    ),
    pytest.param(
        f"other-ecr={OTHER_ECR}@123456789012/cn-north-1",
        PullThroughRule("other-ecr", OTHER_ECR, "123456789012", "cn-north-1"),
        id="ecr-upstream",
    ),
    pytest.param(
        "local=localhost:5000@123456789012/us-east-1",
        PullThroughRule("local", "localhost:5000", "123456789012", "us-east-1"),
        id="host-port",
    ),
]


@pytest.mark.parametrize(("text", "expected"), STATIC_RULES)
def test_parse_static_rule(text: str, expected: PullThroughRule) -> None:
    assert parse_static_rule(text) == expected


BAD_STATIC_RULES = [
    pytest.param("", "'=' after the ECR repository prefix is missing", id="empty"),
    pytest.param("docker-hub", "'=' after the ECR repository prefix is missing", id="prefix-only"),
    pytest.param(
        "docker-hub=registry-1.docker.io", "'@' before the AWS account ID is missing", id="no-at"
    ),
    pytest.param(
        "docker-hub=registry-1.docker.io@123456789012",
        "'/' between the AWS account ID and the Region is missing",
        id="no-region",
    ),
    pytest.param(
        "docker-hub=registry-1.docker.io@1234/us-west-2",
        "account ID '1234' is not 12 digits",
        id="short-account",
    ),
    pytest.param(
        "docker-hub=registry-1.docker.io@12345678901a/us-west-2",
        "account ID '12345678901a' is not 12 digits",
        id="account-letter",
    ),
    pytest.param(
        "docker-hub=registry-1.docker.io@123456789012/us_west_2",
        "Region 'us_west_2'",
        id="region-underscores",
    ),
    pytest.param(
        "docker-hub=registry-1.docker.io@123456789012/US-WEST-2",
        "Region 'US-WEST-2'",
        id="region-uppercase",
    ),
    pytest.param(
        "docker-hub=registry-1.docker.io@123456789012/us-west",
        "Region 'us-west'",
        id="region-no-number",
    ),
    pytest.param(
        "Docker=registry-1.docker.io@123456789012/us-west-2",
        "ECR repository prefix 'Docker' is invalid",
        id="prefix-uppercase",
    ),
    pytest.param(
        "=registry-1.docker.io@123456789012/us-west-2",
        "ECR repository prefix '' is invalid",
        id="prefix-empty",
    ),
    pytest.param(
        "docker-hub=@123456789012/us-west-2",
        "upstream registry '' is not a host name",
        id="upstream-empty",
    ),
    pytest.param(
        "docker-hub=https://registry-1.docker.io@123456789012/us-west-2",
        "upstream registry 'https:' is not a host name",
        id="upstream-scheme",
    ),
    pytest.param(
        "team=quay.io/@123456789012/us-west-2",
        "upstream repository prefix '' is invalid",
        id="upstream-prefix-empty",
    ),
    pytest.param(
        "team=quay.io/Team-A@123456789012/us-west-2",
        "upstream repository prefix 'Team-A' is invalid",
        id="upstream-prefix-uppercase",
    ),
    pytest.param(
        "ROOT=quay.io/team-a@123456789012/us-west-2",
        "needs an ECR prefix other than ROOT",
        id="root-with-upstream-prefix",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_STATIC_RULES)
def test_parse_static_rule_invalid(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_static_rule(text)

    assert expected in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), BAD_STATIC_RULES)
def test_parse_static_rule_invalid_shows_format(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_static_rule(text)

    assert f"invalid pull-through cache rule {text!r}" in str(caught.value)
    assert STATIC_RULE_FORMAT in str(caught.value)
