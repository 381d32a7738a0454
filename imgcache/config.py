"""Settings of the imgcache process: command-line flags with IMGCACHE_* environment twins.

Every setting is validated once at start, so a typo fails the rollout with one clear
message instead of a crash loop later.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcache.rewrite import PullThroughRule, parse_static_rule

_SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ConfigError(Exception):
    """A flag or environment value is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class Settings:
    """Validated settings; durations are in seconds, rates in pulls per second."""

    kubeconfig: str | None = None
    namespace: str = "imgcache-system"
    identity: str = "imgcache"
    http_port: int = 8080
    http_address: str = "0.0.0.0"
    log_level: str = "info"
    leader_election: bool = True
    lease_name: str = "imgcache-leader"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    helper_image: str | None = None
    pod_name: str | None = None
    pinner: bool = True
    priority_class: str = "system-node-critical"
    pin_debounce: float = 3.0
    prepull: bool = True
    host_network: bool = True
    max_inflight: int = 40
    max_inflight_per_node: int = 4
    registry_qps: float = 20.0
    registry_burst: int = 20
    registry_min_qps: float = 0.5
    node_pull_qps: float = 4.0
    node_pull_burst: int = 8
    prepull_deadline: float = 900.0
    pod_deadline: int = 600
    retry_initial: float = 5.0
    retry_max: float = 120.0
    startup_taint: str | None = None
    startup_taint_deadline: float = 600.0
    progress_interval: float = 5.0
    status_interval: float = 10.0
    watch_timeout: int = 120
    watch_read_timeout: float = 150.0
    watch_cluster_events: bool = False
    pull_through_cache: bool = True
    pull_through_rules: tuple[PullThroughRule, ...] = ()
    pull_through_refresh: float = 600.0
    aws_region: str | None = None
    aws_account: str | None = None
    aws_endpoint_url: str | None = None
    ecr_quota_awareness: bool = False
    shutdown_timeout: float = 20.0


@dataclass(frozen=True)
class _Option:
    flag: str
    dest: str
    parse: Callable[[str], Any]
    help: str
    repeat: bool = False

    @property
    def env(self) -> str:
        return "IMGCACHE_" + self.flag.lstrip("-").replace("-", "_").upper()


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number greater than 0, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of 0 or more, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"must be a number of 0 or more, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number greater than 0, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"must be a whole number greater than 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a TCP port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a TCP port between 1 and 65535, got {text!r}")
    return value


def _log_level(text: str) -> str:
    lowered = text.lower()
    if lowered not in ("debug", "info", "warning", "error"):
        raise ValueError(f"must be one of debug, info, warning, error, got {text!r}")
    return lowered


def _namespace(text: str) -> str:
    if not _DNS_LABEL.match(text):
        raise ValueError(f"{text!r} is not a valid namespace name (lowercase DNS label)")
    return text


def _taint_key(text: str) -> str:
    if not _LABEL_KEY.match(text):
        raise ValueError(
            f"{text!r} is not a valid taint key (for example karpenter.sh/unregistered or imgcache.io/warming)"
        )
    return text


def _existing_file(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"file {text!r} does not exist")
    return str(path)


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "--kubeconfig",
        "kubeconfig",
        _existing_file,
        "kubeconfig file for running outside the cluster (default: the pod's ServiceAccount)",
    ),
    _Option(
        "--namespace",
        "namespace",
        _namespace,
        "namespace for the pinner DaemonSets, prepull pods and the leader Lease (default: the pod's namespace, else "
        "imgcache-system)",
    ),
    _Option("--identity", "identity", _text, "leader-election identity (default: $POD_NAME, else the host name)"),
    _Option("--http-port", "http_port", _port, "port of the /metrics, /healthz and /readyz endpoint (default 8080)"),
    _Option(
        "--http-address", "http_address", _text, "address the HTTP endpoint listens on (default 0.0.0.0, all addresses)"
    ),
    _Option("--log-level", "log_level", _log_level, "debug, info, warning or error (default info)"),
    _Option(
        "--leader-election",
        "leader_election",
        _boolean,
        "elect a leader through a Lease so that replicas are safe (default true)",
    ),
    _Option("--lease-name", "lease_name", _namespace, "name of the leader-election Lease (default imgcache-leader)"),
    _Option(
        "--lease-duration",
        "lease_duration",
        _positive_float,
        "seconds a leader holds the Lease without renewing it (default 15)",
    ),
    _Option(
        "--renew-deadline",
        "renew_deadline",
        _positive_float,
        "seconds a leader keeps trying to renew before it steps down (default 10)",
    ),
    _Option("--retry-period", "retry_period", _positive_float, "seconds between leader-election attempts (default 2)"),
    _Option(
        "--helper-image",
        "helper_image",
        _text,
        "image with the static helper that pinner and prepull pods copy in (default: the controller's own image, "
        "read from its pod; required outside the cluster)",
    ),
    _Option("--pinner", "pinner", _boolean, "keep pinned images on every node with DaemonSets (default true)"),
    _Option(
        "--priority-class", "priority_class", _text, "priorityClassName of pinner pods (default system-node-critical)"
    ),
    _Option(
        "--pin-debounce",
        "pin_debounce",
        _positive_float,
        "seconds of quiet after a catalogue change before the pinner DaemonSets are updated (default 3)",
    ),
    _Option("--prepull", "prepull", _boolean, "prepull catalogue images onto nodes (default true)"),
    _Option(
        "--host-network",
        "host_network",
        _boolean,
        "run prepull and pinner pods with hostNetwork, so pulls start before the CNI is ready (default true)",
    ),
    _Option(
        "--max-inflight",
        "max_inflight",
        _positive_int,
        "maximum prepull pods in flight across the cluster (default 40)",
    ),
    _Option(
        "--max-inflight-per-node",
        "max_inflight_per_node",
        _positive_int,
        "maximum prepull pods in flight on one node (default 4)",
    ),
    _Option(
        "--registry-qps",
        "registry_qps",
        _positive_float,
        "maximum prepull pod starts per second per registry; throttling lowers it (default 20)",
    ),
    _Option(
        "--registry-burst",
        "registry_burst",
        _positive_int,
        "token-bucket burst of prepull pod starts per registry (default 20)",
    ),
    _Option(
        "--registry-min-qps",
        "registry_min_qps",
        _positive_float,
        "floor of the adaptive per-registry rate in pulls per second (default 0.5)",
    ),
    _Option(
        "--node-pull-qps",
        "node_pull_qps",
        _non_negative_float,
        "prepull pod starts per second per node, below the kubelet's registryPullQPS; 0 turns it off (default 4)",
    ),
    _Option(
        "--node-pull-burst",
        "node_pull_burst",
        _positive_int,
        "token-bucket burst of prepull pod starts per node, below the kubelet's registryBurst (default 8)",
    ),
    _Option(
        "--prepull-deadline",
        "prepull_deadline",
        _positive_float,
        "seconds from an image's first attempt on a node after which it is reported failed (default 900)",
    ),
    _Option(
        "--pod-deadline",
        "pod_deadline",
        _positive_int,
        "activeDeadlineSeconds of one prepull pod; a pod past it is deleted and retried (default 600)",
    ),
    _Option(
        "--retry-initial",
        "retry_initial",
        _positive_float,
        "first back-off in seconds after a transient pull failure; doubles per attempt (default 5)",
    ),
    _Option("--retry-max", "retry_max", _positive_float, "maximum back-off in seconds between attempts (default 120)"),
    _Option(
        "--startup-taint",
        "startup_taint",
        _taint_key,
        "taint key removed from a node once its prepulls are done or the deadline passes (default: none)",
    ),
    _Option(
        "--startup-taint-deadline",
        "startup_taint_deadline",
        _positive_float,
        "seconds after node creation when the startup taint is removed even if pulls are unfinished (default 600)",
    ),
    _Option(
        "--progress-interval",
        "progress_interval",
        _positive_float,
        "seconds between writes of a node's progress annotation (default 5)",
    ),
    _Option(
        "--status-interval",
        "status_interval",
        _positive_float,
        "seconds between ImageCache status updates (default 10)",
    ),
    _Option(
        "--watch-timeout",
        "watch_timeout",
        _positive_int,
        "server-side timeoutSeconds of each watch request (default 120)",
    ),
    _Option(
        "--watch-read-timeout",
        "watch_read_timeout",
        _positive_float,
        "seconds without any bytes, bookmarks included, after which a watch is reconnected (default 150)",
    ),
    _Option(
        "--watch-cluster-events",
        "watch_cluster_events",
        _boolean,
        "also read image-pull Events of every pod in the cluster for the metrics (default false; needs the "
        "cluster-events RBAC overlay)",
    ),
    _Option(
        "--pull-through-cache",
        "pull_through_cache",
        _boolean,
        "rewrite images to the account's ECR pull-through cache where a rule exists (default true; no-op without "
        "rules)",
    ),
    _Option(
        "--pull-through-rule",
        "pull_through_rules",
        parse_static_rule,
        "static rule PREFIX=UPSTREAM[/REPO_PREFIX]@ACCOUNT/REGION, repeatable; static rules replace the ECR lookup",
        repeat=True,
    ),
    _Option(
        "--pull-through-refresh",
        "pull_through_refresh",
        _positive_float,
        "seconds between reads of the ECR pull-through cache rules (default 600)",
    ),
    _Option("--aws-region", "aws_region", _text, "AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)"),
    _Option("--aws-account", "aws_account", _text, "AWS account id of the pull-through cache (default: from STS)"),
    _Option(
        "--aws-endpoint-url",
        "aws_endpoint_url",
        _text,
        "endpoint URL for the AWS APIs, for VPC endpoints (default: the public regional endpoint)",
    ),
    _Option(
        "--ecr-quota-awareness",
        "ecr_quota_awareness",
        _boolean,
        "read the ECR rate quotas from Service Quotas and keep the per-registry rate below them (default false)",
    ),
    _Option(
        "--shutdown-timeout",
        "shutdown_timeout",
        _positive_float,
        "seconds allowed for a clean shutdown after SIGTERM (default 20)",
    ),
)


def build_parser(prog: str = "imgcache run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the imgcache controller. Every flag can also be set by the environment variable shown.",
    )
    for option in _OPTIONS:
        if option.parse is _boolean:
            # A bare boolean flag means true; --flag=false turns it off.
            parser.add_argument(
                option.flag,
                dest=option.dest,
                nargs="?",
                const="true",
                default=None,
                metavar="BOOL",
                help=f"{option.help} [env {option.env}]",
            )
            continue
        parser.add_argument(
            option.flag,
            dest=option.dest,
            action="append" if option.repeat else "store",
            default=None,
            metavar="VALUE",
            help=f"{option.help} [env {option.env}]",
        )
    return parser


def load(argv: Sequence[str], environ: dict[str, str] | None = None) -> Settings:
    """Parse flags, fall back to IMGCACHE_* variables, and validate every value."""
    environ = dict(os.environ if environ is None else environ)
    parser = build_parser()
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        raw = getattr(args, option.dest)
        source = option.flag
        if raw is None and option.env in environ:
            raw = environ[option.env]
            source = option.env
            if option.repeat:
                raw = [part for part in raw.split(",") if part.strip()]
        if raw is None:
            continue
        try:
            if option.repeat:
                values[option.dest] = tuple(option.parse(item.strip()) for item in raw)
            else:
                values[option.dest] = option.parse(raw)
        except ValueError as error:
            raise ConfigError(f"invalid {source} value {raw!r}: {error}") from error
    if "namespace" not in values:
        try:
            values["namespace"] = _default_namespace(environ)
        except ValueError as error:
            raise ConfigError(f"invalid POD_NAMESPACE value {environ.get('POD_NAMESPACE')!r}: {error}") from error
    values.setdefault("identity", environ.get("POD_NAME") or os.uname().nodename)
    values["pod_name"] = environ.get("POD_NAME")
    settings = Settings(**values)
    _check_relations(settings)
    return settings


def _default_namespace(environ: dict[str, str]) -> str:
    if environ.get("POD_NAMESPACE"):
        return _namespace(environ["POD_NAMESPACE"])
    try:
        return _namespace(_SA_NAMESPACE_FILE.read_text().strip())
    except (OSError, ValueError):
        return "imgcache-system"


def _check_relations(settings: Settings) -> None:
    if settings.renew_deadline >= settings.lease_duration:
        raise ConfigError(
            f"--renew-deadline ({settings.renew_deadline:g} s) must be shorter than "
            f"--lease-duration ({settings.lease_duration:g} s), or two leaders could overlap"
        )
    if settings.retry_period >= settings.renew_deadline:
        raise ConfigError(
            f"--retry-period ({settings.retry_period:g} s) must be shorter than --renew-deadline "
            f"({settings.renew_deadline:g} s)"
        )
    if settings.max_inflight_per_node > settings.max_inflight:
        raise ConfigError(
            f"--max-inflight-per-node ({settings.max_inflight_per_node}) cannot exceed --max-inflight "
            f"({settings.max_inflight})"
        )
    if settings.registry_min_qps > settings.registry_qps:
        raise ConfigError(
            f"--registry-min-qps ({settings.registry_min_qps:g}) cannot exceed --registry-qps "
            f"({settings.registry_qps:g})"
        )
    if settings.retry_initial > settings.retry_max:
        raise ConfigError(
            f"--retry-initial ({settings.retry_initial:g} s) cannot exceed --retry-max ({settings.retry_max:g} s)"
        )
    if settings.watch_read_timeout <= settings.watch_timeout:
        raise ConfigError(
            f"--watch-read-timeout ({settings.watch_read_timeout:g} s) must be longer than --watch-timeout "
            f"({settings.watch_timeout} s), or healthy idle watches would be cut"
        )
