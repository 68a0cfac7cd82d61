"""nin-serve through NVIDIA Triton's own Python clients (tritonclient).

Needs a running nin-serve with its HTTP and gRPC listeners
(.ci/triton-test.sh starts two: one open, one with --api-key):

    NIN_TRITON_HTTP=127.0.0.1:8080 NIN_TRITON_GRPC=127.0.0.1:8001 \\
      python -m pytest tests/triton

Optional: NIN_TRITON_AUTH_HTTP, NIN_TRITON_AUTH_GRPC and NIN_TRITON_API_KEY
(a second server started with that --api-key; without them the access test
is skipped), NIN_TRITON_MODEL (default nin), NIN_TRITON_MAX_BATCH (the
server's --max-batch, default 32), NIN_TRITON_WEIGHTS (the weights file the
server serves, for its recorded test accuracy).

What is checked, against the KServe Open Inference Protocol v2 and
Triton's extensions to it (binary tensor data, model configuration,
statistics), with the clients Triton users have:

- three ways in: tritonclient.http with JSON tensors (binary_data=False),
  tritonclient.http with binary tensors (Inference-Header-Content-Length,
  binary_data_size, binary_data, binary_data_output), tritonclient.grpc
  (raw_input_contents in, raw_output_contents out); plus hand-built
  requests for what the clients never send (typed gRPC contents, malformed
  binary framing);
- health, readiness, server and model metadata, model configuration (what
  perf_analyzer reads), statistics (what perf_analyzer reads, with the
  invariants it enforces), the /versions/{v} forms;
- inference on the 1,000 real test images of tests/data (FP32 and UINT8,
  in batches): the three protocols give the same logits (within 1e-5) and
  predictions; the predictions are those of the server's own POST
  /classify on lossless PNGs of the same bytes (a separate decoding and
  preprocessing path that nin-serve's tests tie to `nin-train eval`); the
  accuracy on the slice is within 0.03 of the test accuracy the weights
  file records (0.9405 on the full 10,000 for the shipped weights);
- errors: unknown model (HTTP 404, gRPC NOT_FOUND), wrong shape, name,
  datatype, size, output, batch too large (HTTP 400/413/422, gRPC
  INVALID_ARGUMENT), and with --api-key: no or a wrong
  `authorization: Bearer` (HTTP 401, gRPC UNAUTHENTICATED).
"""

import functools
import http.client
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import quote

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

REPO = Path(__file__).resolve().parent.parent.parent
DATA = REPO / "tests" / "data"
sys.path.insert(0, str(DATA))
import idx  # noqa: E402  (tests/data/idx.py, the shared IDX reader)

HTTP = os.environ.get("NIN_TRITON_HTTP", "")
GRPC = os.environ.get("NIN_TRITON_GRPC", "")
if not HTTP or not GRPC:
    raise RuntimeError(
        "set NIN_TRITON_HTTP and NIN_TRITON_GRPC (host:port each) to a running "
        "nin-serve, e.g. NIN_TRITON_HTTP=127.0.0.1:8080 NIN_TRITON_GRPC=127.0.0.1:8001"
    )
AUTH_HTTP = os.environ.get("NIN_TRITON_AUTH_HTTP", "")
AUTH_GRPC = os.environ.get("NIN_TRITON_AUTH_GRPC", "")
API_KEY = os.environ.get("NIN_TRITON_API_KEY", "")
MODEL = os.environ.get("NIN_TRITON_MODEL", "nin")
MAX_BATCH = int(os.environ.get("NIN_TRITON_MAX_BATCH", "32"))
WEIGHTS = Path(os.environ.get("NIN_TRITON_WEIGHTS", REPO / "weights" / "nin-fashion-mnist.safetensors"))

BATCH = min(32, MAX_BATCH)
CLASSES = 10
SIDE = 28
INPUT_SHAPE = [-1, 1, SIDE, SIDE]
OUTPUTS = ("logits", "probabilities")
# The same tensor through another protocol must give the same numbers:
# only float printing and parsing stand between them (exact for FP32).
SAME = 1e-5
# UINT8 is scaled by the server (bytes x the weights' scale), FP32 by the
# client (bytes / 255): the two may differ in the last bit of an input.
NEAR = 1e-4
NOT_FOUND_HTTP = {404}
BAD_TENSOR_HTTP = {400, 422}


# --- the data: the committed 1,000-image slice of the real test set -------


@functools.cache
def real_images():
    """(uint8 [N,1,28,28], labels [N]) of tests/data."""
    images = idx.Images(idx.read(DATA, "t10k-images-idx3-ubyte"))
    labels = idx.Labels(idx.read(DATA, "t10k-labels-idx1-ubyte"))
    assert (images.rows, images.cols) == (SIDE, SIDE)
    pixels = b"".join(images.image(i) for i in range(images.count))
    x = np.frombuffer(pixels, dtype=np.uint8).reshape(images.count, 1, SIDE, SIDE)
    y = np.frombuffer(bytes(labels.label(i) for i in range(labels.count)), dtype=np.uint8)
    assert len(x) == len(y) == 1000
    return x, y


def as_input(x_uint8, datatype):
    """The protocol's tensor for the images: UINT8 as is, FP32 / 255."""
    if datatype == "UINT8":
        return np.ascontiguousarray(x_uint8)
    return x_uint8.astype(np.float32) / np.float32(255)


def recorded_accuracy():
    """The test accuracy the weights file's metadata records (safetensors
    header: 8-byte little-endian length, then JSON with __metadata__)."""
    with open(WEIGHTS, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    provenance = json.loads(header["__metadata__"]["provenance"])
    return float(provenance["test_accuracy"])


def softmax(logits):
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def png(pixels, width, height):
    """An 8-bit greyscale PNG of row-major bytes (lossless)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


# --- clients ---------------------------------------------------------------


def wait_for_grpc(client, address, seconds=60):
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            if client.is_server_live():
                return
        except InferenceServerException as error:
            last = error
        time.sleep(0.5)
    raise RuntimeError(f"no gRPC ServerLive answer from {address} in {seconds} s: {last}")


@pytest.fixture(scope="module")
def http_client():
    client = httpclient.InferenceServerClient(HTTP, network_timeout=300.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client():
    client = grpcclient.InferenceServerClient(GRPC)
    wait_for_grpc(client, GRPC)
    yield client
    client.close()


@pytest.fixture(scope="module")
def clients(http_client, grpc_client):
    return {"http": http_client, "grpc": grpc_client}


def status_of(error):
    """An InferenceServerException's status: "404" (HTTP) or "NOT_FOUND" (gRPC)."""
    status = error.status() or ""
    return status.removeprefix("StatusCode.")


def expect_error(call, http_statuses, grpc_statuses, protocol):
    with pytest.raises(InferenceServerException) as caught:
        call()
    status = status_of(caught.value)
    allowed = {str(s) for s in http_statuses} if protocol == "http" else set(grpc_statuses)
    assert status in allowed, f"{protocol}: expected {sorted(allowed)}, got [{status}] {caught.value.message()}"
    return caught.value


# --- inference through each protocol ---------------------------------------

PROTOCOLS = ("http-json", "http-binary", "grpc")
DATATYPES = ("FP32", "UINT8")


def infer(protocol, clients, x, request_id="", outputs=OUTPUTS, model=MODEL, version="",
          headers=None, binary_in=None, binary_out=None):
    """One inference request; returns tritonclient's result. `protocol` is
    http-json (JSON tensors both ways), http-binary (binary both ways) or
    grpc; binary_in / binary_out override the HTTP tensor format."""
    datatype = np_to_triton_dtype(x.dtype)
    if protocol == "grpc":
        tensor = grpcclient.InferInput("input", list(x.shape), datatype)
        tensor.set_data_from_numpy(x)
        wanted = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
        return clients["grpc"].infer(model, [tensor], model_version=version, outputs=wanted,
                                     request_id=request_id, headers=headers, client_timeout=300)
    binary = protocol == "http-binary"
    binary_in = binary if binary_in is None else binary_in
    binary_out = binary if binary_out is None else binary_out
    tensor = httpclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    wanted = [httpclient.InferRequestedOutput(name, binary_data=binary_out) for name in outputs] if outputs else None
    return clients["http"].infer(model, [tensor], model_version=quote(version, safe=""), outputs=wanted,
                                 request_id=request_id, headers=headers)


def response_of(result):
    """The response as a dict, whichever client answered."""
    response = result.get_response()
    if isinstance(response, dict):
        return response
    return MessageToDict(response, preserving_proto_field_name=True)


def check_outputs(result, n, names=OUTPUTS):
    """The response's outputs are exactly `names`, FP32 [n, 10]; returns them."""
    response = response_of(result)
    assert response.get("model_name") == MODEL, response.get("model_name")
    got = [o["name"] for o in response["outputs"]]
    assert sorted(got) == sorted(names), f"outputs {got}, asked for {list(names)}"
    arrays = {}
    for name in names:
        output = result.get_output(name)
        if not isinstance(output, dict):
            output = MessageToDict(output, preserving_proto_field_name=True)
        assert output["datatype"] == "FP32", output
        assert [int(d) for d in output["shape"]] == [n, CLASSES], output
        array = result.as_numpy(name)
        assert array is not None and array.dtype == np.float32 and array.shape == (n, CLASSES)
        assert np.isfinite(array).all()
        arrays[name] = array
    return arrays


@functools.cache
def slice_answers(protocol, datatype):
    """(logits, probabilities) of the 1,000 images through one protocol, in
    requests of BATCH images, each request's id echoed. Cached: the
    agreement tests compare what the per-protocol tests computed."""
    clients = {"http": httpclient.InferenceServerClient(HTTP, network_timeout=300.0),
               "grpc": grpcclient.InferenceServerClient(GRPC)}
    try:
        if protocol == "grpc":
            wait_for_grpc(clients["grpc"], GRPC)
        x, _ = real_images()
        logits, probabilities = [], []
        for start in range(0, len(x), BATCH):
            batch = as_input(x[start:start + BATCH], datatype)
            request_id = f"{protocol}-{datatype}-{start}"
            result = infer(protocol, clients, batch, request_id=request_id)
            assert response_of(result).get("id") == request_id, "the request id is not echoed"
            arrays = check_outputs(result, len(batch))
            logits.append(arrays["logits"])
            probabilities.append(arrays["probabilities"])
        return np.concatenate(logits), np.concatenate(probabilities)
    finally:
        for client in clients.values():
            client.close()


# --- health, metadata, configuration ---------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_and_readiness(clients, protocol):
    client = clients[protocol]
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    try:
        ready = client.is_model_ready("no-such-model")
    except InferenceServerException as error:  # gRPC may refuse instead
        assert protocol == "grpc" and status_of(error) == "NOT_FOUND", error
    else:
        assert ready is False


def server_metadata(clients, protocol):
    if protocol == "http":
        return clients["http"].get_server_metadata()
    m = clients["grpc"].get_server_metadata()
    return {"name": m.name, "version": m.version, "extensions": list(m.extensions)}


def test_server_metadata_is_the_same_on_both_protocols(clients):
    http_meta, grpc_meta = (server_metadata(clients, p) for p in ("http", "grpc"))
    for meta in (http_meta, grpc_meta):
        assert meta["name"] and meta["version"], meta
        assert isinstance(meta["extensions"], list), meta
    assert http_meta["name"] == grpc_meta["name"] and http_meta["version"] == grpc_meta["version"]
    assert sorted(http_meta["extensions"]) == sorted(grpc_meta["extensions"])


def test_server_metadata_lists_the_extensions_served(clients):
    # Triton's extension documents: a server that supports one names it in
    # the server metadata's extensions (clients may look before using it).
    extensions = set(server_metadata(clients, "http")["extensions"])
    missing = {"binary_tensor_data", "model_configuration", "statistics"} - extensions
    assert not missing, f"extensions {sorted(extensions)} lack {sorted(missing)}"


def model_metadata(clients, protocol, version=""):
    if protocol == "http":
        return clients["http"].get_model_metadata(MODEL, quote(version, safe=""))
    m = clients["grpc"].get_model_metadata(MODEL, version)
    tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]
    return {"name": m.name, "versions": list(m.versions), "platform": m.platform,
            "inputs": tensors(m.inputs), "outputs": tensors(m.outputs)}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_metadata(clients, protocol):
    meta = model_metadata(clients, protocol)
    assert meta["name"] == MODEL
    assert meta["versions"] and all(isinstance(v, str) and v for v in meta["versions"]), meta["versions"]
    assert isinstance(meta["platform"], str) and meta["platform"], meta
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("input", "FP32", INPUT_SHAPE)], meta["inputs"]
    assert sorted((t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]) == [
        ("logits", "FP32", [-1, CLASSES]), ("probabilities", "FP32", [-1, CLASSES])], meta["outputs"]


def test_model_metadata_is_the_same_on_both_protocols(clients):
    http_meta, grpc_meta = (model_metadata(clients, p) for p in ("http", "grpc"))
    normal = lambda m: {**m, "inputs": [{**t, "shape": [int(d) for d in t["shape"]]} for t in m["inputs"]],
                        "outputs": [{**t, "shape": [int(d) for d in t["shape"]]} for t in m["outputs"]]}
    http_meta = {k: http_meta[k] for k in grpc_meta}  # HTTP may add fields (parameters)
    assert normal(http_meta) == normal(grpc_meta)


def model_config(clients, protocol, version=""):
    """The model configuration as Triton's JSON (snake_case, enum names):
    HTTP's GET .../config body, or gRPC's ModelConfigResponse.config."""
    if protocol == "http":
        return clients["http"].get_model_config(MODEL, quote(version, safe=""))
    response = clients["grpc"].get_model_config(MODEL, version)
    return MessageToDict(response.config, preserving_proto_field_name=True)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_config(clients, protocol):
    config = model_config(clients, protocol)
    assert config.get("name") == MODEL, config
    # With batching (max_batch_size > 0) dims leave out the batch dimension,
    # which perf_analyzer then adds from -b: [N, 1, 28, 28] on the wire.
    assert int(config.get("max_batch_size", 0)) == MAX_BATCH, config
    inputs = [(t["name"], t.get("data_type"), [int(d) for d in t["dims"]]) for t in config["input"]]
    assert inputs == [("input", "TYPE_FP32", [1, SIDE, SIDE])], config["input"]
    outputs = sorted((t["name"], t.get("data_type"), [int(d) for d in t["dims"]]) for t in config["output"])
    assert outputs == [("logits", "TYPE_FP32", [CLASSES]), ("probabilities", "TYPE_FP32", [CLASSES])], config["output"]
    # perf_analyzer takes a model as decoupled, sequence or ensemble from
    # these: none of them applies to nin.
    assert not config.get("model_transaction_policy", {}).get("decoupled", False), config
    assert "sequence_batching" not in config and "ensemble_scheduling" not in config, config


def test_model_config_is_the_same_on_both_protocols(clients):
    """HTTP's configuration is the JSON form of the inference.ModelConfig
    message gRPC answers: it parses as one (no field the message lacks) and
    says the same."""
    http_config = model_config(clients, "http")
    grpc_config = clients["grpc"].get_model_config(MODEL).config
    parsed = model_config_pb2.ModelConfig()
    try:
        json_format.ParseDict(http_config, parsed)
    except json_format.ParseError as error:
        pytest.fail(f"HTTP's model configuration is not an inference.ModelConfig: {error}")
    assert parsed == grpc_config, (
        f"HTTP: {MessageToDict(parsed, preserving_proto_field_name=True)}; "
        f"gRPC: {MessageToDict(grpc_config, preserving_proto_field_name=True)}")


# --- versions ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_versioned_routes(clients, protocol):
    """Every version the metadata lists answers the /versions/{v} forms as
    the unversioned ones do; an unknown version is not ready and refused."""
    versions = model_metadata(clients, protocol)["versions"]
    x, _ = real_images()
    batch = as_input(x[:BATCH], "FP32")
    kind = "http-binary" if protocol == "http" else "grpc"
    plain = check_outputs(infer(kind, clients, batch), len(batch))
    for version in versions:
        client = clients[protocol]
        assert client.is_model_ready(MODEL, quote(version, safe="") if protocol == "http" else version)
        assert model_metadata(clients, protocol, version)["name"] == MODEL
        assert model_config(clients, protocol, version).get("name") == MODEL
        result = infer(kind, clients, batch, version=version)
        assert response_of(result).get("model_version") == version
        np.testing.assert_allclose(check_outputs(result, len(batch))["logits"], plain["logits"], rtol=0, atol=SAME)
    unknown = "987654321"
    assert unknown not in versions
    try:
        ready = clients[protocol].is_model_ready(MODEL, unknown)
    except InferenceServerException as error:
        assert protocol == "grpc" and status_of(error) in {"NOT_FOUND", "INVALID_ARGUMENT"}, error
    else:
        assert ready is False
    expect_error(lambda: infer(kind, clients, batch, version=unknown), {400, 404},
                 {"NOT_FOUND", "INVALID_ARGUMENT"}, protocol)


# --- the real test images, through every protocol ----------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_slice_through(protocol, datatype):
    logits, probabilities = slice_answers(protocol, datatype)
    _, labels = real_images()
    np.testing.assert_allclose(probabilities, softmax(logits), rtol=0, atol=SAME,
                               err_msg="probabilities are not the softmax of the logits")
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    recorded = recorded_accuracy()
    print(f"{protocol} {datatype}: accuracy {accuracy:.4f} on the {len(labels)}-image slice"
          f" ({recorded:.4f} recorded on the full test set)")
    # 1,000 of the 10,000 test images: one standard error is about 0.0075.
    assert abs(accuracy - recorded) <= 0.03, f"accuracy {accuracy:.4f}, recorded {recorded:.4f}"


@pytest.mark.parametrize("datatype", DATATYPES)
def test_the_protocols_agree(datatype):
    reference_logits, reference_probabilities = slice_answers("http-json", datatype)
    for protocol in ("http-binary", "grpc"):
        logits, probabilities = slice_answers(protocol, datatype)
        worst = float(np.abs(logits - reference_logits).max())
        assert worst <= SAME, f"{protocol} logits differ from http-json's by up to {worst:.3g}"
        np.testing.assert_allclose(probabilities, reference_probabilities, rtol=0, atol=SAME)
        differing = np.flatnonzero(logits.argmax(axis=1) != reference_logits.argmax(axis=1))
        assert differing.size == 0, f"{protocol} predicts otherwise than http-json on images {differing.tolist()}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fp32_and_uint8_agree(protocol):
    fp32, _ = slice_answers(protocol, "FP32")
    uint8, _ = slice_answers(protocol, "UINT8")
    worst = float(np.abs(fp32 - uint8).max())
    assert worst <= NEAR, f"{protocol}: UINT8 and FP32 logits differ by up to {worst:.3g}"
    differing = np.flatnonzero(fp32.argmax(axis=1) != uint8.argmax(axis=1))
    assert differing.size == 0, f"{protocol}: UINT8 and FP32 predictions differ on images {differing.tolist()}"


def classify_all(x):
    """Class probabilities that POST /classify gives PNGs of the images,
    through multipart requests of BATCH images (?top_k=10: every class)."""
    host, port = HTTP.rsplit(":", 1)
    probabilities = np.zeros((len(x), CLASSES))
    for start in range(0, len(x), BATCH):
        boundary = f"nin-triton-test-{start}"
        parts = []
        for i in range(start, min(start + BATCH, len(x))):
            parts.append(
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{i}.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n".encode() + png(x[i, 0].tobytes(), SIDE, SIDE) + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        try:
            connection.request("POST", f"/classify?top_k={CLASSES}", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        assert response.status == 200, f"POST /classify: {response.status} {answer[:300]!r}"
        results = json.loads(answer)["results"]
        assert len(results) == min(BATCH, len(x) - start)
        for offset, result in enumerate(results):
            assert result["preprocessing"].get("inverted") is False, result["preprocessing"]
            for entry in result["top_k"]:
                probabilities[start + offset, entry["class_id"]] = entry["probability"]
    return probabilities


def test_the_predictions_are_those_of_classify():
    x, _ = real_images()
    classified = classify_all(x)
    _, probabilities = slice_answers("http-binary", "FP32")
    differing = np.flatnonzero(classified.argmax(axis=1) != probabilities.argmax(axis=1))
    assert differing.size == 0, f"v2 binary predicts otherwise than /classify on images {differing.tolist()}"
    worst = float(np.abs(classified - probabilities).max())
    assert worst <= NEAR, f"/classify's probabilities differ from v2 binary's by up to {worst:.3g}"


# --- the HTTP binary tensor extension, each way and by hand ------------------


def test_http_binary_and_json_mix(clients):
    x, _ = real_images()
    batch = as_input(x[:BATCH], "FP32")
    reference = check_outputs(infer("http-json", clients, batch), len(batch))
    for binary_in, binary_out in ((True, False), (False, True)):
        got = check_outputs(infer("http-json", clients, batch, binary_in=binary_in, binary_out=binary_out), len(batch))
        for name in OUTPUTS:
            np.testing.assert_allclose(got[name], reference[name], rtol=0, atol=SAME,
                                       err_msg=f"binary in {binary_in}, out {binary_out}: {name}")
    # No outputs named: tritonclient asks for all, binary ("binary_data_output": true).
    got = check_outputs(infer("http-binary", clients, batch, outputs=None), len(batch))
    np.testing.assert_allclose(got["logits"], reference["logits"], rtol=0, atol=SAME)
    # One output named: only that one comes back.
    only = check_outputs(infer("http-binary", clients, batch, outputs=("probabilities",)), len(batch),
                         names=("probabilities",))
    np.testing.assert_allclose(only["probabilities"], reference["probabilities"], rtol=0, atol=SAME)


def post_infer(body, headers, path=None):
    host, port = HTTP.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        connection.request("POST", path or f"/v2/models/{MODEL}/infer", body, headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def binary_request(header, raw):
    """Body and headers of a binary-extension request: JSON, then raw bytes."""
    text = json.dumps(header).encode()
    return text + raw, {"Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(len(text))}


def test_http_binary_framing_by_hand(clients):
    """The binary extension's framing, checked byte by byte: the response's
    JSON is Inference-Header-Content-Length bytes long, each binary output
    carries binary_data_size, and the raw tensors follow in output order."""
    x, _ = real_images()
    n = 5
    batch = x[:n]
    reference = check_outputs(infer("http-json", clients, as_input(batch, "UINT8")), n)
    raw = batch.tobytes()
    header = {"id": "by-hand",
              "inputs": [{"name": "input", "shape": [n, 1, SIDE, SIDE], "datatype": "UINT8",
                          "parameters": {"binary_data_size": len(raw)}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                          {"name": "logits", "parameters": {"binary_data": True}}]}
    status, headers, body = post_infer(*binary_request(header, raw))
    assert status == 200, body[:300]
    assert "inference-header-content-length" in headers, f"no Inference-Header-Content-Length in {headers}"
    length = int(headers["inference-header-content-length"])
    answer = json.loads(body[:length])
    assert answer.get("id") == "by-hand"
    offset = length
    for output in answer["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        assert size == n * CLASSES * 4, output
        assert "data" not in output, output
        values = np.frombuffer(body[offset:offset + size], dtype="<f4").reshape(n, CLASSES)
        np.testing.assert_allclose(values, reference[output["name"]], rtol=0, atol=SAME, err_msg=output["name"])
        offset += size
    assert sorted(o["name"] for o in answer["outputs"]) == sorted(OUTPUTS)
    assert offset == len(body), f"{len(body) - offset} bytes after the last output"

    # binary_data_output: true with no outputs named: all outputs, binary.
    header = {"inputs": header["inputs"], "parameters": {"binary_data_output": True}}
    status, headers, body = post_infer(*binary_request(header, raw))
    assert status == 200, body[:300]
    answer = json.loads(body[:int(headers["inference-header-content-length"])])
    assert sorted(o["name"] for o in answer["outputs"]) == sorted(OUTPUTS)
    assert all(o["parameters"]["binary_data_size"] == n * CLASSES * 4 for o in answer["outputs"]), answer

    # Binary in, JSON out: the answer is plain JSON (a header, if sent, spans it all).
    header = {"inputs": header["inputs"], "outputs": [{"name": "logits"}]}
    status, headers, body = post_infer(*binary_request(header, raw))
    assert status == 200, body[:300]
    if "inference-header-content-length" in headers:
        assert int(headers["inference-header-content-length"]) == len(body)
    answer = json.loads(body)
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(n, CLASSES),
                               reference["logits"], rtol=0, atol=SAME)


@pytest.mark.parametrize("case", ["header longer than the body", "header length not a number",
                                  "binary_data_size short of the body", "binary_data_size beyond the body",
                                  "binary_data_size not the shape's"])
def test_http_binary_framing_errors(clients, case):
    x, _ = real_images()
    raw = x[:2].tobytes()
    size = len(raw)
    if case == "binary_data_size short of the body":
        size -= 1
    elif case == "binary_data_size beyond the body":
        size += 1
    elif case == "binary_data_size not the shape's":
        raw = raw[:-SIDE]
        size = len(raw)
    header = {"inputs": [{"name": "input", "shape": [2, 1, SIDE, SIDE], "datatype": "UINT8",
                          "parameters": {"binary_data_size": size}}]}
    body, headers = binary_request(header, raw)
    if case == "header longer than the body":
        headers["Inference-Header-Content-Length"] = str(len(body) + 10)
    elif case == "header length not a number":
        headers["Inference-Header-Content-Length"] = "twelve"
    status, _, answer = post_infer(body, headers)
    assert status in BAD_TENSOR_HTTP, f"{case}: {status} {answer[:300]!r}"
    assert "error" in json.loads(answer), answer[:300]
    # The server still answers well-formed requests.
    check_outputs(infer("http-binary", clients, as_input(x[:2], "UINT8")), 2)


# --- gRPC by hand: typed contents, health, reflection -------------------------


@pytest.fixture(scope="module")
def channel(grpc_client):  # grpc_client: waits until the listener answers
    with grpc.insecure_channel(GRPC) as channel:
        yield channel


@pytest.mark.parametrize("datatype", DATATYPES)
def test_grpc_typed_contents(clients, channel, datatype):
    """ModelInfer with the tensor in InferTensorContents (fp32_contents,
    uint_contents for UINT8) instead of raw_input_contents; the answer comes
    in raw_output_contents, one per output, in the outputs' order."""
    x, _ = real_images()
    n = 7
    batch = as_input(x[:n], datatype)
    reference = check_outputs(infer("http-json", clients, batch), n)
    request = service_pb2.ModelInferRequest(model_name=MODEL, id=f"typed-{datatype}")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=[n, 1, SIDE, SIDE])
    if datatype == "FP32":
        tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    else:
        tensor.contents.uint_contents.extend(batch.ravel().tolist())
    for name in OUTPUTS:
        request.outputs.add(name=name)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelInfer(request, timeout=300)
    assert response.id == f"typed-{datatype}" and response.model_name == MODEL
    assert len(response.raw_output_contents) == len(response.outputs) == 2, response.outputs
    for output, raw in zip(response.outputs, response.raw_output_contents):
        assert output.datatype == "FP32" and list(output.shape) == [n, CLASSES], output
        assert not output.contents.fp32_contents, "typed and raw output contents both set"
        values = np.frombuffer(raw, dtype="<f4").reshape(n, CLASSES)
        np.testing.assert_allclose(values, reference[output.name], rtol=0, atol=SAME, err_msg=output.name)

    # Typed contents and raw_input_contents at once: refused.
    request.raw_input_contents.append(batch.tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=300)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value


def protobuf_fields(buf):
    """(field number, value) pairs of a protobuf message (varints as int,
    length-delimited as bytes): enough to read health and reflection."""

    def varint(i):
        value = shift = 0
        while True:
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i += 1
            if byte < 0x80:
                return value, i
            shift += 7

    i = 0
    while i < len(buf):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            length, i = varint(i)
            value, i = buf[i:i + length], i + length
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield field, value


def length_delimited(field, data):
    assert len(data) < 128
    return bytes([field << 3 | 2, len(data)]) + data


def identity(b):
    return b


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService"])
def test_grpc_health(channel, service):
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=identity, response_deserializer=identity)
    request = length_delimited(1, service.encode()) if service else b""
    answer = dict(protobuf_fields(check(request, timeout=30)))
    assert answer.get(1) == 1, f"health of {service!r}: status {answer.get(1)} (1 is SERVING)"


def test_grpc_reflection_lists_the_inference_service(channel):
    services, errors = None, []
    for version in ("v1", "v1alpha"):
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=identity, response_deserializer=identity)
        try:
            responses = list(call(iter([length_delimited(7, b"")]), timeout=30))  # list_services: ""
        except grpc.RpcError as error:
            errors.append(f"{version}: {error.code()} {error.details()}")
            continue
        services = []
        for response in responses:
            for field, value in protobuf_fields(response):
                if field == 6:  # list_services_response
                    services += [dict(protobuf_fields(s))[1].decode()
                                 for f, s in protobuf_fields(value) if f == 1]
        break
    assert services is not None, f"no reflection service: {errors}"
    assert "inference.GRPCInferenceService" in services, services


# --- statistics ----------------------------------------------------------------


def model_statistics(clients, protocol):
    """This model's one statistics entry, as Triton's JSON (numbers as int)."""
    if protocol == "http":
        stats = clients["http"].get_inference_statistics(MODEL)
    else:
        stats = MessageToDict(clients["grpc"].get_inference_statistics(MODEL), preserving_proto_field_name=True)
    entries = [s for s in stats.get("model_stats", []) if s.get("name") == MODEL]
    assert len(entries) == 1, stats
    entry = entries[0]
    durations = entry.get("inference_stats", {})
    count = lambda key: int(durations.get(key, {}).get("count", 0))
    return {"version": entry.get("version", ""),
            "last_inference": int(entry.get("last_inference", 0)),
            "inference_count": int(entry.get("inference_count", 0)),
            "execution_count": int(entry.get("execution_count", 0)),
            **{key: count(key) for key in ("success", "fail", "queue", "compute_input",
                                           "compute_infer", "compute_output")}}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_statistics_count_a_request(clients, protocol):
    versions = model_metadata(clients, protocol)["versions"]
    before = model_statistics(clients, protocol)
    x, _ = real_images()
    infer("http-binary" if protocol == "http" else "grpc", clients, as_input(x[:BATCH], "FP32"))
    after = model_statistics(clients, protocol)
    delta = {k: after[k] - before[k] for k in after if k not in ("version", "last_inference")}
    seen = f"one request of {BATCH} images; statistics before {before}, after {after}"
    problems = []

    def expect(condition, what):
        if not condition:
            problems.append(what)

    # Triton's statistics extension: inference_count counts images (each
    # inference of a batch); success, fail and queue count requests;
    # execution_count counts the forward passes that ran them.
    expect(delta["inference_count"] == BATCH, f"inference_count grew by {delta['inference_count']}, not {BATCH}")
    expect(delta["success"] == 1, f"success.count grew by {delta['success']}, not 1 (it counts requests)")
    expect(delta["fail"] == 0, f"fail.count grew by {delta['fail']}")
    expect(1 <= delta["execution_count"] <= BATCH, f"execution_count grew by {delta['execution_count']}")
    expect(delta["queue"] == 1, f"queue.count grew by {delta['queue']}, not 1 (it counts requests)")
    expect(delta["compute_infer"] >= 1, "compute_infer.count did not grow")
    expect(after["last_inference"] > 0, "no last_inference")
    # perf_analyzer (InferenceProfiler) stops with "Server side statistics
    # compute counts must be the same" unless the compute_input,
    # compute_infer and compute_output counts grow alike, finds the model's
    # entry by a queue count that grew, and parses its version with
    # std::stoll, looking it up again as std::to_string of that number.
    expect(delta["compute_input"] == delta["compute_infer"] == delta["compute_output"],
           "compute_input, compute_infer, compute_output counts grew by "
           f"{delta['compute_input']}, {delta['compute_infer']}, {delta['compute_output']}: perf_analyzer "
           "requires them equal")
    expect(delta["queue"] > 0, "queue.count did not grow: perf_analyzer finds no statistics for the model")
    version = after["version"]
    expect(version in versions, f"statistics for version {version!r}; the metadata lists {versions}")
    expect(version.isdigit() and str(int(version)) == version,
           f"version {version!r} is not a decimal integer: perf_analyzer cannot read its statistics")
    assert not problems, "; ".join(problems) + f" ({seen})"


# --- errors ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_model(clients, protocol):
    x, _ = real_images()
    batch = as_input(x[:1], "FP32")
    kind = "http-binary" if protocol == "http" else "grpc"
    expect_error(lambda: infer(kind, clients, batch, model="no-such-model"), NOT_FOUND_HTTP, {"NOT_FOUND"}, protocol)
    client = clients[protocol]
    expect_error(lambda: client.get_model_metadata("no-such-model"), NOT_FOUND_HTTP, {"NOT_FOUND"}, protocol)
    expect_error(lambda: client.get_model_config("no-such-model"), NOT_FOUND_HTTP, {"NOT_FOUND"}, protocol)


BAD_REQUESTS = {
    # name: (the tensor sent, made from the slice as FP32; the outputs asked for)
    "wrong shape": (lambda x: x[:1, :, :, :27], OUTPUTS),
    "wrong channels": (lambda x: np.concatenate([x[:1], x[:1]], axis=1), OUTPUTS),
    "3 dimensions": (lambda x: x[:1, 0], OUTPUTS),
    "FP64": (lambda x: x[:1].astype(np.float64), OUTPUTS),
    "unknown output": (lambda x: x[:1], ("logits", "no-such-output")),
    "batch above --max-batch": (lambda x: x[:MAX_BATCH + 1], OUTPUTS),
    "NaN": (lambda x: np.full_like(x[:1], np.nan), OUTPUTS),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_are_refused(clients, protocol, case):
    x, _ = real_images()
    make, outputs = BAD_REQUESTS[case]
    tensor = make(as_input(x, "FP32"))
    http_statuses = BAD_TENSOR_HTTP | ({413} if case == "batch above --max-batch" else set())
    expect_error(lambda: infer(protocol, clients, tensor, outputs=outputs), http_statuses,
                 {"INVALID_ARGUMENT"}, protocol.split("-")[0])
    # And the server answers the next good request.
    check_outputs(infer(protocol, clients, as_input(x[:1], "FP32")), 1)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_wrong_input_name(clients, protocol):
    x, _ = real_images()
    batch = as_input(x[:1], "FP32")
    module = httpclient if protocol == "http" else grpcclient
    tensor = module.InferInput("image", list(batch.shape), "FP32")
    if protocol == "http":
        tensor.set_data_from_numpy(batch, binary_data=True)
    else:
        tensor.set_data_from_numpy(batch)
    expect_error(lambda: clients[protocol].infer(MODEL, [tensor]), BAD_TENSOR_HTTP, {"INVALID_ARGUMENT"}, protocol)


# --- access control (a second server, started with --api-key) -------------------


@pytest.fixture(scope="module")
def auth_clients():
    if not (AUTH_HTTP and AUTH_GRPC and API_KEY):
        pytest.skip("no server with --api-key (NIN_TRITON_AUTH_HTTP, NIN_TRITON_AUTH_GRPC, NIN_TRITON_API_KEY)")
    clients = {"http": httpclient.InferenceServerClient(AUTH_HTTP, network_timeout=300.0),
               "grpc": grpcclient.InferenceServerClient(AUTH_GRPC)}
    wait_for_grpc(clients["grpc"], AUTH_GRPC)
    yield clients
    for client in clients.values():
        client.close()


@pytest.mark.parametrize("protocol", ["http-binary", "grpc"])
def test_api_key(clients, auth_clients, protocol):
    x, _ = real_images()
    batch = as_input(x[:4], "FP32")
    family = protocol.split("-")[0]
    name = "authorization" if family == "grpc" else "Authorization"  # gRPC metadata keys are lower case
    for headers in (None, {name: "Bearer not-the-key"}, {name: API_KEY}):
        expect_error(lambda: infer(protocol, auth_clients, batch, headers=headers), {401},
                     {"UNAUTHENTICATED"}, family)
    got = check_outputs(infer(protocol, auth_clients, batch, headers={name: f"Bearer {API_KEY}"}), len(batch))
    reference = check_outputs(infer(protocol, clients, batch), len(batch))
    np.testing.assert_allclose(got["logits"], reference["logits"], rtol=0, atol=SAME)
