"""PullThroughRefresher: rules reach the catalogue, quotas cap the scheduler, throttles count."""

from __future__ import annotations

import anyio
import pytest

from imgcache.catalogue import Catalogue
from imgcache.config import load
from imgcache.metrics import Metrics
from imgcache.pullthrough import QUOTA_SHARE, PullThroughRefresher
from imgcache.rewrite import PullThroughRule
from imgcache.scheduler import Limits, Scheduler

ECR = "111122223333.dkr.ecr.us-west-2.amazonaws.com"
QUAY = PullThroughRule(prefix="quay", upstream_registry="quay.io", account="111122223333", region="us-west-2")


def refresher() -> tuple[PullThroughRefresher, Catalogue, Scheduler, Metrics]:
    catalogue = Catalogue()
    catalogue.replace(
        [
            {
                "metadata": {"namespace": "team", "name": "c", "generation": 1},
                "spec": {"images": [{"image": "quay.io/cilium/cilium:v1.16.4"}]},
            }
        ]
    )
    scheduler = Scheduler(catalogue, Limits(registry_qps=50.0), clock=lambda: 0.0)
    metrics = Metrics()
    return PullThroughRefresher(load([], {}), catalogue, scheduler, metrics), catalogue, scheduler, metrics


def resolved(catalogue: Catalogue) -> list[str]:
    return [str(image.resolved) for image in catalogue.images.values()]


def test_new_rules_rewrite_catalogue() -> None:
    subject, catalogue, _, _ = refresher()
    subject._apply([QUAY])
    assert resolved(catalogue) == [f"{ECR}/quay/cilium/cilium:v1.16.4"]
    assert subject.refreshes == 1


def test_unchanged_rules_keep_catalogue_version() -> None:
    subject, catalogue, _, _ = refresher()
    subject._apply([QUAY])
    version = catalogue.version
    subject._apply([QUAY])
    assert catalogue.version == version
    assert subject.refreshes == 2


def test_removed_rules_restore_originals() -> None:
    subject, catalogue, _, _ = refresher()
    subject._apply([QUAY])
    subject._apply([])
    assert resolved(catalogue) == ["quay.io/cilium/cilium:v1.16.4"]


def test_throttle_counted_with_aws_source() -> None:
    subject, _, _, metrics = refresher()
    subject._throttled("DescribePullThroughCacheRules")
    value = metrics.registry.get_sample_value(
        "imgcache_registry_throttled_total", {"registry": "ecr", "source": "aws_api"}
    )
    assert value == 1.0


class QuotaSource:
    """Returns fixed ECR rate quotas from ecr_rate_quotas, as AwsClient does."""

    def __init__(self, quotas: dict[str, float]) -> None:
        self.quotas = quotas

    async def ecr_rate_quotas(self) -> dict[str, float]:
        return self.quotas


@pytest.mark.anyio
async def test_quota_caps_registry_rate() -> None:
    subject, _, scheduler, metrics = refresher()
    subject.rules = [QUAY]
    subject._registry = ECR
    existing = scheduler.bucket(ECR)
    await subject._apply_quotas(QuotaSource({"BatchGetImage": 40.0, "GetDownloadUrlForLayer": 3000.0}))  # type: ignore[arg-type]
    assert existing.max_rate == 40.0 * QUOTA_SHARE
    assert scheduler.bucket("unrelated.example.test").max_rate == 50.0
    assert metrics.registry.get_sample_value("imgcache_ecr_rate_quota", {"api": "BatchGetImage"}) == 40.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CountingAws:
    """Returns a fixed identity, quotas and rules as AwsClient does, and counts each read."""

    def __init__(self) -> None:
        self.rule_reads = 0
        self.quota_reads = 0

    async def identity(self) -> tuple[str, str]:
        return "111122223333", "us-west-2"

    async def ecr_rate_quotas(self) -> dict[str, float]:
        self.quota_reads += 1
        return {"BatchGetImage": 40.0}

    async def pull_through_rules(self) -> list[PullThroughRule]:
        self.rule_reads += 1
        return [QUAY]


async def run_loop(flags: list[str], seconds: float) -> CountingAws:
    catalogue = Catalogue()
    scheduler = Scheduler(catalogue, Limits(registry_qps=50.0), clock=lambda: 0.0)
    subject = PullThroughRefresher(load(flags, {}), catalogue, scheduler, Metrics())
    aws = CountingAws()
    with anyio.move_on_after(seconds):
        await subject._loop(aws)  # type: ignore[arg-type]
    return aws


@pytest.mark.anyio
async def test_refresh_interval_sets_rule_reads() -> None:
    often = await run_loop(["--pull-through-refresh=0.05"], 0.5)
    rarely = await run_loop(["--pull-through-refresh=600"], 0.5)

    assert often.rule_reads >= 5
    assert rarely.rule_reads == 1


@pytest.mark.anyio
async def test_quota_awareness_reads_quotas() -> None:
    aware = await run_loop(["--ecr-quota-awareness"], 0.1)
    unaware = await run_loop(["--ecr-quota-awareness=false"], 0.1)

    assert aware.quota_reads == 1
    assert unaware.quota_reads == 0


def test_aws_flags_reach_client_settings() -> None:
    settings = load(
        ["--aws-region=eu-west-1", "--aws-account=111122223333", "--aws-endpoint-url=http://127.0.0.1:5000"], {}
    )
    catalogue = Catalogue()
    subject = PullThroughRefresher(settings, catalogue, Scheduler(catalogue, Limits(), clock=lambda: 0.0), Metrics())
    aws = subject.aws_settings()
    assert (aws.region, aws.account, aws.endpoint_url) == ("eu-west-1", "111122223333", "http://127.0.0.1:5000")
