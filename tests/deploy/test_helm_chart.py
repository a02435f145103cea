"""The Helm chart, rendered and linted without a helm binary (helm-python-sdk: Helm's Go SDK
as a shared library), for the default, GPU and CPU-only values; every manifest validated
against the Kubernetes schemas bundled with kubernetes-validate."""

from __future__ import annotations

import json
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from xaiserve.gateway.settings import Settings, env_var

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "xaiserve"
VALUES = {
    "default": None,
    "gpu": CHART / "values-gpu.yaml",
    "cpu": CHART / "values-cpu.yaml",
}
RELEASE, NAMESPACE = "xai", "ml"
#: The chart's minimum (Chart.yaml kubeVersion) and the newest schemas bundled.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
GPU = "nvidia.com/gpu"


def _values(name: str) -> dict[str, Any] | None:
    path = VALUES[name]
    return None if path is None else yaml.safe_load(path.read_text())


@cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    """Every object the chart renders with the named values."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(_values(name), name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return tuple(objects)


def _one(objects: tuple[dict[str, Any], ...], kind: str, component: str) -> dict[str, Any]:
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, (kind, component, len(found))
    return found[0]


def _pod(objects: tuple[dict[str, Any], ...], component: str) -> dict[str, Any]:
    return _one(objects, "Deployment", component)["spec"]["template"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod["spec"]["containers"] + pod["spec"].get("initContainers", [])


VALUE_SETS = pytest.mark.parametrize("values", list(VALUES))


def test_the_sdk_renders_without_a_helm_binary(tmp_path: Path) -> None:
    """The wheel carries Helm's Go SDK as a shared library: no helm on PATH, nothing fetched."""
    library = Path(helm.library_path)
    assert library.name.startswith("libhelm_c") and Path(helm.__file__).parent in library.parents
    script = (
        "import helm_python as h\n"
        f"with h.Chart.load({str(CHART)!r}) as c:\n"
        "    print(len(c.render(None, name='x', namespace='y')))\n"
    )
    import subprocess
    import sys

    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": str(empty), "HOME": str(tmp_path)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 5
    assert helm.helm_sdk_version().startswith("v4.")


@VALUE_SETS
def test_lint_and_schema(values: str) -> None:
    report = helm.lint(
        CHART,
        _values(values),
        strict=True,
        namespace=NAMESPACE,
        kube_version="v" + KUBE_VERSIONS[-1],
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], report
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(_values(values))


@pytest.mark.parametrize(
    "bad",
    [
        {"modelStore": {"source": "s3"}},
        {"modelStore": {"source": "pvc"}},  # no claim name
        {"securityContext": {"runAsUser": 0, "runAsGroup": 0}},
        {"gateway": {"env": {"PATH": "/tmp"}}},
        {"torchserve": {"models": []}},
        {"torchserve": {"gpu": {"count": 0}}},
        {"tpyo": True},
    ],
)
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)


@VALUE_SETS
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_is_valid_kubernetes(values: str, kube_version: str) -> None:
    objects = rendered(values)
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # no bundled schema: checked in test_service_monitor
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}")


def test_rendered_objects() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered("gpu"))
    assert kinds == [
        ("ConfigMap", "xai-xaiserve-dashboard"),
        ("ConfigMap", "xai-xaiserve-torchserve"),
        ("Deployment", "xai-xaiserve-gateway"),
        ("Deployment", "xai-xaiserve-torchserve"),
        ("HorizontalPodAutoscaler", "xai-xaiserve-gateway"),
        ("NetworkPolicy", "xai-xaiserve-gateway"),
        ("NetworkPolicy", "xai-xaiserve-torchserve"),
        ("PodDisruptionBudget", "xai-xaiserve-gateway"),
        ("PodDisruptionBudget", "xai-xaiserve-torchserve"),
        ("Secret", "xai-xaiserve-torchserve-key"),
        ("Service", "xai-xaiserve-gateway"),
        ("Service", "xai-xaiserve-torchserve"),
        ("ServiceAccount", "xai-xaiserve"),
        ("ServiceMonitor", "xai-xaiserve"),
    ]


@pytest.mark.parametrize("values", ["default", "gpu"])
def test_gpu_settings_land_on_torchserve_only(values: str) -> None:
    objects = rendered(values)
    wanted = _values(values) or {}
    count = wanted.get("torchserve", {}).get("gpu", {}).get("count", 1)
    torchserve = _pod(objects, "torchserve")
    spec = torchserve["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"][GPU] == count
    assert container["image"].endswith("-gpu")
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    config = _one(objects, "ConfigMap", "torchserve")["data"]["config.properties"]
    assert f"number_of_gpu={count}" in config.splitlines()

    gateway = _pod(objects, "gateway")
    assert "runtimeClassName" not in gateway["spec"]
    assert "tolerations" not in gateway["spec"] and "nodeSelector" not in gateway["spec"]
    for c in _containers(gateway) + torchserve["spec"].get("initContainers", []):
        assert GPU not in json.dumps(c["resources"]), c["name"]
        assert c["image"].endswith("-cpu"), c["name"]


def test_cpu_values_ask_for_no_gpu() -> None:
    objects = rendered("cpu")
    assert GPU not in json.dumps([o for o in objects if o["kind"] != "ConfigMap"])
    spec = _pod(objects, "torchserve")["spec"]
    assert "runtimeClassName" not in spec and "tolerations" not in spec
    assert "nodeSelector" not in spec
    assert spec["containers"][0]["image"].endswith("-cpu")
    config = _one(objects, "ConfigMap", "torchserve")["data"]["config.properties"]
    assert "number_of_gpu=0" in config.splitlines()


@VALUE_SETS
def test_hardened_containers(values: str) -> None:
    objects = rendered(values)
    for component in ("gateway", "torchserve"):
        pod = _pod(objects, component)
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in _containers(pod):
            context = c["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, c["name"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]
            assert context["allowPrivilegeEscalation"] is False, c["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, c["name"]  # the only writable places are volumes


def test_probes() -> None:
    objects = rendered("default")
    (gateway,) = _pod(objects, "gateway")["spec"]["containers"]
    port = gateway["ports"][0]["containerPort"]
    assert gateway["livenessProbe"]["grpc"] == {"port": port}
    assert gateway["readinessProbe"]["grpc"] == {
        "port": port,
        "service": "xaiserve.v1.ExplanationService",
    }
    (torchserve,) = _pod(objects, "torchserve")["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert torchserve[probe]["httpGet"] == {"path": "/ping", "port": "http-inference"}
    startup = torchserve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model loading


def test_services_select_their_pods_and_expose_only_what_they_should() -> None:
    objects = rendered("default")
    for component, ports in (
        ("gateway", {"grpc", "metrics"}),
        ("torchserve", {"grpc-inference", "metrics"}),
    ):
        service = _one(objects, "Service", component)
        pod = _pod(objects, component)
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        named = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {p["name"] for p in service["spec"]["ports"]} == ports
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
    hpa = _one(objects, "HorizontalPodAutoscaler", "gateway")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == _one(objects, "Deployment", "gateway")["metadata"]["name"]
    )
    assert "replicas" not in _one(objects, "Deployment", "gateway")["spec"]  # the HPA owns it
    for component in ("gateway", "torchserve"):
        pdb = _one(objects, "PodDisruptionBudget", component)
        labels = _pod(objects, component)["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_network_policy_lets_only_the_gateway_reach_inference() -> None:
    objects = rendered("default")
    policy = _one(objects, "NetworkPolicy", "torchserve")
    gateway_labels = _pod(objects, "gateway")["metadata"]["labels"]
    torchserve_labels = _pod(objects, "torchserve")["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= torchserve_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["torchserve"]["ports"]
    reachable: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without 'from' admits everyone"
        for port in rule["ports"]:
            reachable.setdefault(port["port"], []).extend(rule["from"])
    assert set(reachable) == {values["grpcInference"], values["metrics"]}
    (peer,) = reachable[values["grpcInference"]]
    assert set(peer) == {"podSelector"}  # same namespace, gateway pods only
    assert peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= torchserve_labels.items()
    config = _one(objects, "ConfigMap", "torchserve")["data"]["config.properties"]
    lines = set(config.splitlines())
    assert f"management_address=http://127.0.0.1:{values['management']}" in lines
    assert "grpc_management_address=127.0.0.1" in lines
    assert "metrics_mode=prometheus" in lines


def test_key_secret_is_mounted_by_the_gateway_and_torchserve_only() -> None:
    objects = rendered("default")
    secret = next(o for o in objects if o["kind"] == "Secret")
    name = secret["metadata"]["name"]
    users = set()
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        volumes = obj["spec"]["template"]["spec"]["volumes"]
        if any(v.get("secret", {}).get("secretName") == name for v in volumes):
            users.add(obj["metadata"]["labels"]["app.kubernetes.io/component"])
    assert users == {"gateway", "torchserve"}
    import base64

    key_file = json.loads(base64.b64decode(secret["data"]["key_file.json"]))
    assert len(key_file["inference"]["key"]) == 32


def test_gateway_environment_names_real_settings() -> None:
    known = {env_var(f.name) for f in fields(Settings)}
    for values in VALUES:
        (gateway,) = _pod(rendered(values), "gateway")["spec"]["containers"]
        names = {e["name"] for e in gateway["env"]}
        assert names <= known, sorted(names - known)
        env = {e["name"]: e["value"] for e in gateway["env"]}
        assert env["XAISERVE_BACKEND"] == "torchserve"
        assert env["XAISERVE_TORCHSERVE_TARGET"] == "xai-xaiserve-torchserve:7070"
        assert int(env["XAISERVE_METRICS_PORT"]) == gateway["ports"][1]["containerPort"]


def test_service_monitor_scrapes_both_metrics_ports() -> None:
    objects = rendered("default")
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert {e["port"] for e in spec["endpoints"]} == {"metrics"}
    assert all(e["path"] == "/metrics" and e["interval"] for e in spec["endpoints"])
    selected = []
    for service in (o for o in objects if o["kind"] == "Service"):
        labels = service["metadata"]["labels"]
        if not spec["selector"]["matchLabels"].items() <= labels.items():
            continue
        if all(labels.get(e["key"]) in e["values"] for e in spec["selector"]["matchExpressions"]):
            selected.append(labels["app.kubernetes.io/component"])
            assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert sorted(selected) == ["gateway", "torchserve"]


def test_dashboard_configmap_carries_the_repository_dashboard() -> None:
    repo = (ROOT / "deploy" / "grafana" / "xaiserve.json").read_bytes()
    assert (CHART / "dashboards" / "xaiserve.json").read_bytes() == repo, (
        "copy deploy/grafana/xaiserve.json to helm/xaiserve/dashboards/"
    )
    configmap = next(o for o in rendered("default") if o["metadata"]["name"].endswith("-dashboard"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["xaiserve.json"]) == json.loads(repo)


def test_model_store_from_a_pvc_is_read_only() -> None:
    spec = _pod(rendered("gpu"), "torchserve")["spec"]
    assert "initContainers" not in spec
    volume = next(v for v in spec["volumes"] if v["name"] == "model-store")
    assert volume["persistentVolumeClaim"] == {
        "claimName": "xaiserve-model-archives",
        "readOnly": True,
    }
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model-store")
    assert mount["readOnly"] is True
    default = _pod(rendered("default"), "torchserve")["spec"]
    assert [c["name"] for c in default["initContainers"]] == ["model-store"]
