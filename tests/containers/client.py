"""HTTP client for the container checks, run inside a container's network
namespace (`nsenter -t PID -n python3 client.py ...`), so that it talks to
the server on the container's own loopback: no published port, no
docker-proxy in between, no address outside this machine's sandbox.

  client.py ready SECONDS               exit 0 once /readyz answers 200
  client.py classify PNG...             POST each file to /classify, print
                                        the JSON answers as one JSON list
  client.py slow PNG COUNT              COUNT uploads of PNG sent in two
                                        halves: the first half, then "ready"
                                        on stdout, then the second half once
                                        a line arrives on stdin; prints one
                                        JSON object per upload (status, body
                                        or the error)

Standard library only: it runs with the host's python3 in any namespace.
"""

import http.client
import json
import socket
import sys
import time

HOST, PORT = "127.0.0.1", 8080


def ready(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(HOST, PORT, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return 0
        except OSError:
            pass
        time.sleep(0.2)
    return 1


def classify(paths):
    answers = []
    for path in paths:
        with open(path, "rb") as f:
            body = f.read()
        conn = http.client.HTTPConnection(HOST, PORT, timeout=30)
        conn.request("POST", "/classify?top_k=10", body, {"Content-Type": "image/png"})
        response = conn.getresponse()
        text = response.read().decode()
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}: {text}")
        answers.append(json.loads(text))
    print(json.dumps(answers))
    return 0


def slow(path, count):
    with open(path, "rb") as f:
        body = f.read()
    head = (
        f"POST /classify?top_k=10 HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    half = len(body) // 2
    sockets = []
    for _ in range(count):
        s = socket.create_connection((HOST, PORT), timeout=60)
        s.sendall(head + body[:half])
        sockets.append(s)
    print("ready", flush=True)
    sys.stdin.readline()
    for s in sockets:
        try:
            s.sendall(body[half:])
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            raw = b"".join(chunks)
            status_line, _, rest = raw.partition(b"\r\n")
            _, _, payload = rest.partition(b"\r\n\r\n")
            status = int(status_line.split()[1]) if status_line else 0
            print(json.dumps({"status": status, "body": payload.decode(errors="replace")}))
        except OSError as error:
            print(json.dumps({"status": 0, "error": repr(error)}))
        finally:
            s.close()
    return 0


def main(args):
    if args[0] == "ready":
        return ready(float(args[1]))
    if args[0] == "classify":
        return classify(args[1:])
    if args[0] == "slow":
        return slow(args[1], int(args[2]))
    raise SystemExit(f"unknown command {args[0]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
