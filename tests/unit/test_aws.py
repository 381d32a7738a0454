"""Tests for imgcache.aws against moto, botocore's Stubber and a local throttling endpoint.

moto 5.2 serves STS, ECR repositories and Service Quotas (without ECR quota values), so those
calls go over HTTP to a moto server on 127.0.0.1. moto does not implement
DescribePullThroughCacheRules, so those responses come from aiobotocore's Stubber, which
validates requests and responses against the ECR service model. Throttling is served by a
small aiohttp endpoint on 127.0.0.1, because retries only happen on real HTTP responses.
Every client in these tests has an endpoint URL on 127.0.0.1, and instance metadata is
disabled, so no request can reach AWS.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp.web
import anyio
import pytest
from aiobotocore.stub import AioStubber
from moto.server import ThreadedMotoServer
from structlog.testing import capture_logs

from imgcache.aws import (
    ACTIONS,
    DEFAULT_ECR_RATE_QUOTAS,
    AwsApiError,
    AwsClient,
    AwsConfigurationError,
    AwsCredentialsError,
    AwsPermissionError,
    AwsSettings,
    AwsThrottledError,
    AwsUnavailableError,
    refresh_rules_forever,
    refresh_rules_once,
)
from imgcache.rewrite import PullThroughRule

ACCOUNT = "123456789012"
OTHER_ACCOUNT = "210987654321"
REGION = "eu-west-1"
POLICY_PATH = Path(__file__).resolve().parents[2] / "manifests" / "aws" / "iam-policy.json"

_AWS_VARIABLES_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_ECR",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL_SERVICE_QUOTAS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "MOTO_ACCOUNT_ID",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """Run one moto server on 127.0.0.1 for this module and yield its URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Give botocore fake credentials and hide every other credential and region source."""
    for name in _AWS_VARIABLES_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-aws-credentials"))


def settings_for(endpoint_url: str, **overrides: Any) -> AwsSettings:
    values: dict[str, Any] = {"region": REGION, "endpoint_url": endpoint_url}
    values.update(overrides)
    return AwsSettings(**values)


def rule_entry(prefix: str, upstream_url: str, **extra: str) -> dict[str, str]:
    entry = {"ecrRepositoryPrefix": prefix, "upstreamRegistryUrl": upstream_url}
    entry.update(extra)
    return entry


def free_local_port() -> int:
    """Return a port on 127.0.0.1 that had no listener when checked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class ThrottlingEndpoint:
    """An ECR JSON endpoint on 127.0.0.1 that throttles the first ``throttled_requests``."""

    def __init__(self, throttled_requests: int, rules: list[dict[str, str]]) -> None:
        self.throttled_requests = throttled_requests
        self.rules = rules
        self.request_count = 0

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        await request.read()
        self.request_count += 1
        if self.request_count <= self.throttled_requests:
            body = {"__type": "ThrottlingException", "message": "Rate exceeded"}
            return aiohttp.web.json_response(
                body, status=400, content_type="application/x-amz-json-1.1"
            )
        body_ok = {"pullThroughCacheRules": self.rules}
        return aiohttp.web.json_response(body_ok, content_type="application/x-amz-json-1.1")


@asynccontextmanager
async def serve_locally(handler: ThrottlingEndpoint) -> AsyncIterator[str]:
    app = aiohttp.web.Application()
    app.router.add_post("/", handler.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


# --- identity and region ------------------------------------------------------------------


@pytest.mark.anyio
async def test_identity_from_sts_and_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTO_ACCOUNT_ID", "111122223333")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    settings = AwsSettings(endpoint_url=moto_server)

    async with AwsClient(settings) as aws:
        account, region = await aws.identity()

    assert account == "111122223333"
    assert region == "eu-central-1"


@pytest.mark.anyio
async def test_identity_asks_sts_once(moto_server: str) -> None:
    async with AwsClient(settings_for(moto_server)) as aws:
        first = await aws.identity()
        with AioStubber(aws.sts_client) as stubber:
            second = await aws.identity()
            stubber.assert_no_pending_responses()

    assert first == (ACCOUNT, REGION)
    assert second == first


@pytest.mark.anyio
async def test_configured_account_skips_sts(moto_server: str) -> None:
    settings = settings_for(moto_server, account=OTHER_ACCOUNT)

    async with AwsClient(settings) as aws:
        # An active Stubber with an empty queue raises on any STS call.
        with AioStubber(aws.sts_client):
            identity = await aws.identity()

    assert identity == (OTHER_ACCOUNT, REGION)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("environment", "configured", "expected"),
    [
        ({"AWS_REGION": "us-east-2", "AWS_DEFAULT_REGION": "us-west-1"}, None, "us-east-2"),
        ({"AWS_DEFAULT_REGION": "us-west-1"}, None, "us-west-1"),
        ({"AWS_REGION": "us-east-2"}, "ap-south-1", "ap-south-1"),
    ],
)
async def test_region_resolution_order(
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    configured: str | None,
    expected: str,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = AwsSettings(region=configured, endpoint_url=moto_server)

    async with AwsClient(settings) as aws:
        _, region = await aws.identity()

    assert region == expected


@pytest.mark.anyio
async def test_missing_region_names_fix(moto_server: str) -> None:
    with pytest.raises(AwsConfigurationError, match="AWS_REGION"):
        async with AwsClient(AwsSettings(endpoint_url=moto_server)):
            pass


@pytest.mark.anyio
async def test_invalid_region_rejected(moto_server: str) -> None:
    settings = settings_for(moto_server, region="not a region!")

    with pytest.raises(AwsConfigurationError, match="invalid AWS region"):
        async with AwsClient(settings):
            pass


@pytest.mark.anyio
async def test_missing_credentials_names_fix(
    moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)

    async with AwsClient(settings_for(moto_server)) as aws:
        with pytest.raises(AwsCredentialsError) as raised:
            await aws.identity()

    message = str(raised.value)
    assert "no AWS credentials found" in message
    assert "IRSA" in message
    assert "Pod Identity" in message


@pytest.mark.anyio
async def test_rejected_credentials_typed(moto_server: str) -> None:
    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.sts_client) as stubber:
            stubber.add_client_error(
                "get_caller_identity",
                service_error_code="InvalidClientTokenId",
                service_message="The security token included in the request is invalid.",
                http_status_code=403,
            )
            with pytest.raises(AwsCredentialsError, match="InvalidClientTokenId"):
                await aws.identity()


@pytest.mark.anyio
async def test_unreachable_endpoint_typed() -> None:
    settings = settings_for(f"http://127.0.0.1:{free_local_port()}", max_attempts=1)

    async with AwsClient(settings) as aws:
        with pytest.raises(AwsUnavailableError) as raised:
            await aws.identity()

    assert raised.value.operation == "GetCallerIdentity"
    assert REGION in str(raised.value)
    assert "AWS_REGION" in str(raised.value)


# --- ECR --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ecr_client_uses_endpoint(moto_server: str) -> None:
    async with AwsClient(settings_for(moto_server)) as aws:
        await aws.ecr_client.create_repository(repositoryName="imgcache-wiring/app")
        response = await aws.ecr_client.describe_repositories(
            repositoryNames=["imgcache-wiring/app"]
        )

    repository = response["repositories"][0]
    assert repository["registryId"] == ACCOUNT
    assert repository["repositoryUri"].endswith("/imgcache-wiring/app")


@pytest.mark.anyio
async def test_pull_through_rules_two_pages(moto_server: str) -> None:
    first_page = {
        "pullThroughCacheRules": [
            rule_entry("docker-hub", "registry-1.docker.io", registryId=ACCOUNT),
            rule_entry("quay", "https://quay.io/", registryId=ACCOUNT),
        ],
        "nextToken": "page-2",
    }
    second_page = {
        "pullThroughCacheRules": [
            rule_entry("k8s", "registry.k8s.io", registryId=ACCOUNT),
            rule_entry(
                "team-a",
                "999988887777.dkr.ecr.us-east-1.amazonaws.com",
                registryId=ACCOUNT,
                upstreamRepositoryPrefix="upstream-app",
            ),
            rule_entry(
                "ROOT",
                "999988887777.dkr.ecr.us-east-1.amazonaws.com",
                registryId=ACCOUNT,
                upstreamRepositoryPrefix="ROOT",
            ),
        ],
    }

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.ecr_client) as stubber:
            stubber.add_response("describe_pull_through_cache_rules", first_page, {})
            stubber.add_response(
                "describe_pull_through_cache_rules", second_page, {"nextToken": "page-2"}
            )
            rules = await aws.pull_through_rules()
            stubber.assert_no_pending_responses()

    ecr_upstream = "999988887777.dkr.ecr.us-east-1.amazonaws.com"
    assert rules == [
        PullThroughRule("docker-hub", "registry-1.docker.io", ACCOUNT, REGION),
        PullThroughRule("quay", "quay.io", ACCOUNT, REGION),
        PullThroughRule("k8s", "registry.k8s.io", ACCOUNT, REGION),
        PullThroughRule("team-a", ecr_upstream, ACCOUNT, REGION, "upstream-app"),
        PullThroughRule("", ecr_upstream, ACCOUNT, REGION, ""),
    ]


@pytest.mark.anyio
async def test_pull_through_rules_configured_registry(moto_server: str) -> None:
    page = {"pullThroughCacheRules": [rule_entry("ghcr", "ghcr.io", registryId=OTHER_ACCOUNT)]}

    async with AwsClient(settings_for(moto_server, account=OTHER_ACCOUNT)) as aws:
        with AioStubber(aws.ecr_client) as stubber:
            stubber.add_response(
                "describe_pull_through_cache_rules", page, {"registryId": OTHER_ACCOUNT}
            )
            rules = await aws.pull_through_rules()

    assert rules == [PullThroughRule("ghcr", "ghcr.io", OTHER_ACCOUNT, REGION)]


@pytest.mark.anyio
async def test_rule_without_registry_uses_sts(moto_server: str) -> None:
    page = {"pullThroughCacheRules": [rule_entry("ecr-public", "public.ecr.aws")]}

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.ecr_client) as stubber:
            stubber.add_response("describe_pull_through_cache_rules", page, {})
            rules = await aws.pull_through_rules()

    assert rules == [PullThroughRule("ecr-public", "public.ecr.aws", ACCOUNT, REGION)]


@pytest.mark.anyio
async def test_incomplete_rule_skipped(moto_server: str) -> None:
    page = {
        "pullThroughCacheRules": [
            {"ecrRepositoryPrefix": "orphan", "registryId": ACCOUNT},
            rule_entry("quay", "quay.io", registryId=ACCOUNT),
        ]
    }

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.ecr_client) as stubber, capture_logs() as logs:
            stubber.add_response("describe_pull_through_cache_rules", page, {})
            rules = await aws.pull_through_rules()

    assert rules == [PullThroughRule("quay", "quay.io", ACCOUNT, REGION)]
    skipped = [entry for entry in logs if entry["event"] == "aws.rule_skipped"]
    assert len(skipped) == 1
    assert skipped[0]["ecr_repository_prefix"] == "orphan"
    assert skipped[0]["log_level"] == "warning"


@pytest.mark.anyio
async def test_unexpected_error_code_typed(moto_server: str) -> None:
    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.ecr_client) as stubber:
            stubber.add_client_error(
                "describe_pull_through_cache_rules",
                service_error_code="ValidationException",
                service_message="bad registry",
            )
            with pytest.raises(AwsApiError) as raised:
                await aws.pull_through_rules()

    assert raised.value.code == "ValidationException"
    assert raised.value.operation == "DescribePullThroughCacheRules"


# --- permissions ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_access_denied_logged_once(moto_server: str) -> None:
    denial = "User: arn:aws:sts::123456789012:assumed-role/imgcache/pod is not authorized"

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.ecr_client) as stubber, capture_logs() as logs:
            for _ in range(3):
                stubber.add_client_error(
                    "describe_pull_through_cache_rules",
                    service_error_code="AccessDeniedException",
                    service_message=denial,
                )
            errors: list[AwsPermissionError] = []
            for _ in range(3):
                with pytest.raises(AwsPermissionError) as raised:
                    await aws.pull_through_rules()
                errors.append(raised.value)

    assert [error.action for error in errors] == ["ecr:DescribePullThroughCacheRules"] * 3
    assert errors[0].feature == "ECR pull-through cache rewriting"
    assert errors[0].reason == denial
    denied_lines = [entry for entry in logs if entry["event"] == "aws.permission_denied"]
    assert len(denied_lines) == 1
    assert denied_lines[0]["action"] == "ecr:DescribePullThroughCacheRules"
    assert denied_lines[0]["feature"] == "ECR pull-through cache rewriting"
    assert denied_lines[0]["error"] == denial
    assert denied_lines[0]["log_level"] == "warning"


@pytest.mark.anyio
async def test_access_denied_logged_again_after_success(moto_server: str) -> None:
    page: dict[str, list[dict[str, str]]] = {"pullThroughCacheRules": []}

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.ecr_client) as stubber, capture_logs() as logs:
            stubber.add_client_error(
                "describe_pull_through_cache_rules", service_error_code="AccessDeniedException"
            )
            stubber.add_response("describe_pull_through_cache_rules", page, {})
            stubber.add_client_error(
                "describe_pull_through_cache_rules", service_error_code="AccessDeniedException"
            )
            with pytest.raises(AwsPermissionError):
                await aws.pull_through_rules()
            assert await aws.pull_through_rules() == []
            with pytest.raises(AwsPermissionError):
                await aws.pull_through_rules()

    events = [entry["event"] for entry in logs if entry["event"].startswith("aws.permission")]
    assert events == [
        "aws.permission_denied",
        "aws.permission_restored",
        "aws.permission_denied",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("service", "code", "expected_action"),
    [
        ("sts", "AccessDenied", "sts:GetCallerIdentity"),
        ("service-quotas", "AccessDeniedException", "servicequotas:GetServiceQuota"),
        ("ecr", "UnauthorizedOperation", "ecr:DescribePullThroughCacheRules"),
    ],
)
async def test_access_denied_names_action(
    moto_server: str, service: str, code: str, expected_action: str
) -> None:
    async with AwsClient(settings_for(moto_server)) as aws:
        call: Callable[[], Awaitable[object]]
        if service == "sts":
            client: Any = aws.sts_client
            method = "get_caller_identity"
            call = aws.identity
        elif service == "service-quotas":
            client = aws.quotas_client
            method = "get_service_quota"
            call = aws.ecr_rate_quotas
        else:
            client = aws.ecr_client
            method = "describe_pull_through_cache_rules"
            call = aws.pull_through_rules
        with AioStubber(client) as stubber:
            stubber.add_client_error(method, service_error_code=code, service_message="denied")
            with pytest.raises(AwsPermissionError) as raised:
                await call()

    assert raised.value.action == expected_action
    assert expected_action in str(raised.value)


# --- throttling -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_throttle_retried_then_succeeds() -> None:
    endpoint = ThrottlingEndpoint(
        throttled_requests=2, rules=[rule_entry("quay", "quay.io", registryId=ACCOUNT)]
    )
    throttled: list[str] = []

    async with serve_locally(endpoint) as url:
        settings = settings_for(url, max_attempts=3)
        async with AwsClient(settings, on_throttle=throttled.append) as aws:
            rules = await aws.pull_through_rules()

    assert rules == [PullThroughRule("quay", "quay.io", ACCOUNT, REGION)]
    assert throttled == ["DescribePullThroughCacheRules"] * 2
    assert endpoint.request_count == 3


@pytest.mark.anyio
async def test_throttle_gives_up_typed() -> None:
    endpoint = ThrottlingEndpoint(throttled_requests=100, rules=[])
    throttled: list[str] = []

    async with serve_locally(endpoint) as url:
        settings = settings_for(url, max_attempts=2)
        async with AwsClient(settings, on_throttle=throttled.append) as aws:
            with pytest.raises(AwsThrottledError) as raised:
                await aws.pull_through_rules()

    assert raised.value.operation == "DescribePullThroughCacheRules"
    assert raised.value.code == "ThrottlingException"
    assert raised.value.attempts == 2
    assert throttled == ["DescribePullThroughCacheRules"] * 2
    assert endpoint.request_count == 2


@pytest.mark.anyio
async def test_stubbed_throttle_typed(moto_server: str) -> None:
    throttled: list[str] = []

    async with AwsClient(settings_for(moto_server), on_throttle=throttled.append) as aws:
        with AioStubber(aws.quotas_client) as stubber:
            stubber.add_client_error(
                "get_service_quota", service_error_code="TooManyRequestsException"
            )
            with pytest.raises(AwsThrottledError) as raised:
                await aws.ecr_rate_quotas()

    assert raised.value.operation == "GetServiceQuota"
    assert raised.value.code == "TooManyRequestsException"
    # on_throttle counts HTTP responses, and a stubbed response never reaches HTTP.
    assert throttled == []


# --- Service Quotas ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rate_quotas_read_per_second(moto_server: str) -> None:
    batch_get_image = {
        "Quota": {
            "ServiceCode": "ecr",
            "QuotaCode": "L-16E70933",
            "Value": 4000.0,
            "Period": {"PeriodValue": 1, "PeriodUnit": "SECOND"},
        }
    }
    download_url = {
        "Quota": {
            "ServiceCode": "ecr",
            "QuotaCode": "L-A60A366D",
            "Value": 300000.0,
            "Period": {"PeriodValue": 1, "PeriodUnit": "MINUTE"},
        }
    }

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.quotas_client) as stubber:
            stubber.add_response(
                "get_service_quota",
                batch_get_image,
                {"ServiceCode": "ecr", "QuotaCode": "L-16E70933"},
            )
            stubber.add_response(
                "get_service_quota",
                download_url,
                {"ServiceCode": "ecr", "QuotaCode": "L-A60A366D"},
            )
            quotas = await aws.ecr_rate_quotas()
            stubber.assert_no_pending_responses()

    assert quotas == {"BatchGetImage": 4000.0, "GetDownloadUrlForLayer": 5000.0}


@pytest.mark.anyio
async def test_rate_quotas_default_when_missing(moto_server: str) -> None:
    # moto 5.2 returns NoSuchResourceException for every ECR quota code.
    async with AwsClient(settings_for(moto_server)) as aws:
        with capture_logs() as logs:
            quotas = await aws.ecr_rate_quotas()

    assert quotas == dict(DEFAULT_ECR_RATE_QUOTAS)
    defaults_used = [entry for entry in logs if entry["event"] == "aws.quota_default_used"]
    assert [entry["quota_code"] for entry in defaults_used] == ["L-16E70933", "L-A60A366D"]


@pytest.mark.anyio
async def test_rate_quota_without_value_defaults(moto_server: str) -> None:
    without_value = {
        "Quota": {
            "ServiceCode": "ecr",
            "QuotaCode": "L-16E70933",
            "ErrorReason": {"ErrorCode": "DEPENDENCY_THROTTLING_ERROR", "ErrorMessage": "slow"},
        }
    }
    with_value = {"Quota": {"ServiceCode": "ecr", "QuotaCode": "L-A60A366D", "Value": 3500.0}}

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.quotas_client) as stubber:
            stubber.add_response("get_service_quota", without_value)
            stubber.add_response("get_service_quota", with_value)
            quotas = await aws.ecr_rate_quotas()

    assert quotas == {"BatchGetImage": 2000.0, "GetDownloadUrlForLayer": 3500.0}


# --- refresh helpers --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_refresh_once_outcomes(moto_server: str) -> None:
    page = {"pullThroughCacheRules": [rule_entry("quay", "quay.io", registryId=ACCOUNT)]}
    received: list[list[PullThroughRule]] = []

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.ecr_client) as stubber, capture_logs() as logs:
            stubber.add_response("describe_pull_through_cache_rules", page, {})
            stubber.add_client_error(
                "describe_pull_through_cache_rules", service_error_code="AccessDeniedException"
            )
            stubber.add_client_error(
                "describe_pull_through_cache_rules", service_error_code="ThrottlingException"
            )
            outcomes = [await refresh_rules_once(aws, received.append) for _ in range(3)]

    assert outcomes == ["updated", "permission_denied", "failed"]
    assert received == [[PullThroughRule("quay", "quay.io", ACCOUNT, REGION)]]
    failures = [entry for entry in logs if entry["event"] == "aws.rules_refresh_failed"]
    assert len(failures) == 1
    assert failures[0]["error_type"] == "AwsThrottledError"


@pytest.mark.anyio
async def test_refresh_forever_repeats(moto_server: str) -> None:
    page = {"pullThroughCacheRules": [rule_entry("k8s", "registry.k8s.io", registryId=ACCOUNT)]}
    received: list[list[PullThroughRule]] = []

    async with AwsClient(settings_for(moto_server)) as aws:
        with AioStubber(aws.ecr_client) as stubber:
            for _ in range(3):
                stubber.add_response("describe_pull_through_cache_rules", page, {})
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tasks:

                    def collect(rules: list[PullThroughRule]) -> None:
                        received.append(rules)
                        if len(received) == 3:
                            tasks.cancel_scope.cancel()

                    tasks.start_soon(refresh_rules_forever, aws, 0.01, collect)

    assert len(received) == 3
    assert received[2] == [PullThroughRule("k8s", "registry.k8s.io", ACCOUNT, REGION)]


# --- settings and policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"account": "12345"}, "invalid AWS account"),
        ({"max_attempts": 0}, "invalid max_attempts"),
        ({"read_timeout_seconds": 0}, "invalid AWS timeout"),
        ({"endpoint_url": "127.0.0.1:5000"}, "invalid AWS endpoint URL"),
        ({"service_endpoint_urls": {"ecr": "vpce.example"}}, "invalid AWS endpoint URL"),
    ],
)
def test_settings_rejects_invalid(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AwsSettings(**overrides)


def test_service_endpoint_overrides_shared() -> None:
    settings = AwsSettings(
        endpoint_url="http://127.0.0.1:5000",
        service_endpoint_urls={"ecr": "http://127.0.0.1:5001"},
    )

    assert settings.endpoint_for("ecr") == "http://127.0.0.1:5001"
    assert settings.endpoint_for("sts") == "http://127.0.0.1:5000"


def test_iam_policy_lists_used_actions() -> None:
    policy = json.loads(POLICY_PATH.read_text())

    listed = {action for statement in policy["Statement"] for action in statement["Action"]}

    assert listed == {action.iam_action for action in ACTIONS}
