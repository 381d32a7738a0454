"""Call AWS APIs for imgcache: account identity, ECR pull-through cache rules, ECR rate quotas.

Every AWS call in imgcache goes through this module, so that retries, timeouts, endpoint
overrides, throttle counting and the mapping of AWS errors to typed exceptions are decided in
one place. Credentials come from the standard botocore chain (IRSA, EKS Pod Identity,
environment, shared files) and are never logged.

Each AWS call either returns its result or raises a subclass of ``AwsError``:

- ``AwsPermissionError``: the IAM role lacks an action. It carries the action and the feature
  it disables, and ``AwsClient`` logs it once per action (``aws.permission_denied``).
- ``AwsThrottledError``: AWS still throttled the call after botocore's retries.
- ``AwsCredentialsError`` and ``AwsConfigurationError``: credentials or region are missing or
  invalid. The message names the fix.
- ``AwsUnavailableError``: the endpoint could not be reached or timed out after retries.
- ``AwsApiError``: any other error response from AWS.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Self, TypeVar

import anyio
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    InvalidRegionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.model import OperationModel
from botocore.retries.standard import RetryContext, ThrottledRetryableChecker

from imgcache.rewrite import PullThroughRule

if TYPE_CHECKING:
    from types_aiobotocore_ecr.client import ECRClient
    from types_aiobotocore_ecr.type_defs import PullThroughCacheRuleTypeDef
    from types_aiobotocore_service_quotas.client import ServiceQuotasClient
    from types_aiobotocore_service_quotas.type_defs import ServiceQuotaTypeDef
    from types_aiobotocore_sts.client import STSClient

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class AwsAction:
    """An IAM action that this module calls, and the imgcache feature that needs it."""

    service: str
    operation: str
    feature: str

    @property
    def iam_action(self) -> str:
        return f"{self.service}:{self.operation}"


# AWS documents that sts:GetCallerIdentity needs no IAM permission, even under an explicit deny.
# It is listed here and in the example policy so that every call this module makes is named.
GET_CALLER_IDENTITY = AwsAction("sts", "GetCallerIdentity", "account discovery")
DESCRIBE_PULL_THROUGH_CACHE_RULES = AwsAction(
    "ecr", "DescribePullThroughCacheRules", "ECR pull-through cache rewriting"
)
GET_SERVICE_QUOTA = AwsAction("servicequotas", "GetServiceQuota", "ECR rate quota discovery")

ACTIONS: tuple[AwsAction, ...] = (
    GET_CALLER_IDENTITY,
    DESCRIBE_PULL_THROUGH_CACHE_RULES,
    GET_SERVICE_QUOTA,
)

# Service Quotas codes of the ECR pull rate quotas, by the ECR API they limit. The defaults are
# the values AWS documents for every region, in requests per second.
ECR_RATE_QUOTA_CODES: Mapping[str, str] = {
    "BatchGetImage": "L-16E70933",
    "GetDownloadUrlForLayer": "L-A60A366D",
}
DEFAULT_ECR_RATE_QUOTAS: Mapping[str, float] = {
    "BatchGetImage": 2000.0,
    "GetDownloadUrlForLayer": 3000.0,
}

# ECR writes ROOT for a repository prefix that matches every repository name.
_ROOT_PREFIX = "ROOT"

_PERMISSION_ERROR_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})
_CREDENTIAL_ERROR_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_CONNECTION_ERRORS = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
)

_SECONDS_PER_PERIOD_UNIT: Mapping[str, float] = {
    "MICROSECOND": 1e-6,
    "MILLISECOND": 1e-3,
    "SECOND": 1.0,
    "MINUTE": 60.0,
    "HOUR": 3600.0,
    "DAY": 86400.0,
    "WEEK": 604800.0,
}

_CREDENTIALS_FIX = (
    "give the imgcache service account an IAM role through IRSA "
    "(eks.amazonaws.com/role-arn annotation) or an EKS Pod Identity association"
)
_REGION_FIX = "set --aws-region (IMGCACHE_AWS_REGION) or AWS_REGION in the pod environment"


@dataclass(frozen=True)
class AwsSettings:
    """Connection settings for ``AwsClient``.

    ``region`` and ``account`` default to discovery: the region from ``AWS_REGION``, then
    ``AWS_DEFAULT_REGION`` or the shared config file, and the account from STS
    GetCallerIdentity. ``endpoint_url`` sends every service to one URL, which tests use for a
    local moto server. ``service_endpoint_urls`` overrides it per botocore service name
    (``ecr``, ``sts``, ``service-quotas``), for example for VPC interface endpoints without
    private DNS. botocore's own ``AWS_ENDPOINT_URL_<SERVICE>`` variables also work when both
    are unset. ``max_attempts`` counts every request of one call, the first included.
    """

    region: str | None = None
    account: str | None = None
    endpoint_url: str | None = None
    service_endpoint_urls: Mapping[str, str] = field(default_factory=dict)
    max_attempts: int = 5
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.account is not None and not (len(self.account) == 12 and self.account.isdigit()):
            raise ValueError(f"invalid AWS account {self.account!r}: expected 12 digits")
        if self.max_attempts < 1:
            raise ValueError(f"invalid max_attempts {self.max_attempts}: expected 1 or more")
        if self.connect_timeout_seconds <= 0 or self.read_timeout_seconds <= 0:
            raise ValueError("invalid AWS timeout: connect and read timeouts must be positive")
        urls = [self.endpoint_url, *self.service_endpoint_urls.values()]
        for url in urls:
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"invalid AWS endpoint URL {url!r}: expected http:// or https://")

    def endpoint_for(self, service: str) -> str | None:
        return self.service_endpoint_urls.get(service, self.endpoint_url)


class AwsError(Exception):
    """A failed AWS call. ``operation`` is the API operation, or None before any call."""

    def __init__(self, message: str, operation: str | None = None) -> None:
        super().__init__(message)
        self.operation = operation


class AwsConfigurationError(AwsError):
    """The AWS region or endpoint settings are missing or invalid."""


class AwsCredentialsError(AwsConfigurationError):
    """No usable AWS credentials were found, or AWS rejected them."""


class AwsPermissionError(AwsError):
    """The IAM role lacks ``action``, which disables ``feature``."""

    def __init__(self, action: AwsAction, reason: str) -> None:
        super().__init__(
            f"{action.iam_action} was denied, so {action.feature} is disabled: {reason}. "
            f"Allow {action.iam_action} in the IAM role's policy.",
            action.operation,
        )
        self.action = action.iam_action
        self.feature = action.feature
        self.reason = reason


class AwsThrottledError(AwsError):
    """AWS throttled ``operation`` on every attempt botocore made."""

    def __init__(self, operation: str, code: str, attempts: int) -> None:
        super().__init__(
            f"AWS throttled {operation} ({code}) on all {attempts} attempts. Retry later.",
            operation,
        )
        self.code = code
        self.attempts = attempts


class AwsUnavailableError(AwsError):
    """The AWS endpoint was unreachable or timed out on every attempt."""


class AwsApiError(AwsError):
    """AWS returned an error that has no more specific type here."""

    def __init__(self, operation: str, code: str, reason: str) -> None:
        super().__init__(f"AWS {operation} failed with {code}: {reason}", operation)
        self.code = code
        self.reason = reason


class PermissionDeniedLog:
    """Log each denied IAM action once, and again only after a call of it has succeeded."""

    def __init__(self) -> None:
        self._denied: set[str] = set()

    def record_denied(self, error: AwsPermissionError) -> bool:
        """Log ``aws.permission_denied`` unless this action is already logged.

        Returns whether a line was written.
        """
        if error.action in self._denied:
            return False
        self._denied.add(error.action)
        _log.warning(
            "aws.permission_denied",
            action=error.action,
            feature=error.feature,
            error=error.reason,
        )
        return True

    def record_allowed(self, action: str) -> None:
        """Forget a denial of ``action`` and log ``aws.permission_restored`` if one was logged."""
        if action not in self._denied:
            return
        self._denied.remove(action)
        _log.info("aws.permission_restored", action=action)


def resolve_region(configured: str | None, session: AioSession) -> str:
    """Return the configured region, else ``AWS_REGION``, else botocore's region setting.

    botocore's setting reads ``AWS_DEFAULT_REGION`` and then the shared config file. Raises
    ``AwsConfigurationError`` when none is set.
    """
    if configured:
        return configured
    from_environment = os.environ.get("AWS_REGION")
    if from_environment:
        return from_environment
    from_botocore = session.get_config_variable("region")
    if isinstance(from_botocore, str) and from_botocore:
        return from_botocore
    raise AwsConfigurationError(f"AWS region is not set: {_REGION_FIX}")


def _is_throttling_code(code: str) -> bool:
    context = RetryContext(attempt_number=1, parsed_response={"Error": {"Code": code}})
    return ThrottledRetryableChecker().is_retryable(context)


def _ignore_throttle(operation_name: str) -> None:
    """Default ``on_throttle``: count nothing."""


class AwsClient:
    """The AWS clients imgcache uses, opened with ``async with AwsClient(settings) as aws``.

    ``on_throttle(operation_name)`` is called once for every throttled response that AWS
    returns over HTTP, both those botocore retried and the last one it gave up on. A call that
    is still throttled after the last attempt then raises ``AwsThrottledError``.
    """

    def __init__(
        self,
        settings: AwsSettings,
        *,
        on_throttle: Callable[[str], None] = _ignore_throttle,
        session: AioSession | None = None,
    ) -> None:
        self._settings = settings
        self._on_throttle = on_throttle
        self._session = session if session is not None else get_session()
        self._permission_log = PermissionDeniedLog()
        self._exit_stack = AsyncExitStack()
        self._region: str | None = None
        self._account: str | None = settings.account
        self._sts: STSClient | None = None
        self._ecr: ECRClient | None = None
        self._quotas: ServiceQuotasClient | None = None

    async def __aenter__(self) -> Self:
        region = resolve_region(self._settings.region, self._session)
        try:
            await self._open_clients(region)
        except BaseException:
            await self._exit_stack.aclose()
            raise
        self._region = region
        _log.info("aws.clients_opened", region=region)
        return self

    async def _open_clients(self, region: str) -> None:
        # botocore's retries["max_attempts"] counts retries after the first request, while
        # "total_max_attempts" counts every request, which is what AwsSettings.max_attempts means.
        config = AioConfig(
            retries={"mode": "adaptive", "total_max_attempts": self._settings.max_attempts},
            connect_timeout=self._settings.connect_timeout_seconds,
            read_timeout=self._settings.read_timeout_seconds,
            user_agent_appid="imgcache",
        )
        session = self._session
        stack = self._exit_stack
        try:
            self._sts = await stack.enter_async_context(
                session.create_client(
                    "sts",
                    region_name=region,
                    endpoint_url=self._settings.endpoint_for("sts"),
                    config=config,
                )
            )
            self._ecr = await stack.enter_async_context(
                session.create_client(
                    "ecr",
                    region_name=region,
                    endpoint_url=self._settings.endpoint_for("ecr"),
                    config=config,
                )
            )
            self._quotas = await stack.enter_async_context(
                session.create_client(
                    "service-quotas",
                    region_name=region,
                    endpoint_url=self._settings.endpoint_for("service-quotas"),
                    config=config,
                )
            )
        except InvalidRegionError as error:
            raise AwsConfigurationError(f"invalid AWS region {region!r}: {_REGION_FIX}") from error
        except (CredentialRetrievalError, PartialCredentialsError) as error:
            raise AwsCredentialsError(f"AWS credentials are invalid ({error}): {_CREDENTIALS_FIX}") from error

        for client in (self._sts, self._ecr, self._quotas):
            service_event = client.meta.service_model.service_id.hyphenize()
            client.meta.events.register(f"needs-retry.{service_event}", self._count_throttle)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._exit_stack.aclose()

    @property
    def region(self) -> str:
        if self._region is None:
            raise RuntimeError("AwsClient is not open: use it with `async with`")
        return self._region

    @property
    def sts_client(self) -> STSClient:
        """The underlying aiobotocore STS client, for a botocore Stubber in tests."""
        if self._sts is None:
            raise RuntimeError("AwsClient is not open: use it with `async with`")
        return self._sts

    @property
    def ecr_client(self) -> ECRClient:
        """The underlying aiobotocore ECR client, for a botocore Stubber in tests."""
        if self._ecr is None:
            raise RuntimeError("AwsClient is not open: use it with `async with`")
        return self._ecr

    @property
    def quotas_client(self) -> ServiceQuotasClient:
        """The underlying aiobotocore Service Quotas client, for a botocore Stubber in tests."""
        if self._quotas is None:
            raise RuntimeError("AwsClient is not open: use it with `async with`")
        return self._quotas

    @property
    def permission_log(self) -> PermissionDeniedLog:
        return self._permission_log

    async def identity(self) -> tuple[str, str]:
        """Return ``(account, region)``, asking STS for the account once if it is not configured."""
        if self._account is None:
            response = await self._call(GET_CALLER_IDENTITY, self.sts_client.get_caller_identity)
            self._account = response["Account"]
            _log.info("aws.identity_discovered", account=self._account, region=self.region)
        return self._account, self.region

    async def pull_through_rules(self) -> list[PullThroughRule]:
        """Read every ECR pull-through cache rule of the registry, page by page.

        The registry is the configured account, or the caller's own registry when no account is
        configured. Rules without a repository prefix or upstream URL are skipped with a warning.
        """
        pages = await self._call(DESCRIBE_PULL_THROUGH_CACHE_RULES, self._read_rule_pages)
        rules: list[PullThroughRule] = []
        for entry in pages:
            rule = await self._rule_from_entry(entry)
            if rule is not None:
                rules.append(rule)
        return rules

    async def ecr_rate_quotas(self) -> dict[str, float]:
        """Read the ECR pull rate quotas, in requests per second, by ECR API name.

        A quota that Service Quotas has no value for falls back to its documented default
        (``DEFAULT_ECR_RATE_QUOTAS``), with an ``aws.quota_default_used`` log line.
        """
        quotas: dict[str, float] = {}
        for api, quota_code in ECR_RATE_QUOTA_CODES.items():
            quotas[api] = await self._read_rate_quota(api, quota_code)
        return quotas

    async def _read_rule_pages(self) -> list[PullThroughCacheRuleTypeDef]:
        paginator = self.ecr_client.get_paginator("describe_pull_through_cache_rules")
        if self._settings.account is None:
            pages = paginator.paginate()
        else:
            pages = paginator.paginate(registryId=self._settings.account)
        entries: list[PullThroughCacheRuleTypeDef] = []
        async for page in pages:
            entries.extend(page.get("pullThroughCacheRules", []))
        return entries

    async def _rule_from_entry(self, entry: PullThroughCacheRuleTypeDef) -> PullThroughRule | None:
        ecr_prefix = entry.get("ecrRepositoryPrefix")
        upstream_url = entry.get("upstreamRegistryUrl")
        if not ecr_prefix or not upstream_url:
            _log.warning(
                "aws.rule_skipped",
                reason="missing ecrRepositoryPrefix or upstreamRegistryUrl",
                ecr_repository_prefix=ecr_prefix,
                upstream_registry_url=upstream_url,
            )
            return None
        account = entry.get("registryId")
        if not account:
            account, _ = await self.identity()
        return PullThroughRule(
            prefix=_repository_prefix(ecr_prefix),
            upstream_registry=_registry_host(upstream_url),
            account=account,
            region=self.region,
            upstream_repository_prefix=_repository_prefix(entry.get("upstreamRepositoryPrefix", "")),
        )

    async def _read_rate_quota(self, api: str, quota_code: str) -> float:
        default = DEFAULT_ECR_RATE_QUOTAS[api]

        async def get_quota() -> ServiceQuotaTypeDef | None:
            try:
                response = await self.quotas_client.get_service_quota(ServiceCode="ecr", QuotaCode=quota_code)
            except ClientError as error:
                if _error_code(error) == "NoSuchResourceException":
                    return None
                raise
            return response.get("Quota")

        quota = await self._call(GET_SERVICE_QUOTA, get_quota)
        value = quota.get("Value") if quota is not None else None
        if quota is None or value is None:
            _log.info(
                "aws.quota_default_used",
                api=api,
                quota_code=quota_code,
                requests_per_second=default,
            )
            return default
        return _per_second(value, quota)

    async def _call(self, action: AwsAction, request: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``request`` and turn every botocore failure into an ``AwsError``."""
        try:
            result = await request()
        except ClientError as error:
            raise self._error_from_response(action, error) from error
        except NoCredentialsError as error:
            raise AwsCredentialsError(
                f"no AWS credentials found for {action.operation}: {_CREDENTIALS_FIX}",
                action.operation,
            ) from error
        except (CredentialRetrievalError, PartialCredentialsError) as error:
            raise AwsCredentialsError(
                f"AWS credentials are invalid ({error}): {_CREDENTIALS_FIX}", action.operation
            ) from error
        except _CONNECTION_ERRORS as error:
            raise AwsUnavailableError(
                f"AWS {action.operation} failed in region {self.region}: {error}. Check that "
                "the region exists (AWS_REGION), that the endpoint or VPC endpoint is "
                "reachable, and any endpoint URL override",
                action.operation,
            ) from error
        self._permission_log.record_allowed(action.iam_action)
        return result

    def _error_from_response(self, action: AwsAction, error: ClientError) -> AwsError:
        code = _error_code(error)
        reason = str(error.response.get("Error", {}).get("Message", ""))
        if code in _PERMISSION_ERROR_CODES:
            denied = AwsPermissionError(action, reason)
            self._permission_log.record_denied(denied)
            return denied
        if code in _CREDENTIAL_ERROR_CODES:
            return AwsCredentialsError(
                f"AWS rejected the credentials for {action.operation} ({code}: {reason}): {_CREDENTIALS_FIX}",
                action.operation,
            )
        if _is_throttling_code(code):
            retries = error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
            return AwsThrottledError(action.operation, code, retries + 1)
        return AwsApiError(action.operation, code, reason)

    def _count_throttle(
        self,
        response: tuple[object, Mapping[str, Any]] | None = None,
        operation: OperationModel | None = None,
        attempts: int = 0,
        **kwargs: object,
    ) -> None:
        """Report a throttled HTTP response to ``on_throttle``.

        This handler is registered on botocore's needs-retry event, which botocore emits after
        every HTTP attempt. The first handler that returns a value decides on the retry, and
        this one returns None, so it only observes.
        """
        if response is None or operation is None:
            return
        code = str(response[1].get("Error", {}).get("Code", ""))
        if not code or not _is_throttling_code(code):
            return
        _log.debug("aws.throttled", operation=operation.name, code=code, attempt=attempts)
        self._on_throttle(operation.name)


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _registry_host(upstream_registry_url: str) -> str:
    """Return the registry host of an ECR ``upstreamRegistryUrl``, without scheme or slash."""
    _, separator, rest = upstream_registry_url.partition("://")
    host = rest if separator else upstream_registry_url
    return host.strip().rstrip("/").lower()


def _repository_prefix(prefix: str) -> str:
    return "" if prefix == _ROOT_PREFIX else prefix.rstrip("/")


def _per_second(value: float, quota: ServiceQuotaTypeDef) -> float:
    """Convert a quota value to a rate per second. A quota without a period is per second."""
    period = quota.get("Period")
    if period is None:
        return value
    unit_seconds = _SECONDS_PER_PERIOD_UNIT.get(period.get("PeriodUnit", "SECOND"), 1.0)
    return value / (period.get("PeriodValue", 1) * unit_seconds)


RefreshOutcome = Literal["updated", "permission_denied", "failed"]


async def refresh_rules_once(client: AwsClient, on_rules: Callable[[list[PullThroughRule]], None]) -> RefreshOutcome:
    """Read the pull-through cache rules once and pass them to ``on_rules`` on success.

    On failure ``on_rules`` is not called, so the caller keeps its last known rules. ``client``
    has already logged a denied permission once. Other failures log ``aws.rules_refresh_failed``
    on every attempt.
    """
    try:
        rules = await client.pull_through_rules()
    except AwsPermissionError:
        return "permission_denied"
    except AwsError as error:
        _log.warning("aws.rules_refresh_failed", error=str(error), error_type=type(error).__name__)
        return "failed"
    on_rules(rules)
    _log.debug("aws.rules_refreshed", rule_count=len(rules))
    return "updated"


async def refresh_rules_forever(
    client: AwsClient,
    interval_seconds: float,
    on_rules: Callable[[list[PullThroughRule]], None],
) -> NoReturn:
    """Call ``refresh_rules_once`` every ``interval_seconds`` until the task is cancelled."""
    while True:
        await refresh_rules_once(client, on_rules)
        await anyio.sleep(interval_seconds)
