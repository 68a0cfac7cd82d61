#!/usr/bin/env python3
"""Peak memory of nin-serve under bodies at the size limit (#17).

    python3 bench/body_memory.py [NIN_SERVE_BINARY ...]

For each binary (default target/release/nin-serve) and each route, starts
the server with its defaults on a free loopback port, sends CLIENTS (128)
requests at once, each with a body just under --max-body-bytes (8 MiB):

  raw        POST /classify, image/png, random bytes (not an image);
  multipart  POST /classify, one `image` field of random bytes;
  v2         POST /v2/models/nin/infer, a JSON tensor whose data holds
             the most numbers ("0,") that fit (the shape does not match).

and reports the server's peak resident memory (VmHWM) once ready and after
the requests, and the answers by status. Standard library only. The
recorded output is in bench/results/body-memory.txt.
"""
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

CLIENTS = 128
LIMIT = 8 * 1024 * 1024
SIZE = LIMIT - 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bodies():
    noise = random.Random(7).randbytes(SIZE)
    boundary = "nin-body-memory"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    form = head + noise[: SIZE - len(head) - len(tail)] + tail
    prefix = b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":['
    suffix = b"0]}]}"
    count = (SIZE - len(prefix) - len(suffix)) // 2
    v2 = prefix + b"0," * count + suffix
    return {
        "raw": ("/classify", "image/png", noise),
        "multipart": ("/classify", f"multipart/form-data; boundary={boundary}", form),
        "v2": ("/v2/models/nin/infer", "application/json", v2),
    }


def peak_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def run(binary, route, path, content_type, body):
    port = free_port()
    server = subprocess.Popen([binary, "--addr", f"127.0.0.1:{port}", "--grpc-addr", "off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{binary} never became ready")
            time.sleep(0.2)
        idle = peak_kib(server.pid)
        statuses = {}
        lock = threading.Lock()
        start = threading.Barrier(CLIENTS)

        def client():
            start.wait()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request("POST", path, body=body, headers={"Content-Type": content_type})
                status = str(conn.getresponse().status)
            except OSError as e:
                status = type(e).__name__
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return idle, peak_kib(server.pid), statuses
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    binaries = sys.argv[1:] or ["target/release/nin-serve"]
    routes = bodies()
    print(f"{CLIENTS} clients at once, each one body of {SIZE} bytes; server defaults")
    print(f"{'binary':<20} {'route':<10} {'ready':>8} {'peak RSS':>9}  answers")
    for binary in binaries:
        for route, (path, content_type, body) in routes.items():
            idle, peak, statuses = run(binary, route, path, content_type, body)
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
            print(f"{os.path.basename(binary):<20} {route:<10} {idle / 1024:>4.0f} MiB "
                  f"{peak / 1024:>5.0f} MiB  {answers}", flush=True)


if __name__ == "__main__":
    main()
