"""Static checks of the install manifests under manifests/.

Each variant is rendered with ``kubectl kustomize`` and checked as data. No cluster
is needed. The CRD's image pattern is checked with Python's ``re`` against tables of
valid and invalid references.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
BASE = MANIFESTS / "base"
NAMESPACE = "imgcache-system"
CONTROLLER_SELECTOR = {
    "app.kubernetes.io/name": "imgcache",
    "app.kubernetes.io/component": "controller",
}
DIGEST = "sha256:" + "0123456789abcdef" * 4

Object = dict[str, Any]


def find_kubectl() -> Path:
    """Return the repository's pinned kubectl, or the system one."""
    for candidate in (REPO / ".cluster" / "bin" / "kubectl", Path("/usr/bin/kubectl")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "kubectl not found at .cluster/bin/kubectl or /usr/bin/kubectl; build it with tests/controlplane/build.sh"
    )


def render(directory: Path) -> list[Object]:
    """Render one kustomization with kubectl kustomize and parse its objects."""
    result = subprocess.run(
        [str(find_kubectl()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[Object], kind: str, name: str) -> Object:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Object]]:
    """Rendered objects of the base, each overlay, and the base with the component."""
    # kustomize accepts only relative paths to bases and components.
    with_component = tmp_path_factory.mktemp("cluster-events")
    (with_component / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS, with_component)],
                "components": [os.path.relpath(MANIFESTS / "overlays" / "cluster-events", with_component)],
            }
        )
    )
    return {
        "root": render(MANIFESTS),
        "base": render(BASE),
        "aws": render(MANIFESTS / "overlays" / "aws"),
        "monitoring": render(MANIFESTS / "overlays" / "monitoring"),
        "cluster-events": render(with_component),
    }


@pytest.fixture(scope="module")
def base(variants: dict[str, list[Object]]) -> list[Object]:
    return variants["root"]


@pytest.fixture(scope="module")
def crd(base: list[Object]) -> Object:
    return find(base, "CustomResourceDefinition", "imagecaches.imgcache.io")


@pytest.fixture(scope="module")
def crd_schema(crd: Object) -> Object:
    (version,) = crd["spec"]["versions"]
    schema: Object = version["schema"]["openAPIV3Schema"]
    return schema


@pytest.fixture(scope="module")
def image_pattern(crd_schema: Object) -> str:
    items = crd_schema["properties"]["spec"]["properties"]["images"]["items"]
    pattern: str = items["properties"]["image"]["pattern"]
    return pattern


@pytest.fixture(scope="module")
def deployment(base: list[Object]) -> Object:
    return find(base, "Deployment", "imgcache")


def controller_container(deployment: Object) -> Object:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["imgcache"]
    container: Object = containers[0]
    return container


# --- Layout -------------------------------------------------------------------


def test_base_object_inventory(base: list[Object]) -> None:
    found = {(o["kind"], o["metadata"]["name"]) for o in base}
    assert found == {
        ("Namespace", NAMESPACE),
        ("CustomResourceDefinition", "imagecaches.imgcache.io"),
        ("ServiceAccount", "imgcache"),
        ("ClusterRole", "imgcache"),
        ("ClusterRoleBinding", "imgcache"),
        ("Role", "imgcache"),
        ("RoleBinding", "imgcache"),
        ("Deployment", "imgcache"),
        ("Service", "imgcache-metrics"),
        ("PodDisruptionBudget", "imgcache"),
        ("NetworkPolicy", "imgcache"),
    }
    assert len(base) == len(found)


def test_root_equals_base(variants: dict[str, list[Object]]) -> None:
    assert variants["root"] == variants["base"]


def test_base_lists_every_file() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = {BASE / path for path in kustomization["resources"]}
    on_disk = {p for p in BASE.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk == listed


def test_namespaced_objects_in_namespace(variants: dict[str, list[Object]]) -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for name, objects in variants.items():
        for obj in objects:
            if obj["kind"] in cluster_scoped:
                assert "namespace" not in obj["metadata"], f"{name}: {obj['kind']}"
            else:
                assert obj["metadata"].get("namespace") == NAMESPACE, f"{name}: {obj['kind']}"


def test_install_labels(variants: dict[str, list[Object]]) -> None:
    for name, objects in variants.items():
        for obj in objects:
            labels = obj["metadata"].get("labels", {})
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
            assert labels.get("app.kubernetes.io/name") == "imgcache", where
            assert labels.get("app.kubernetes.io/part-of") == "imgcache", where
            # imgcache treats managed-by: imgcache objects as its own.
            assert "app.kubernetes.io/managed-by" not in labels, where


# --- Namespace ----------------------------------------------------------------


def test_namespace_pod_security_labels(base: list[Object]) -> None:
    labels = find(base, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "latest"


def test_namespace_explains_privileged() -> None:
    text = (BASE / "namespace.yaml").read_text()
    assert "hostNetwork" in text
    assert "--host-network=false" in text


# --- RBAC ---------------------------------------------------------------------

RBAC_FIELDS = ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs")

EXPECTED_CLUSTER_ROLE = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["imgcache.io"], "resources": ["imagecaches"], "verbs": ["list", "watch"]},
    {
        "apiGroups": ["imgcache.io"],
        "resources": ["imagecaches/status"],
        "verbs": ["patch"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
EXPECTED_ROLE = [
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "create", "delete", "deletecollection"],
    },
    {
        "apiGroups": ["apps"],
        "resources": ["daemonsets"],
        "verbs": ["list", "watch", "create", "patch", "delete"],
    },
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": ["imgcache-leader"],
        "verbs": ["get", "update"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]},
]
EXPECTED_CLUSTER_EVENTS = [
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]},
]


def rbac_roles(objects: list[Object]) -> list[Object]:
    return [o for o in objects if o["kind"] in ("Role", "ClusterRole")]


@pytest.mark.parametrize("variant", ["root", "aws", "cluster-events"])
def test_rbac_has_no_wildcards(variants: dict[str, list[Object]], variant: str) -> None:
    roles = rbac_roles(variants[variant])
    assert roles
    for role in roles:
        assert "aggregationRule" not in role
        for rule in role["rules"]:
            for field in RBAC_FIELDS:
                for value in rule.get(field, []):
                    assert "*" not in value, f"{role['kind']}/{role['metadata']['name']}: {rule}"


def test_cluster_role_rules(base: list[Object]) -> None:
    assert find(base, "ClusterRole", "imgcache")["rules"] == EXPECTED_CLUSTER_ROLE


def test_role_rules(base: list[Object]) -> None:
    role = find(base, "Role", "imgcache")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == EXPECTED_ROLE


def test_bindings_name_service_account(variants: dict[str, list[Object]]) -> None:
    subject = {"kind": "ServiceAccount", "name": "imgcache", "namespace": NAMESPACE}
    bindings = {
        ("ClusterRoleBinding", "imgcache"): ("ClusterRole", "imgcache"),
        ("RoleBinding", "imgcache"): ("Role", "imgcache"),
        ("ClusterRoleBinding", "imgcache-cluster-events"): (
            "ClusterRole",
            "imgcache-cluster-events",
        ),
    }
    objects = variants["cluster-events"]
    for (kind, name), (role_kind, role_name) in bindings.items():
        binding = find(objects, kind, name)
        assert binding["subjects"] == [subject]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": role_name,
        }
        find(objects, role_kind, role_name)


def test_rbac_rules_have_comments() -> None:
    rbac_files = [
        path
        for path in MANIFESTS.rglob("*.yaml")
        if re.search(r"^kind: (Cluster)?Role$", path.read_text(), re.MULTILINE)
    ]
    assert len(rbac_files) >= 3, rbac_files
    for path in rbac_files:
        lines = path.read_text().splitlines()
        rule_count = sum(
            len(doc["rules"])
            for doc in yaml.safe_load_all(path.read_text())
            if doc and doc["kind"] in ("Role", "ClusterRole")
        )
        rule_starts = [i for i, line in enumerate(lines) if re.match(r"^\s*- apiGroups:", line)]
        assert len(rule_starts) == rule_count, f"{path}: every rule must start with apiGroups"
        for index in rule_starts:
            previous = lines[index - 1].strip()
            assert previous.startswith("#"), f"{path.relative_to(REPO)}:{index + 1}: RBAC rule has no comment above it"


def test_cluster_events_only_in_component(variants: dict[str, list[Object]]) -> None:
    for variant in ("root", "aws", "monitoring"):
        names = {o["metadata"]["name"] for o in variants[variant]}
        assert "imgcache-cluster-events" not in names, variant
    objects = variants["cluster-events"]
    role = find(objects, "ClusterRole", "imgcache-cluster-events")
    assert role["rules"] == EXPECTED_CLUSTER_EVENTS
    args = controller_container(find(objects, "Deployment", "imgcache"))["args"]
    assert "--watch-cluster-events=true" in args


# --- Deployment ---------------------------------------------------------------


def test_deployment_replicas_and_account(deployment: Object) -> None:
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == CONTROLLER_SELECTOR
    assert spec["template"]["metadata"]["labels"].items() >= CONTROLLER_SELECTOR.items()
    assert pod["serviceAccountName"] == "imgcache"
    assert pod["automountServiceAccountToken"] is True
    assert not pod.get("hostNetwork", False)
    assert 10 <= pod["terminationGracePeriodSeconds"] <= 60


def test_deployment_pod_security(deployment: Object) -> None:
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 65532
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_deployment_container_security(deployment: Object) -> None:
    security = controller_container(deployment)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 65532
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_deployment_volumes_restricted(deployment: Object) -> None:
    # The restricted Pod Security level allows these volume types.
    allowed = {"emptyDir", "configMap", "secret", "projected", "downwardAPI"}
    for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
        assert set(volume) - {"name"} <= allowed, volume


def test_deployment_command_and_env(deployment: Object) -> None:
    container = controller_container(deployment)
    assert container["image"] == "ghcr.io/imgcache/imgcache:0.1.0"
    assert "command" not in container, "the image ENTRYPOINT is imgcache"
    assert container["args"][0] == "run"
    assert "--namespace=$(IMGCACHE_NAMESPACE)" in container["args"]
    from_fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert from_fields == {"IMGCACHE_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    assert values == {"IMGCACHE_HELPER_IMAGE": "ghcr.io/imgcache/imgcache-helper:0.1.0"}


def test_helper_image_matches_controller_version(deployment: Object) -> None:
    container = controller_container(deployment)
    helper = next(e["value"] for e in container["env"] if e["name"] == "IMGCACHE_HELPER_IMAGE")
    controller_repository, _, controller_tag = container["image"].rpartition(":")
    helper_repository, _, helper_tag = helper.rpartition(":")

    assert helper_repository == f"{controller_repository}-helper"
    assert helper_tag == controller_tag


@pytest.mark.parametrize("variant", ["root", "aws", "cluster-events"])
def test_deployment_args_parse(variants: dict[str, list[Object]], variant: str) -> None:
    from imgcache import config

    container = controller_container(find(variants[variant], "Deployment", "imgcache"))
    args = [arg.replace("$(IMGCACHE_NAMESPACE)", NAMESPACE) for arg in container["args"]]
    assert args[0] == "run"
    settings = config.load(args[1:], {"POD_NAME": "imgcache-0"})
    assert settings.namespace == NAMESPACE
    assert settings.http_port == container["ports"][0]["containerPort"]
    # The Role grants get and update on this Lease name only.
    assert settings.lease_name == "imgcache-leader"


def test_deployment_ports_and_probes(deployment: Object) -> None:
    container = controller_container(deployment)
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_deployment_resources(deployment: Object) -> None:
    resources = controller_container(deployment)["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert resources["limits"] == {"memory": "256Mi"}


def test_deployment_spreads_replicas(deployment: Object) -> None:
    pod = deployment["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    (preferred,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    term = preferred["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == CONTROLLER_SELECTOR
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == CONTROLLER_SELECTOR


# --- Service, PodDisruptionBudget, NetworkPolicy ------------------------------


def test_selectors_match_only_controller(base: list[Object]) -> None:
    # imgcache's own pods live in the same namespace, so every selector needs the
    # component label as well as the name.
    service = find(base, "Service", "imgcache-metrics")
    budget = find(base, "PodDisruptionBudget", "imgcache")
    policy = find(base, "NetworkPolicy", "imgcache")
    assert service["spec"]["selector"] == CONTROLLER_SELECTOR
    assert budget["spec"]["selector"]["matchLabels"] == CONTROLLER_SELECTOR
    assert policy["spec"]["podSelector"]["matchLabels"] == CONTROLLER_SELECTOR


def test_metrics_service_port(base: list[Object]) -> None:
    service = find(base, "Service", "imgcache-metrics")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]


def test_pod_disruption_budget(base: list[Object]) -> None:
    assert find(base, "PodDisruptionBudget", "imgcache")["spec"]["minAvailable"] == 1


def test_network_policy_ingress_only(base: list[Object]) -> None:
    spec = find(base, "NetworkPolicy", "imgcache")["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert "egress" not in spec
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [{"namespaceSelector": {}}]


# --- CRD ----------------------------------------------------------------------


def test_crd_names_and_scope(crd: Object) -> None:
    spec = crd["spec"]
    assert spec["group"] == "imgcache.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "ImageCache"
    assert spec["names"]["plural"] == "imagecaches"
    assert spec["names"]["singular"] == "imagecache"
    assert spec["names"]["shortNames"] == ["imgc"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


def test_crd_printer_columns(crd: Object) -> None:
    (version,) = crd["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Images", "Ready", "Reason", "Age"]
    assert columns["Images"]["jsonPath"] == ".status.imageCount"
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Reason"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert columns["Reason"]["priority"] == 1
    assert columns["Age"]["jsonPath"] == ".metadata.creationTimestamp"


def test_crd_schema_is_structural(crd_schema: Object) -> None:
    def visit(node: Object, path: str) -> None:
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if path != "$.metadata":
            assert "type" in node, f"{path} has no type"
        for name, child in node.get("properties", {}).items():
            visit(child, f"{path}.{name}")
        if "items" in node:
            visit(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            visit(node["additionalProperties"], f"{path}{{}}")

    visit(crd_schema, "$")


def test_crd_images_limits(crd_schema: Object) -> None:
    spec = crd_schema["properties"]["spec"]
    assert spec["required"] == ["images"]
    images = spec["properties"]["images"]
    assert images["minItems"] == 1
    assert images["maxItems"] == 256
    # Duplicate image strings are rejected by the map list key.
    assert images["x-kubernetes-list-type"] == "map"
    assert images["x-kubernetes-list-map-keys"] == ["image"]
    item = images["items"]
    assert item["required"] == ["image"]
    image = item["properties"]["image"]
    assert image["type"] == "string"
    assert image["minLength"] == 1
    assert image["maxLength"] == 512


def test_crd_image_entry_defaults(crd_schema: Object) -> None:
    fields = crd_schema["properties"]["spec"]["properties"]["images"]["items"]["properties"]
    assert set(fields) == {"image", "pin", "prepull", "platforms", "pullThroughCache"}
    for name in ("pin", "prepull", "pullThroughCache"):
        assert fields[name] == fields[name] | {"type": "boolean", "default": True}, name
    platforms = fields["platforms"]
    assert platforms["type"] == "array"
    assert platforms["maxItems"] == 16
    assert platforms["x-kubernetes-list-type"] == "set"
    assert platforms["items"]["pattern"] == "^[a-z0-9]+/[a-z0-9]+(/[a-z0-9]+)?$"


def test_crd_spec_fields(crd_schema: Object) -> None:
    assert crd_schema["required"] == ["spec"]
    spec = crd_schema["properties"]["spec"]["properties"]
    assert set(spec) == {"images", "nodeSelector", "pullThroughCache"}
    assert spec["nodeSelector"]["type"] == "object"
    assert spec["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert spec["pullThroughCache"]["type"] == "boolean"
    assert spec["pullThroughCache"]["default"] is True


def test_crd_status_fields(crd_schema: Object) -> None:
    status = crd_schema["properties"]["status"]["properties"]
    assert set(status) == {"observedGeneration", "conditions", "imageCount", "images"}
    assert status["observedGeneration"]["type"] == "integer"
    assert status["observedGeneration"]["format"] == "int64"
    assert status["imageCount"]["type"] == "integer"

    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    condition = conditions["items"]
    assert set(condition["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert set(condition["required"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
    }
    assert condition["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert condition["properties"]["lastTransitionTime"]["format"] == "date-time"

    entry = status["images"]["items"]["properties"]
    assert set(entry) == {"image", "resolved", "cached", "pending", "failed", "error"}
    for name in ("cached", "pending", "failed"):
        assert entry[name]["type"] == "integer", name
    for name in ("image", "resolved", "error"):
        assert entry[name]["type"] == "string", name


# --- Image reference pattern --------------------------------------------------

VALID_REFERENCES = [
    "nginx",
    "nginx:1.27",
    "library/nginx",
    f"docker.io/library/nginx@{DIGEST}",
    f"nginx:1.27@{DIGEST}",
    f"localhost:5000/team/app:v1@{DIGEST}",
    "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/coredns:v1.11.3-eksbuild.2",
    "ghcr.io/open-telemetry/opentelemetry-collector-releases/opentelemetry-collector-contrib:0.114.0",
    "registry.example.com:5000/a/b/c/d:tag",
    "[::1]:5000/app:v1",
    "Registry.Example.COM/app",
    "team__app/my_image.name",
    "my--app",
    "a",
    "app:" + "t" * 128,
    "app:_Latest.v1-rc",
    "app@sha512:" + "ab" * 64,
    "app@sha256+b64u.x:" + "f" * 32,
]

INVALID_REFERENCES = [
    "",
    " nginx",
    "nginx ",
    "nginx latest",
    "nginx: 1.27",
    "Nginx",
    "NGINX:1.27",
    "docker.io/Library/nginx",
    "docker.io/library/Nginx:1.27",
    "-nginx",
    "nginx-",
    "nginx.",
    "nginx/",
    "/nginx",
    "nginx//app",
    "a___b",
    "a._b",
    "nginx:",
    "nginx:-rc1",
    "nginx:.rc1",
    "nginx:" + "t" * 129,
    "nginx:tàg",
    "nginx@",
    "nginx@sha256",
    "nginx@sha256:abc",
    "nginx@sha256:" + "g" * 64,
    "nginx@1sha:" + "a" * 64,
    "https://docker.io/nginx",
    "registry.example.com:port/app",
    "-registry.example.com/app",
    "nginx\n",
    "nginx:1.27\nx",
]


def test_image_pattern_is_anchored(image_pattern: str) -> None:
    # Kubernetes accepts a value if the pattern matches anywhere in it, so the
    # pattern must be anchored.
    assert image_pattern.startswith("^")
    assert image_pattern.endswith("$")


def test_image_pattern_uses_common_syntax(image_pattern: str) -> None:
    # RE2 lacks these constructs or reads them differently from Python's re. In
    # Python, class shorthands such as \w also match non-ASCII characters.
    for construct in (r"\w", r"\d", r"\s", r"\b", "(?=", "(?!", "(?<", "(?>", "*+", "++", "?+"):
        assert construct not in image_pattern, construct
    assert not re.search(r"\\[1-9]", image_pattern), "backreference"


@pytest.mark.parametrize("reference", VALID_REFERENCES)
def test_image_pattern_accepts(image_pattern: str, reference: str) -> None:
    assert re.fullmatch(image_pattern, reference), reference


@pytest.mark.parametrize("reference", INVALID_REFERENCES)
def test_image_pattern_rejects(image_pattern: str, reference: str) -> None:
    assert not re.fullmatch(image_pattern, reference), reference


# --- Example ------------------------------------------------------------------


def test_example_matches_schema(crd: Object, crd_schema: Object, image_pattern: str) -> None:
    (example,) = [doc for doc in yaml.safe_load_all((MANIFESTS / "examples" / "imagecache.yaml").read_text()) if doc]
    assert example["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
    assert example["kind"] == crd["spec"]["names"]["kind"]
    jsonschema.validate(example, crd_schema)
    images = [entry["image"] for entry in example["spec"]["images"]]
    assert len(images) == len(set(images))
    for image in images:
        assert re.fullmatch(image_pattern, image), image


def test_schema_rejects_invalid_spec(crd_schema: Object) -> None:
    def spec_with(**fields: Any) -> Object:
        return {"apiVersion": "imgcache.io/v1alpha1", "kind": "ImageCache", "spec": fields}

    invalid = [
        spec_with(),
        spec_with(images=[]),
        spec_with(images=[{"image": f"app{i}"} for i in range(257)]),
        spec_with(images=[{"pin": True}]),
        spec_with(images=[{"image": "Nginx"}]),
        spec_with(images=[{"image": "a" * 513}]),
        spec_with(images=[{"image": "nginx", "platforms": ["linux"]}]),
        spec_with(images=[{"image": "nginx", "platforms": ["linux/amd64"] * 17}]),
        spec_with(images=[{"image": "nginx", "pin": "yes"}]),
        spec_with(images=[{"image": "nginx"}], nodeSelector={"zone": 1}),
    ]
    for instance in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(instance, crd_schema)


# --- Overlays -----------------------------------------------------------------


def test_aws_overlay(variants: dict[str, list[Object]]) -> None:
    objects = variants["aws"]
    container = controller_container(find(objects, "Deployment", "imgcache"))
    assert container["args"][-1] == "--pull-through-cache=true"
    account = find(objects, "ServiceAccount", "imgcache")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/imgcache"
    }
    base_kinds = sorted((o["kind"], o["metadata"]["name"]) for o in variants["root"])
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == base_kinds


def test_monitoring_overlay(variants: dict[str, list[Object]], base: list[Object]) -> None:
    monitor = find(variants["monitoring"], "ServiceMonitor", "imgcache")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert {o["kind"] for o in variants["monitoring"]} == {"ServiceMonitor", "PrometheusRule"}
    service = find(base, "Service", "imgcache-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert service["metadata"]["labels"].items() >= selector.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_monitoring_kustomization_lists_servicemonitor() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "overlays" / "monitoring" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["servicemonitor.yaml", "prometheusrule.yaml"]
