"""The Kubernetes and KServe manifests of deploy/, checked without a cluster.

.ci/deploy-check.sh renders every overlay with `kubectl kustomize` into
NIN_DEPLOY_RENDERED (one `<overlay>.yaml` each), starts a nin-serve the way
the manifests configure it (the base ConfigMap's settings, the KServe
runtime's arguments, a weights directory as KServe mounts one) on
NIN_BASE_URL (HTTP) and NIN_GRPC_ADDR (gRPC), and runs this file:

- every built-in kind validates strictly (unknown fields refused) against
  Kubernetes' own OpenAPI schemas, pinned at KUBERNETES_VERSION;
- the KServe resources validate against the OpenAPI schemas of KServe's
  CRDs (deploy/kserve/crds/, vendored at a pinned release), with every
  object closed to fields the schema does not declare;
- against the live server: every probe path answers on its port, the
  HPA's metric is among the series /metrics exports, every setting the
  ConfigMap passes is an option nin-serve has, and the model answers under
  the InferenceService's name;
- the image runs as the user the manifests name (runAsUser, runAsGroup),
  from the Dockerfile and, when NIN_IMAGE names a built image, from the
  image itself, with a read-only root filesystem and no capabilities.

What cannot be checked here (no cluster): scheduling, the GPU overlay on a
GPU, prometheus-adapter's query against a real Prometheus, KServe's
controller. Those are checked statically only.
"""

import copy
import gzip
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent.parent
DEPLOY = REPO / "deploy"
RENDERED = Path(os.environ.get("NIN_DEPLOY_RENDERED", REPO / "target" / "ci-tools" / "deploy"))
BASE_URL = os.environ.get("NIN_BASE_URL", "")
GRPC_ADDR = os.environ.get("NIN_GRPC_ADDR", "")
SERVE_BIN = os.environ.get("NIN_SERVE_BIN", str(REPO / "target" / "debug" / "nin-serve"))
IMAGE = os.environ.get("NIN_IMAGE", "")
KUBERNETES_VERSION = "1.33.0"
OVERLAYS = ["cpu", "gpu"]


def load_all(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    path = RENDERED / f"{request.param}.yaml"
    assert path.is_file(), f"{path} missing: run .ci/deploy-check.sh, which renders it"
    return request.param, load_all(path)


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def container(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def settings(docs):
    return one(docs, "ConfigMap")["data"]


def get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_every_overlay_renders_the_same_kinds(overlay):
    name, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "Service"], name
    # The selector and the pods' labels agree, as kustomize's labels make them.
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert one(docs, "Service")["spec"]["selector"] == selector
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector


def test_built_in_kinds_validate_strictly(overlay):
    name, docs = overlay
    for doc in docs + load_all(DEPLOY / "prometheus-adapter" / "rules.yaml"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_an_unknown_field(overlay):
    # So that the check above can fail: a misspelt field is an error.
    _, docs = overlay
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_pod_is_locked_down_and_sized(overlay):
    name, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    c = container(docs)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    resources = c["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS"
    if name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert c["image"] == "nin:cuda"
    else:
        assert c["image"] == "nin:cpu"
    # The kubelet waits for the preStop delay plus the server's own
    # shutdown timeout before it kills.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    shutdown_s = int(settings(docs)["NIN_SHUTDOWN_TIMEOUT_MS"]) / 1000
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + shutdown_s


def test_service_ports_name_their_protocols(overlay):
    _, docs = overlay
    ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert ports["http"]["appProtocol"] == "http"
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    container_ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert {name: container_ports[p["targetPort"]] for name, p in ports.items()} == {
        "http": 8080, "grpc": 8001}
    # The gRPC port the container declares is the one the server binds.
    assert settings(docs)["NIN_GRPC_ADDR"] == "0.0.0.0:8001"


# --- KServe -----------------------------------------------------------------


def crd_schema(file, api_version):
    with gzip.open(DEPLOY / "kserve" / "crds" / file, "rt") as f:
        crd = yaml.safe_load(f)
    version = api_version.split("/")[1]
    served = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served, f"{file} has no version {version}"
    return closed(served[0]["schema"]["openAPIV3Schema"])


def closed(schema):
    """The schema with every object that lists its properties closed to
    others (the API server would prune them silently), except where the CRD
    keeps unknown fields on purpose."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    # `metadata` is the API server's, not the CRD's.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


KSERVE = {
    "ServingRuntime": "serving.kserve.io_servingruntimes.yaml.gz",
    "InferenceService": "serving.kserve.io_inferenceservices.yaml.gz",
}


def kserve_docs():
    docs = []
    for path in sorted((DEPLOY / "kserve").glob("*.yaml")):
        docs += load_all(path)
    return {d["kind"]: d for d in docs}


def test_kserve_resources_match_kserve_s_own_schemas():
    docs = kserve_docs()
    assert sorted(docs) == sorted(KSERVE)
    for kind, file in KSERVE.items():
        jsonschema.validate(docs[kind], crd_schema(file, docs[kind]["apiVersion"]))


def test_kserve_schema_refuses_a_misspelt_field():
    service = copy.deepcopy(kserve_docs()["InferenceService"])
    model = service["spec"]["predictor"]["model"]
    model["storageURI"] = model.pop("storageUri")
    schema = crd_schema(KSERVE["InferenceService"], service["apiVersion"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, schema)


def test_the_inference_service_selects_the_runtime():
    docs = kserve_docs()
    runtime, service = docs["ServingRuntime"], docs["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    args = runtime["spec"]["containers"][0]["args"]
    # The image's entrypoint already has --addr: clap refuses it twice.
    assert not any(a.startswith("--addr") for a in args)
    assert "--weights=/mnt/models" in args


def kserve_args():
    """The runtime's arguments as KServe fills them in for the example."""
    docs = kserve_docs()
    name = docs["InferenceService"]["metadata"]["name"]
    args = docs["ServingRuntime"]["spec"]["containers"][0]["args"]
    return name, [a.replace("{{.Name}}", name) for a in args]


# --- the live server ----------------------------------------------------------


def live():
    if not BASE_URL:
        pytest.fail("NIN_BASE_URL is not set: run .ci/deploy-check.sh")
    return BASE_URL


def test_every_probe_answers_on_its_port(overlay):
    _, docs = overlay
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for kind in ["startupProbe", "readinessProbe", "livenessProbe"]:
        probe = c[kind]["httpGet"]
        assert ports[probe["port"]] == 8080, f"{kind} is not on the HTTP port"
        status, body = get(live() + probe["path"])
        assert status == 200, f"{kind} {probe['path']}: {status} {body!r}"


def test_the_grpc_port_accepts_connections():
    host, port = GRPC_ADDR.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        # The HTTP/2 connection preface; a gRPC server answers with a
        # SETTINGS frame (type 4).
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        frame = s.recv(9)
        assert len(frame) == 9 and frame[3] == 4, frame


def series_names(metrics_text):
    names = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_hpa_metric_is_a_series_the_server_exports(overlay):
    _, docs = overlay
    hpa = one(docs, "HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    status, body = get(live() + "/metrics")
    assert status == 200
    assert name in series_names(body.decode()), f"{name} is not on /metrics"
    # prometheus-adapter's rule serves exactly that series under that name.
    [rules] = load_all(DEPLOY / "prometheus-adapter" / "rules.yaml")
    [rule] = yaml.safe_load(rules["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["name"]["as"] == name


def test_every_setting_is_an_option_of_the_server(overlay):
    _, docs = overlay
    help_text = subprocess.run([SERVE_BIN, "--help"], capture_output=True, text=True,
                               check=True).stdout
    options = set(re.findall(r"env: (NIN_[A-Z_]+)", help_text))
    assert options, help_text
    for key in settings(docs):
        assert key in options or key == "RUST_LOG", f"{key} is not a nin-serve option"
    for env in container(docs)["env"]:
        assert env["name"] in options, env


def test_the_model_answers_under_the_inference_service_s_name():
    name, args = kserve_args()
    assert f"--model-name={name}" in args
    status, body = get(live() + f"/v2/models/{name}/ready")
    assert status == 200, body
    assert json.loads(body) == {"name": name, "ready": True}


# --- the image ----------------------------------------------------------------


def run_as(docs):
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    return pod["runAsUser"], pod["runAsGroup"]


def test_the_dockerfile_s_user_is_the_manifests_user(overlay):
    _, docs = overlay
    user, group = run_as(docs)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"groupadd --system --gid {group} nin" in dockerfile
    assert f"useradd --system --uid {user} " in dockerfile
    runtime = kserve_docs()["ServingRuntime"]["spec"]["containers"][0]
    assert runtime["securityContext"]["runAsUser"] == user


@pytest.mark.skipif(not IMAGE, reason="NIN_IMAGE names no built image (CI sets it)")
def test_the_image_runs_as_the_manifests_user_read_only_without_capabilities():
    docs = load_all(RENDERED / "cpu.yaml")
    user, group = run_as(docs)
    ids = subprocess.run(["docker", "run", "--rm", "--entrypoint", "sh", IMAGE, "-c", "id -u; id -g"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert ids == [str(user), str(group)]
    # As the pod runs it: read-only root, no capabilities, no privilege
    # gain, the KServe runtime's arguments with a weights directory.
    _, args = kserve_args()
    args = [a.replace("/mnt/models", "/opt/nin/weights") for a in args]
    name = f"nin-deploy-check-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL",
                    "--security-opt", "no-new-privileges", "--user", f"{user}:{group}",
                    "--network", "none", IMAGE, *args], check=True, capture_output=True)
    try:
        deadline = time.time() + 120
        while True:
            probe = subprocess.run(
                ["docker", "exec", name, "bash", "-c",
                 "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /v2/health/ready HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3"],
                capture_output=True, text=True)
            if " 200 " in probe.stdout:
                break
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name],
                                   capture_output=True, text=True).stdout.strip()
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
            assert state == "true", f"the container stopped: {logs.stderr}"
            assert time.time() < deadline, f"not ready in 120 s: {logs.stderr}"
            time.sleep(1)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
        first = json.loads(logs.splitlines()[0])  # --log-format=json
        assert "level" in first and "fields" in first
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
