"""Checks of the built images (nin:cpu and nin:cuda), run by
.ci/docker-images.sh after it built them:

- each image runs its server as user 10001, its health check turns
  `healthy`, it classifies real Fashion-MNIST test images exactly as the
  host's own nin-serve binary does, and `docker stop` lets requests that are
  in flight finish (none lost);
- the CUDA image: `ldd` resolves every library of both binaries but the
  driver's libcuda.so.1; with a stub libcuda.so.1 mounted in place of the
  driver (every call fails, as on a machine without a GPU), `--device auto`
  falls back to CPU and serves (all the checks above run that way), and
  `--device cuda` exits 1 with a message naming CUDA, without a panic;
- the CUDA image on a fake GPU that opens but cannot run the kernels
  (.ci/cuda-stubs/fake-gpu: a GPU older than the kernels, or one whose
  driver cannot load them): `--device cuda` exits 1 naming the reason,
  `--device auto` warns with the reason and serves on CPU.

Clients run inside each container's network namespace (client.py, through
nsenter), on its loopback.

Environment: NIN_IMAGE_CPU, NIN_IMAGE_CUDA (image tags), NIN_CUDA_STUB (a
libcuda.so.1 stub), NIN_FAKE_GPU (a folder with the fake GPU's libcuda.so.1,
libcublas.so.13 and libcurand.so.10), NIN_HOST_SERVE (the host's release
nin-serve).
"""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "web"))
from fashion_mnist import png, slice_image  # noqa: E402  (the web test's reader)

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "client.py"
IMAGES = {"cpu": os.environ.get("NIN_IMAGE_CPU", "nin:cpu"), "cuda": os.environ.get("NIN_IMAGE_CUDA", "nin:cuda")}
STUB = os.environ.get("NIN_CUDA_STUB", "")
FAKE_GPU = os.environ.get("NIN_FAKE_GPU", "")
STUB_DIR = "/opt/nin-ci-stub"
COUNT = 40  # real test images compared with the host binary


def docker(*args, check=True, timeout=120):
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def stub_args(kind):
    """For the CUDA image: the stub in place of the driver's libcuda.so.1."""
    if kind != "cuda":
        return []
    assert STUB and Path(STUB).is_file(), "NIN_CUDA_STUB must name a libcuda.so.1 stub"
    return ["-v", f"{STUB}:{STUB_DIR}/libcuda.so.1:ro", "-e", f"LD_LIBRARY_PATH={STUB_DIR}"]


def fake_gpu_args(compute_cap):
    """For the CUDA image: a GPU of `compute_cap` that cannot load a kernel."""
    assert FAKE_GPU and Path(FAKE_GPU, "libcuda.so.1").is_file(), \
        "NIN_FAKE_GPU must name the fake GPU's libraries"
    return ["-v", f"{FAKE_GPU}:{STUB_DIR}:ro", "-e", f"LD_LIBRARY_PATH={STUB_DIR}",
            "-e", f"NIN_FAKE_COMPUTE_CAP={compute_cap}"]


class Container:
    """A detached container of `image`, removed at exit. `driver` replaces
    the CUDA image's stub libcuda.so.1 (docker run arguments)."""

    def __init__(self, kind, *args, health_interval="1s", driver=None):
        self.name = f"nin-ci-{kind}-{uuid.uuid4().hex[:8]}"
        docker("run", "-d", "--name", self.name, f"--health-interval={health_interval}",
               *(stub_args(kind) if driver is None else driver), IMAGES[kind], *args)
        self.pid = docker("inspect", "-f", "{{.State.Pid}}", self.name).stdout.strip()

    def client(self, *args):
        """client.py in this container's network namespace."""
        return ["nsenter", "-t", self.pid, "-n", sys.executable, str(CLIENT), *map(str, args)]

    def wait_ready(self):
        if subprocess.run(self.client("ready", 120)).returncode != 0:
            pytest.fail(f"{self.name} never became ready:\n{self.logs()}")

    def logs(self):
        out = docker("logs", self.name, check=False)
        return out.stdout + out.stderr

    def inspect(self, template):
        return docker("inspect", "-f", template, self.name).stdout.strip()

    def remove(self):
        docker("rm", "-f", self.name, check=False)


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def served(request):
    """A running, ready container of each image, serving the shipped weights."""
    container = Container(request.param)
    try:
        container.wait_ready()
        yield request.param, container
    finally:
        container.remove()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(COUNT):
        path = folder / f"{i}.png"
        path.write_bytes(png(slice_image(i)))
        path.chmod(0o644)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def host_answers(pngs, tmp_path_factory):
    """The host binary's answers for the same images, same weights."""
    serve = os.environ.get("NIN_HOST_SERVE", "target/debug/nin-serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("host") / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([serve, "--addr", f"127.0.0.1:{port}", "--grpc-addr", "off",
                                   "--weights", "weights/nin-fashion-mnist.safetensors"],
                                  stdout=out, stderr=out)
    try:
        return run_client_on_port(port, pngs)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_client_on_port(port, pngs):
    """client.py's classify against 127.0.0.1:PORT in this namespace."""
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import client; "
              f"client.PORT = {port}; sys.exit(client.main(sys.argv[1:]))")
    ready = subprocess.run([sys.executable, "-c", script, "ready", "120"])
    assert ready.returncode == 0, "the host's nin-serve never became ready"
    out = subprocess.run([sys.executable, "-c", script, "classify", *map(str, pngs)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_runs_as_user_10001(served):
    kind, container = served
    assert container.inspect("{{.Config.User}}") == "10001:10001"
    status = docker("exec", container.name, "cat", "/proc/1/status").stdout
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["10001"] * 4, uid_line


def test_health_check_turns_healthy(served):
    kind, container = served
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        status = container.inspect("{{.State.Health.Status}}")
        if status == "healthy":
            return
        time.sleep(0.5)
    pytest.fail(f"health status {status!r} after 60 s:\n{container.logs()}")


def test_classifies_as_the_host_binary(served, pngs, host_answers):
    kind, container = served
    out = subprocess.run(container.client("classify", *pngs), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert len(answers) == len(host_answers) == COUNT
    for i, (ours, theirs) in enumerate(zip(answers, host_answers)):
        assert ours["class_id"] == theirs["class_id"], i
        assert len(ours["top_k"]) == len(theirs["top_k"]) == 10, i
        for a, b in zip(ours["top_k"], theirs["top_k"]):
            assert a["class_id"] == b["class_id"], i
            assert abs(a["probability"] - b["probability"]) <= 1e-5, (i, a, b)


def test_auto_device_is_cpu_here(served):
    kind, container = served
    assert "using CPU" in container.logs()


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_docker_stop_drains_in_flight_requests(kind, pngs):
    container = Container(kind)
    try:
        container.wait_ready()
        count = 8
        client = subprocess.Popen(container.client("slow", pngs[0], count), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "ready"
        # The requests are in the server (headers and half of each body read)
        # when it is told to stop; their bodies finish afterwards.
        stop = subprocess.Popen(["docker", "stop", "-t", "60", container.name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        client.stdin.write("go\n")
        client.stdin.flush()
        results = [json.loads(line) for line in client.stdout]
        client.wait(timeout=60)
        assert stop.wait(timeout=90) == 0, stop.stderr.read()
        assert len(results) == count
        lost = [r for r in results if r["status"] != 200]
        assert not lost, f"{kind}: {lost}\n{container.logs()}"
        for r in results:
            assert json.loads(r["body"])["label"], r
        assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()
    finally:
        container.remove()


def test_cuda_image_libraries_resolve_but_the_driver():
    out = docker("run", "--rm", "--entrypoint", "ldd", IMAGES["cuda"],
                 "/usr/local/bin/nin-serve", "/usr/local/bin/nin-train", check=False)
    missing = sorted({line.split()[0] for line in out.stdout.splitlines() if "not found" in line})
    assert missing == ["libcuda.so.1"], out.stdout
    # What the binaries link of CUDA resolves to the libraries from the wheels.
    for lib in ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13"]:
        assert f"{lib} => /usr/local/cuda/lib/{lib}" in out.stdout, lib


@pytest.mark.parametrize("binary", ["nin-serve", "nin-train"])
def test_cuda_image_explicit_cuda_without_a_gpu_exits_1(binary):
    weights = "/opt/nin/weights/nin-fashion-mnist.safetensors"
    args = ["--device", "cuda"] if binary == "nin-serve" else ["eval", "--device", "cuda", "--weights", weights]
    out = docker("run", "--rm", *stub_args("cuda"), "--entrypoint", binary, IMAGES["cuda"], *args,
                 check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "cuda" in text.lower(), text
    assert "panicked" not in text, text


def built_compute_cap():
    """The compute capability the CUDA image's kernels were built for."""
    label = docker("image", "inspect", "-f", '{{index .Config.Labels "nin.cuda-compute-cap"}}',
                   IMAGES["cuda"]).stdout.strip()
    assert label.isdigit(), f"nin.cuda-compute-cap label: {label!r}"
    return label


def fake_gpu_cases():
    """(compute capability the fake GPU reports, what the refusal names)."""
    built = built_compute_cap()
    older = str(int(built) - 4)  # 90 -> 86: an older generation
    return {
        "older GPU": (older, f"kernels built for compute capability {built}, this GPU is "
                             f"{older}: rebuild with CUDA_COMPUTE_CAP={older}"),
        "kernels do not load": (built, "CUDA_ERROR_NO_BINARY_FOR_GPU"),
    }


@pytest.mark.parametrize("case", ["older GPU", "kernels do not load"])
@pytest.mark.parametrize("binary", ["nin-serve", "nin-train"])
def test_cuda_image_explicit_cuda_on_a_gpu_that_cannot_run_the_kernels_exits_1(binary, case):
    cap, reason = fake_gpu_cases()[case]
    weights = "/opt/nin/weights/nin-fashion-mnist.safetensors"
    args = ["--device", "cuda"] if binary == "nin-serve" else ["eval", "--device", "cuda", "--weights", weights]
    out = docker("run", "--rm", *fake_gpu_args(cap), "--entrypoint", binary, IMAGES["cuda"], *args,
                 check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert reason in text, text
    assert "panicked" not in text, text
    assert "not implemented by the fake GPU" not in text, text


@pytest.mark.parametrize("case", ["older GPU", "kernels do not load"])
def test_cuda_image_auto_on_a_gpu_that_cannot_run_the_kernels_serves_on_cpu(case, pngs):
    cap, reason = fake_gpu_cases()[case]
    container = Container("cuda", driver=fake_gpu_args(cap))
    try:
        container.wait_ready()
        logs = container.logs()
        warning = next((line for line in logs.splitlines() if "CUDA unusable" in line), "")
        assert "WARN" in warning and reason in warning, logs
        assert "using CPU" in logs, logs
        out = subprocess.run(container.client("classify", pngs[0]), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)[0]["label"], out.stdout
    finally:
        container.remove()
