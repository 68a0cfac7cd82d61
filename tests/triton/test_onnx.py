"""The ONNX export (`nin-train export`) against the server it came from.

.ci/triton-test.sh exports the weights the server serves and names the file
in NIN_ONNX. Checked, on the 1,000 real test images of tests/data:

- `onnx.checker` passes (full check, with shape inference); opset 13;
  one input `input` [batch, 1, 28, 28] and one output `logits`
  [batch, 10], the batch axis dynamic;
- `metadata_props` carry the class names, the preprocessing recipe, the
  config and the provenance of the weights file, as JSON;
- ONNX Runtime (CPU, all graph optimisations) on the slice, preprocessed
  with the recipe from the export's own metadata, gives every prediction
  the server gives and logits within 1e-4 of the server's (tritonclient,
  binary tensors), in one batch of 1,000 and in batches of 1.
"""

import json
import os
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from test_clients import CLASSES, SIDE, WEIGHTS, real_images, slice_answers

ONNX = Path(os.environ.get("NIN_ONNX", ""))
# Two engines, two summation orders: FP32 rounding only.
CLOSE = 1e-4


@pytest.fixture(scope="module")
def model():
    if not ONNX.is_file():
        pytest.fail(f"NIN_ONNX={ONNX!s} is not a file: .ci/triton-test.sh exports it")
    return onnx.load(str(ONNX))


@pytest.fixture(scope="module")
def session():
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(ONNX), options, providers=["CPUExecutionProvider"])


def metadata(model):
    return {p.key: json.loads(p.value) for p in model.metadata_props}


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_the_checker_passes_and_the_signature_is_nins(model):
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    graph = model.graph
    assert [(i.name, dims(i)) for i in graph.input] == [("input", ["batch", 1, SIDE, SIDE])]
    assert [(o.name, dims(o)) for o in graph.output] == [("logits", ["batch", CLASSES])]
    ops = {node.op_type for node in graph.node}
    assert ops == {"Conv", "BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool", "Flatten"}, ops


def test_metadata_is_the_weights_files(model):
    """The export's metadata_props hold what the safetensors header holds."""
    with open(WEIGHTS, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))["__metadata__"]
    props = metadata(model)
    for key in ("config", "classes", "preprocessing", "provenance"):
        assert props[key] == json.loads(header[key]), key
    assert len(props["classes"]) == CLASSES


def preprocess(model, x_uint8):
    """The model input, by the recipe in the export's own metadata."""
    recipe = metadata(model)["preprocessing"]
    assert recipe["size"] == SIDE and recipe["background"] == "dark", recipe
    v = x_uint8.astype(np.float32) * np.float32(recipe["scale"])
    return (v - np.float32(recipe["mean"])) / np.float32(recipe["std"])


def test_onnx_runtime_agrees_with_the_server(model, session):
    x, labels = real_images()
    served, _ = slice_answers("http-binary", "FP32")
    (logits,) = session.run(["logits"], {"input": preprocess(model, x)})
    assert logits.shape == (len(x), CLASSES) and logits.dtype == np.float32
    assert np.array_equal(logits.argmax(1), served.argmax(1)), "a prediction differs"
    worst = float(np.abs(logits - served).max())
    assert worst <= CLOSE, f"logits differ by up to {worst}"
    accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy > 0.9, accuracy


def test_a_batch_of_one_gives_the_same_logits(model, session):
    x, _ = real_images()
    inputs = preprocess(model, x[:16])
    (whole,) = session.run(["logits"], {"input": inputs})
    for i in range(len(inputs)):
        (one,) = session.run(["logits"], {"input": inputs[i:i + 1]})
        assert one.shape == (1, CLASSES)
        assert float(np.abs(one[0] - whole[i]).max()) <= CLOSE
