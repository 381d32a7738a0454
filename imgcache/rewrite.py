"""Rewrite image references to an ECR pull-through cache.

Pulling through an ECR pull-through cache avoids upstream rate limits such as
Docker Hub's, and keeps pulls inside AWS. ECR serves a cached upstream image at
``<account>.dkr.ecr.<region>.amazonaws.com/<prefix>/<upstream repository>``,
so the controller rewrites each image that a rule covers before it pulls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from imgcache.reference import (
    OFFICIAL_IMAGE_NAMESPACE,
    ImageRef,
    InvalidReference,
    is_docker_hub,
    is_registry_host,
    parse,
)

# ECR's word for "no prefix" in ecrRepositoryPrefix and upstreamRepositoryPrefix.
ROOT_PREFIX = "ROOT"

STATIC_RULE_FORMAT = "PREFIX=UPSTREAM_REGISTRY[/UPSTREAM_REPOSITORY_PREFIX]@ACCOUNT/REGION"
_STATIC_RULE_EXAMPLE = "docker-hub=registry-1.docker.io@123456789012/us-west-2"

_ACCOUNT_RE = re.compile(r"[0-9]{12}")
# Region names such as us-west-2, eu-central-1, us-gov-west-1 and cn-north-1.
_REGION_RE = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}")
_REPOSITORY_PREFIX_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")


@dataclass(frozen=True)
class PullThroughRule:
    """One ECR pull-through cache rule, as DescribePullThroughCacheRules returns it.

    ``upstream_registry`` is the upstream host (``registry-1.docker.io``, ``quay.io``),
    ``prefix`` the ECR repository prefix (``docker-hub``, ``quay``), and
    ``upstream_repository_prefix`` the optional upstream path prefix the rule covers.
    """

    prefix: str
    upstream_registry: str
    account: str
    region: str
    upstream_repository_prefix: str = ""


@dataclass(frozen=True)
class Rewrite:
    """Result of rewriting one image. ``rule`` is None when the image was left unchanged."""

    original: ImageRef
    result: ImageRef
    rule: PullThroughRule | None

    @property
    def rewritten(self) -> bool:
        """Whether a rule changed the image's registry and repository."""
        return self.rule is not None


def cache_registry(rule: PullThroughRule) -> str:
    """Return the ECR registry host that serves the images cached by ``rule``."""
    suffix = "amazonaws.com.cn" if rule.region.startswith("cn-") else "amazonaws.com"
    return f"{rule.account}.dkr.ecr.{rule.region}.{suffix}"


class Rewriter:
    """Rewrites image references with a fixed set of pull-through cache rules.

    When several rules cover an image, the one with the longest upstream
    repository prefix wins, and among equally long prefixes the earliest rule.
    """

    def __init__(self, rules: Sequence[PullThroughRule]) -> None:
        self._rules = tuple(rules)
        self._cache_registries = frozenset(cache_registry(rule).lower() for rule in self._rules)

    @property
    def rules(self) -> tuple[PullThroughRule, ...]:
        """Rules in the order they were given."""
        return self._rules

    def rewrite(self, ref: ImageRef) -> Rewrite:
        """Return ``ref`` moved to the ECR cache of the rule that covers it.

        Images in one of the rules' cache registries and images that no rule
        covers are returned unchanged with ``rule`` None. Raises InvalidReference
        when the rewritten name would be invalid, for example longer than 255
        characters.
        """
        if ref.registry.lower() in self._cache_registries:
            return Rewrite(original=ref, result=ref, rule=None)

        rule = self._select_rule(ref)
        if rule is None:
            return Rewrite(original=ref, result=ref, rule=None)
        return Rewrite(original=ref, result=_apply_rule(rule, ref), rule=rule)

    def _select_rule(self, ref: ImageRef) -> PullThroughRule | None:
        repository = _upstream_repository(ref)
        candidates = [rule for rule in self._rules if _same_upstream(rule, ref.registry) and _covers(rule, repository)]
        if not candidates:
            return None
        return max(candidates, key=lambda rule: len(_upstream_prefix(rule)))


def parse_static_rule(text: str) -> PullThroughRule:
    """Parse a rule given on the command line in the form STATIC_RULE_FORMAT.

    An example is ``docker-hub=registry-1.docker.io@123456789012/us-west-2``.
    Raises ValueError naming the text and the expected format when a part is
    missing or invalid.
    """
    prefix, equals, rest = text.partition("=")
    upstream, at, location = rest.rpartition("@")
    account, slash, region = location.partition("/")
    if not equals:
        _reject_rule(text, "the '=' after the ECR repository prefix is missing")
    if not at:
        _reject_rule(text, "the '@' before the AWS account ID is missing")
    if not slash:
        _reject_rule(text, "the '/' between the AWS account ID and the Region is missing")

    registry, has_upstream_prefix, upstream_repository_prefix = upstream.partition("/")
    if prefix != ROOT_PREFIX and not _REPOSITORY_PREFIX_RE.fullmatch(prefix):
        _reject_rule(text, f"the ECR repository prefix {prefix!r} is invalid")
    if not is_registry_host(registry):
        _reject_rule(text, f"the upstream registry {registry!r} is not a host name")
    if has_upstream_prefix:
        _check_upstream_prefix(text, prefix, upstream_repository_prefix)
    if not _ACCOUNT_RE.fullmatch(account):
        _reject_rule(text, f"the AWS account ID {account!r} is not 12 digits")
    if not _REGION_RE.fullmatch(region):
        _reject_rule(text, f"the AWS Region {region!r} is not a Region name such as 'us-west-2'")

    return PullThroughRule(
        prefix=prefix,
        upstream_registry=registry,
        account=account,
        region=region,
        upstream_repository_prefix=upstream_repository_prefix,
    )


def _check_upstream_prefix(text: str, prefix: str, upstream_prefix: str) -> None:
    if not _REPOSITORY_PREFIX_RE.fullmatch(upstream_prefix):
        _reject_rule(text, f"the upstream repository prefix {upstream_prefix!r} is invalid")
    # ECR accepts an upstream repository prefix only with a non-ROOT ECR prefix.
    if prefix == ROOT_PREFIX:
        _reject_rule(text, "an upstream repository prefix needs an ECR prefix other than ROOT")


def _reject_rule(text: str, problem: str) -> NoReturn:
    raise ValueError(
        f"invalid pull-through cache rule {text!r}: {problem}. "
        f"Write {STATIC_RULE_FORMAT}, as in {_STATIC_RULE_EXAMPLE!r}"
    )


def _upstream_repository(ref: ImageRef) -> str:
    # "registry-1.docker.io/nginx" keeps its one-component path after parsing,
    # but Docker Hub and ECR's cache both name the repository "library/nginx".
    if ref.on_docker_hub and "/" not in ref.repository:
        return f"{OFFICIAL_IMAGE_NAMESPACE}/{ref.repository}"
    return ref.repository


def _same_upstream(rule: PullThroughRule, registry: str) -> bool:
    upstream = rule.upstream_registry.lower()
    if is_docker_hub(upstream):
        return is_docker_hub(registry)
    return upstream == registry.lower()


def _upstream_prefix(rule: PullThroughRule) -> str:
    prefix = rule.upstream_repository_prefix.strip("/")
    return "" if prefix == ROOT_PREFIX else prefix


def _covers(rule: PullThroughRule, repository: str) -> bool:
    # ECR treats every prefix as ending in "/", so "team" covers "team/app"
    # but neither "team" itself nor "teammate/app".
    prefix = _upstream_prefix(rule)
    return not prefix or repository.startswith(f"{prefix}/")


def _apply_rule(rule: PullThroughRule, ref: ImageRef) -> ImageRef:
    # NOTE: ECR documents upstream repository prefixes for ECR-to-ECR rules.
    # This module applies them to any upstream: the upstream prefix is removed
    # and the ECR prefix put in its place, so the rule (prefix "my-app",
    # upstream prefix "upstream-app") maps "upstream-app/image1" to "my-app/image1".
    upstream_prefix = _upstream_prefix(rule)
    repository = _upstream_repository(ref)
    if upstream_prefix:
        repository = repository[len(upstream_prefix) + 1 :]

    # An empty prefix also means ROOT, which is how imgcache.aws stores ROOT.
    ecr_prefix = rule.prefix.strip("/")
    if ecr_prefix not in ("", ROOT_PREFIX):
        repository = f"{ecr_prefix}/{repository}"

    candidate = ImageRef(registry=cache_registry(rule), repository=repository, tag=ref.tag, digest=ref.digest)
    try:
        return parse(str(candidate))
    except InvalidReference as error:
        raise InvalidReference(
            str(ref),
            f"rewriting it with the pull-through cache rule for prefix {rule.prefix!r} "
            f"gives an invalid reference because {error.problem}",
            error.fix,
        ) from error
