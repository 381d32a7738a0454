"""Checks of the Prometheus rules, their promtool tests, the PrometheusRule and the dashboard.

Every metric and label name in manifests/monitoring/ is compared with a render of
``imgcache.metrics.Metrics``, so renaming a metric or a label fails here rather than
leaving an alert or a panel without data. promtool comes from Debian's prometheus
package, kubectl from .cluster/bin or /usr/bin.

Run this file as a script with ``--write`` to regenerate the PrometheusRule from
rules.yaml:
    uv run python tests/unit/test_monitoring.py --write
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from imgcache.classify import PERMANENT, FailureClass
from imgcache.metrics import Metrics
from imgcache.reference import is_ecr_private_registry

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "manifests" / "monitoring"
RULES = MONITORING / "rules.yaml"
RULES_TEST = MONITORING / "rules-test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
OVERLAY = REPO / "manifests" / "overlays" / "monitoring"
PROMETHEUS_RULE = OVERLAY / "prometheusrule.yaml"

PROMTOOL_HINT = "install Debian's prometheus package, which contains promtool: apt-get install -y prometheus"
# Labels that Prometheus Operator adds to every series scraped through a ServiceMonitor.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "service", "endpoint", "container", "pod"})
# Series that Prometheus writes itself for each target, with their labels.
PROMETHEUS_SERIES = {"up": TARGET_LABELS}
ALERTS = {
    "ImgcacheEcrThrottling",
    "ImgcacheRegistryThrottling",
    "ImgcachePermanentPullFailures",
    "ImgcacheNodesWarmingTooLong",
    "ImgcacheNodeWarmupSlow",
    "ImgcacheDown",
    "ImgcacheNoLeader",
    "ImgcacheMultipleLeaders",
}

PROMETHEUS_RULE_HEADER = """\
# Generated from manifests/monitoring/rules.yaml, so edit that file and run:
#   uv run python tests/unit/test_monitoring.py --write
# tests/unit/test_monitoring.py fails while the two files differ.
#
# A Prometheus resource loads only the PrometheusRules that match its ruleSelector
# and ruleNamespaceSelector. Add the labels that your Prometheus selects, such as
# the release label that kube-prometheus-stack uses.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: imgcache
  namespace: imgcache-system
  labels:
    app.kubernetes.io/name: imgcache
    app.kubernetes.io/part-of: imgcache
spec:
"""

Object = dict[str, Any]


def render_prometheus_rule() -> str:
    """Build the PrometheusRule text from the header and the groups of rules.yaml, indented under spec."""
    lines = RULES.read_text().splitlines()
    start = lines.index("groups:")
    body = [f"  {line}" if line else "" for line in lines[start:]]
    return PROMETHEUS_RULE_HEADER + "\n".join(body) + "\n"


# --- Tools ---------------------------------------------------------------------


def find_tool(name: str, candidates: tuple[Path, ...], hint: str) -> Path:
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    pytest.fail(f"{name} not found; {hint}")


def run(command: list[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120, check=False)


def find_promtool() -> Path:
    return find_tool("promtool", (Path("/usr/bin/promtool"),), PROMTOOL_HINT)


def find_kubectl() -> Path:
    return find_tool(
        "kubectl",
        (REPO / ".cluster" / "bin" / "kubectl", Path("/usr/bin/kubectl")),
        "build it with tests/controlplane/build.sh",
    )


# --- The exporter --------------------------------------------------------------


def exercise(metrics: Metrics) -> None:
    """Record one sample in every metric, with label values that the controller uses."""
    ecr = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    metrics.pull_duration.labels(registry=ecr).observe(3.2)
    metrics.pull_wait_duration.labels(registry=ecr).observe(5.9)
    metrics.pull_cached.labels(registry=ecr).inc()
    metrics.pull_size.labels(registry=ecr).observe(48_000_000)
    metrics.pull_failures.labels(registry=ecr, **{"class": FailureClass.NOT_FOUND.value}).inc()
    metrics.registry_throttled.labels(registry=ecr, source="kubelet").inc()
    metrics.node_warmup.labels(platform="linux/amd64").observe(140)
    metrics.nodes.labels(state="warming").set(2)
    metrics.queue_depth.set(7)
    metrics.inflight.set(4)
    metrics.prepull_pods.labels(outcome="created").inc()
    metrics.registry_rate.labels(registry=ecr).set(10)
    metrics.catalogue_images.labels(use="prepull").set(12)
    metrics.catalogue_invalid.set(1)
    metrics.count_watch_restart("nodes", "gone")
    metrics.count_api_error("patch", 409)
    metrics.leader.set(1)
    metrics.pinner_daemonsets.set(2)
    metrics.ecr_quota.labels(api="BatchGetImage").set(2000)


@dataclass
class Exposition:
    """Sample names of one render, with their label keys and the le values of buckets."""

    labels: dict[str, frozenset[str]] = field(default_factory=dict)
    le_values: dict[str, set[str]] = field(default_factory=dict)
    empty_families: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def exposition() -> Exposition:
    metrics = Metrics()
    exercise(metrics)
    text = generate_latest(metrics.registry).decode()
    result = Exposition()
    for family in text_string_to_metric_families(text):
        if not family.samples:
            result.empty_families.append(family.name)
        for sample in family.samples:
            result.labels[sample.name] = frozenset(sample.labels)
            if "le" in sample.labels:
                result.le_values.setdefault(sample.name, set()).add(sample.labels["le"])
    return result


def known_labels(exposition: Exposition, name: str) -> frozenset[str] | None:
    """Return the label keys of a series that Prometheus stores for an imgcache target, or None."""
    if name in PROMETHEUS_SERIES:
        return PROMETHEUS_SERIES[name]
    if name in exposition.labels:
        return exposition.labels[name] | TARGET_LABELS
    return None


# --- PromQL names --------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<number>[0-9][0-9a-zA-Z.]*)
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<matcher>=~|!~|!=|==|=)
    | (?P<punct>[{}(),])
    | (?P<other>\S)
    """,
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _GROUPING | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}


@dataclass
class Names:
    """Metric names and label keys that a PromQL expression refers to."""

    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)


def promql_names(expr: str) -> Names:
    """Collect the metric names and label keys of a PromQL expression.

    This is a tokenizer, not a parser. A name followed by "(", "by" or "without" is
    a function or an aggregation. Names inside the braces of a selector or the list
    of a grouping clause are label keys, and every other name that is not a keyword
    is a metric.
    """
    names = Names()
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    in_braces = False
    in_grouping = False
    for index, (kind, text) in enumerate(tokens):
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "punct":
            if text == "{":
                in_braces = True
            elif text == "}":
                in_braces = False
            elif text == ")":
                in_grouping = False
            continue
        if kind != "name":
            continue
        if in_braces or in_grouping:
            names.labels.add(text)
        elif text in _GROUPING and following == "(":
            in_grouping = True
        elif following in {"(", "by", "without"} or text in _KEYWORDS:
            # A function call, an aggregation such as "max by (x) (...)", or a keyword.
            continue
        else:
            names.metrics.add(text)
    return names


def label_values_names(query: str) -> Names:
    """Collect the names of a Grafana label_values(expression, label) query."""
    match = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", query.strip())
    assert match is not None, f"unsupported variable query {query!r}"
    names = promql_names(match.group(1))
    names.labels.add(match.group(2))
    return names


def unknown_names(names: Names, exposition: Exposition) -> list[str]:
    """Return the metric names and label keys that no imgcache target produces."""
    problems = [f"metric {m}" for m in sorted(names.metrics) if known_labels(exposition, m) is None]
    allowed: set[str] = set(TARGET_LABELS)
    for metric in names.metrics:
        allowed |= known_labels(exposition, metric) or set()
    problems += [f"label {label}" for label in sorted(names.labels - allowed)]
    return problems


def test_promql_names_tokenizer() -> None:
    names = promql_names(
        'max by (registry) (rate(a_total{class=~"x|y", source!="aws_api"}[5m] offset 15m))'
        " and on (job, instance) (up == 1)"
    )
    assert names.metrics == {"a_total", "up"}
    assert names.labels == {"registry", "class", "source", "job", "instance"}


# --- Loading -------------------------------------------------------------------


def load_yaml(path: Path) -> Object:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} does not contain a YAML mapping"
    return data


def rules(data: Object) -> Iterator[Object]:
    for group in data["groups"]:
        yield from group["rules"]


def series_names(selector: str) -> tuple[str, dict[str, str]]:
    """Split a promtool input series such as 'up{job="a"}' into its name and labels."""
    match = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*", selector)
    assert match is not None, f"cannot read input series {selector!r}"
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"', match.group(2) or ""))
    return match.group(1), labels


def dashboard_panels(dashboard: Object) -> Iterator[Object]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


@pytest.fixture(scope="module")
def rule_data() -> Object:
    return load_yaml(RULES)


@pytest.fixture(scope="module")
def rule_tests() -> Object:
    return load_yaml(RULES_TEST)


@pytest.fixture(scope="module")
def dashboard() -> Object:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


# --- The exporter render -------------------------------------------------------


def test_every_metric_exercised(exposition: Exposition) -> None:
    # A metric added to imgcache.metrics without a sample in exercise() would escape
    # the name checks below.
    assert exposition.empty_families == []


# --- Rules ---------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = run([find_promtool(), "check", "rules", RULES])
    assert result.returncode == 0, f"promtool check rules failed:\n{result.stdout}{result.stderr}"


def test_promtool_test_rules() -> None:
    result = run([find_promtool(), "test", "rules", RULES_TEST])
    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}{result.stderr}"


def test_rules_alert_names(rule_data: Object) -> None:
    assert {rule["alert"] for rule in rules(rule_data)} == ALERTS


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_rule_severity_and_annotations(rule_data: Object, alert: str) -> None:
    rule = next(r for r in rules(rule_data) if r["alert"] == alert)
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"]
    assert "Runbook:" in rule["annotations"]["description"]


def test_rules_use_exported_names(rule_data: Object, exposition: Exposition) -> None:
    for rule in rules(rule_data):
        names = promql_names(rule["expr"])
        assert unknown_names(names, exposition) == [], f"{rule['alert']} refers to names no exporter produces"


def test_rules_template_labels(rule_data: Object) -> None:
    # $labels.X renders as an empty string when the alert has no label X. The labels
    # that an expression names stand in for the labels that it keeps, which holds
    # because every aggregation in rules.yaml keeps the labels its annotations use.
    for rule in rules(rule_data):
        kept = promql_names(rule["expr"]).labels | set(rule["labels"])
        templates = " ".join(rule["annotations"].values())
        used = set(re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", templates))
        assert used <= kept, f"{rule['alert']} annotations use labels {sorted(used - kept)} that it does not keep"


def test_permanent_classes_match_classifier(rule_data: Object) -> None:
    rule = next(r for r in rules(rule_data) if r["alert"] == "ImgcachePermanentPullFailures")
    matchers = re.findall(r'class=~"([^"]*)"', rule["expr"])
    assert matchers, "ImgcachePermanentPullFailures has no class matcher"
    for matcher in matchers:
        assert set(matcher.split("|")) == {c.value for c in PERMANENT}


@pytest.mark.parametrize(
    ("registry", "is_ecr"),
    [
        ("123456789012.dkr.ecr.us-east-1.amazonaws.com", True),
        ("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com", True),
        ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", True),
        ("ecr", True),
        ("public.ecr.aws", False),
        ("docker.io", False),
        ("quay.io", False),
        ("registry.k8s.io", False),
    ],
)
def test_ecr_registry_matcher(rule_data: Object, registry: str, is_ecr: bool) -> None:
    rule = next(r for r in rules(rule_data) if r["alert"] == "ImgcacheEcrThrottling")
    match = re.search(r'registry=~"([^"]*)"', rule["expr"])
    assert match is not None, "ImgcacheEcrThrottling has no registry matcher"
    # PromQL strings escape a backslash as \\, and Prometheus anchors the regex.
    pattern = match.group(1).replace("\\\\", "\\")
    assert (re.fullmatch(pattern, registry) is not None) is is_ecr
    if registry != "ecr":
        assert is_ecr_private_registry(registry) is is_ecr


def test_other_registries_matcher_complements(rule_data: Object) -> None:
    by_alert = {r["alert"]: r["expr"] for r in rules(rule_data)}
    ecr = re.search(r'registry=~"([^"]*)"', by_alert["ImgcacheEcrThrottling"])
    other = re.search(r'registry!~"([^"]*)"', by_alert["ImgcacheRegistryThrottling"])
    assert ecr is not None
    assert other is not None
    assert ecr.group(1) == other.group(1)


# --- promtool test input -------------------------------------------------------


def test_rule_tests_cover_every_alert(rule_tests: Object) -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in rule_tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == ALERTS
    assert silent == ALERTS


def test_rule_tests_use_exported_series(rule_tests: Object, exposition: Exposition) -> None:
    for case in rule_tests["tests"]:
        for series in case["input_series"]:
            name, labels = series_names(series["series"])
            expected = known_labels(exposition, name)
            assert expected is not None, f"{case['name']}: {name} is not exported"
            assert set(labels) == expected, f"{case['name']}: labels of {name} differ from the exporter's"


def test_rule_tests_bucket_bounds(rule_tests: Object, exposition: Exposition) -> None:
    for case in rule_tests["tests"]:
        for series in case["input_series"]:
            name, labels = series_names(series["series"])
            if "le" in labels:
                assert labels["le"] in exposition.le_values[name], (
                    f"{case['name']}: {name} has no bucket {labels['le']}"
                )


# --- PrometheusRule and kustomize ----------------------------------------------


def test_prometheus_rule_groups_equal(rule_data: Object) -> None:
    resource = load_yaml(PROMETHEUS_RULE)
    assert resource["spec"]["groups"] == rule_data["groups"]


def test_prometheus_rule_generated() -> None:
    assert PROMETHEUS_RULE.read_text() == render_prometheus_rule(), (
        "prometheusrule.yaml is out of date; run: uv run python tests/unit/test_monitoring.py --write"
    )


def test_kustomize_renders_monitoring() -> None:
    result = run([find_kubectl(), "kustomize", OVERLAY])
    assert result.returncode == 0, f"kubectl kustomize {OVERLAY} failed:\n{result.stderr}"
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("monitoring.coreos.com/v1", "ServiceMonitor", "imgcache") in kinds
    assert ("monitoring.coreos.com/v1", "PrometheusRule", "imgcache") in kinds


# --- Grafana dashboard ---------------------------------------------------------


def test_dashboard_datasource_variable(dashboard: Object) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_dashboard_schema_version(dashboard: Object) -> None:
    assert dashboard["schemaVersion"] >= 39


def test_dashboard_panels_have_datasource(dashboard: Object) -> None:
    for panel in dashboard_panels(dashboard):
        assert panel.get("datasource", {}).get("uid") == "${datasource}", f"panel {panel['title']!r}"


def test_dashboard_panels_have_targets(dashboard: Object) -> None:
    for panel in dashboard_panels(dashboard):
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"


def test_dashboard_targets_have_datasource(dashboard: Object) -> None:
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", f"panel {panel['title']!r}"


def test_dashboard_uses_exported_names(dashboard: Object, exposition: Exposition) -> None:
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            names = promql_names(target["expr"])
            legend_labels = re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", target.get("legendFormat", ""))
            names.labels |= set(legend_labels)
            assert unknown_names(names, exposition) == [], f"panel {panel['title']!r}: {target['expr']}"


# Values for the Grafana variables, so that promtool can parse the expressions.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": "imgcache-system", "$registry": ".*"}


def test_dashboard_promql_valid(dashboard: Object, tmp_path: Path) -> None:
    recording = []
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            recording.append({"record": f"dashboard:panel_{panel['id']}:{target['refId']}", "expr": expr})
    rules_file = tmp_path / "dashboard-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    result = run([find_promtool(), "check", "rules", rules_file])
    assert result.returncode == 0, f"promtool rejected a dashboard expression:\n{result.stdout}{result.stderr}"


def test_dashboard_variables_use_exported_names(dashboard: Object, exposition: Exposition) -> None:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        names = label_values_names(variable["query"]["query"])
        assert unknown_names(names, exposition) == [], f"variable {variable['name']}"


DASHBOARD_TOPICS = {
    "imgcache_pull_duration_seconds_bucket",
    "imgcache_pull_duration_including_waiting_seconds_bucket",
    "imgcache_pull_already_present_total",
    "imgcache_pull_image_size_bytes_bucket",
    "imgcache_pull_failures_total",
    "imgcache_registry_throttled_total",
    "imgcache_prepull_queue_depth",
    "imgcache_prepull_inflight_pods",
    "imgcache_registry_rate_limit",
    "imgcache_node_warmup_seconds_bucket",
    "imgcache_nodes",
    "imgcache_catalogue_images",
    "imgcache_catalogue_invalid_entries",
    "imgcache_watch_restarts_total",
    "imgcache_api_errors_total",
    "imgcache_leader",
}


def test_dashboard_covers_metrics(dashboard: Object) -> None:
    used: set[str] = set()
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            used |= promql_names(target["expr"]).metrics
    assert DASHBOARD_TOPICS - used == set()


def test_dashboard_quantiles(dashboard: Object) -> None:
    exprs = [t["expr"] for p in dashboard_panels(dashboard) for t in p["targets"]]
    for metric in ("imgcache_pull_duration_seconds_bucket", "imgcache_pull_duration_including_waiting_seconds_bucket"):
        quantiles = {q for e in exprs if metric + "{" in e for q in re.findall(r"histogram_quantile\(([0-9.]+)", e)}
        assert quantiles == {"0.5", "0.9", "0.99"}, metric


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/unit/test_monitoring.py --write")
    PROMETHEUS_RULE.write_text(render_prometheus_rule())
    print(f"wrote {PROMETHEUS_RULE.relative_to(REPO)}")
