"""Keeps the catalogue's pull-through cache rules current.

With static rules from flags nothing is read from AWS. Otherwise the rules come from ECR
DescribePullThroughCacheRules, read at start, every refresh interval and on demand.
Outside AWS (no region configured) the feature stays off and logs that once.
"""

from __future__ import annotations

import anyio
import structlog

from imgcache.aws import AwsClient, AwsConfigurationError, AwsError, AwsSettings, refresh_rules_once
from imgcache.catalogue import Catalogue
from imgcache.config import Settings
from imgcache.metrics import Metrics
from imgcache.rewrite import PullThroughRule, Rewriter, cache_registry
from imgcache.scheduler import Scheduler

log = structlog.get_logger(__name__)

# ECR's BatchGetImage quota is shared by every client in the account and region, so
# imgcache keeps its own pull starts to this share of it.
QUOTA_SHARE = 0.5


class PullThroughRefresher:
    """Reads pull-through cache rules into the catalogue; see the module docstring."""

    def __init__(self, settings: Settings, catalogue: Catalogue, scheduler: Scheduler, metrics: Metrics) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.scheduler = scheduler
        self.metrics = metrics
        self.rules: list[PullThroughRule] = list(settings.pull_through_rules)
        self.refreshes = 0
        self._requested = anyio.Event()
        self._registry = "ecr"

    def aws_settings(self) -> AwsSettings:
        return AwsSettings(
            region=self.settings.aws_region,
            account=self.settings.aws_account,
            endpoint_url=self.settings.aws_endpoint_url,
        )

    def request_refresh(self) -> None:
        self._requested.set()

    def _throttled(self, operation: str) -> None:
        self.metrics.registry_throttled.labels(registry=self._registry, source="aws_api").inc()
        log.debug("aws.throttled", operation=operation)

    def _apply(self, rules: list[PullThroughRule]) -> None:
        self.refreshes += 1
        if rules == self.rules:
            return
        self.rules = rules
        log.info("pullthrough.rules_changed", rules=[f"{r.prefix}={r.upstream_registry}" for r in rules])
        self.catalogue.set_rewriter(Rewriter(rules))

    async def run(self) -> None:
        """Refresh rules until cancelled; return to sleep forever when the feature is off."""
        if not self.settings.pull_through_cache:
            log.info("pullthrough.off", reason="--pull-through-cache=false")
            await anyio.sleep_forever()
        if self.settings.pull_through_rules:
            log.info("pullthrough.static_rules", rules=len(self.settings.pull_through_rules))
            await anyio.sleep_forever()
        try:
            async with AwsClient(self.aws_settings(), on_throttle=self._throttled) as aws:
                await self._loop(aws)
        except AwsConfigurationError as error:
            log.info("pullthrough.off", reason=str(error))
            await anyio.sleep_forever()

    async def _loop(self, aws: AwsClient) -> None:
        try:
            account, region = await aws.identity()
            self._registry = f"{account}.dkr.ecr.{region}.amazonaws.com"
        except AwsError as error:
            log.warning("pullthrough.identity_failed", error=str(error))
        if self.settings.ecr_quota_awareness:
            await self._apply_quotas(aws)
        while True:
            await refresh_rules_once(aws, self._apply)
            self._requested = anyio.Event()
            with anyio.move_on_after(self.settings.pull_through_refresh):
                await self._requested.wait()

    async def _apply_quotas(self, aws: AwsClient) -> None:
        try:
            quotas = await aws.ecr_rate_quotas()
        except AwsError as error:
            log.warning("pullthrough.quotas_failed", error=str(error), hint="the per-registry rate stays as configured")
            return
        for api, value in quotas.items():
            self.metrics.ecr_quota.labels(api=api).set(value)
        batch = quotas.get("BatchGetImage")
        if batch is None:
            return
        cap = batch * QUOTA_SHARE
        registries = {self._registry} | {cache_registry(rule) for rule in self.rules}
        for registry in registries:
            self.scheduler.quota_caps[registry] = cap
            if registry in self.scheduler.buckets:
                self.scheduler.buckets[registry].cap(cap)
        log.info("pullthrough.quota_cap", pulls_per_second=cap, registries=sorted(registries))
