#!/usr/bin/env bash
# nin on Docker Swarm under load: 3 replicas of the CPU image behind HAProxy
# (deploy/swarm/stack.yml), a rolling update to new weights, a stopped and a
# killed replica while wrk drives 64 connections, and not one failed request.
#
#   bash .ci/swarm-test.sh
#
# Steps (each bounded in time):
#   1. wrk from Debian if missing; a single-node swarm
#      (`docker swarm init --advertise-addr 127.0.0.1`) unless the engine is
#      already a manager;
#   2. the HAProxy image (deploy/swarm/haproxy, Debian's haproxy) and the
#      update's target, $NIN_NEXT_IMAGE: $NIN_IMAGE plus another weights
#      file of the shipped architecture (same cost per request), trained
#      here by the image's own nin-train (1 epoch on the committed test
#      slice; kept while $NIN_IMAGE and the recipe are the same);
#   3. `docker stack deploy`, then waits until HAProxy has 3 replicas up;
#   4. steady: wrk, $LOAD_CLIENTS connections for $STEADY_SECONDS s, real
#      Fashion-MNIST test images as PNG (bench/fashion_pngs.py,
#      bench/load.lua), nothing disturbed;
#   5. disruption: wrk again, and meanwhile, each once Swarm and HAProxy
#      have 3 replicas again and $SETTLE_SECONDS s later:
#        `docker service update --image $NIN_NEXT_IMAGE` (start-first, one
#        task at a time: see the stack file; Swarm takes each old task out
#        of DNS 2 s before its SIGTERM);
#        `docker stop` of one replica's container (SIGTERM while the task
#        is still in DNS: only nin-serve's shutdown delay covers it);
#        `docker kill` of one (SIGKILL: HAProxy's retries cover it);
#   6. checks (below), a summary, and "swarm: N passed, M failed".
#
# Checks: 3 replicas ready through HAProxy; in both phases no socket error
# (connect, read, write, timeout) and no answer but 200, except 503 with
# Retry-After (the server's "overloaded, retry"); the update completes (no
# rollback) and every answer afterwards comes from the new weights; the
# stopped and the killed replicas are replaced; the load ran throughout;
# HAProxy retried no request around the `docker stop` (the server drained
# gracefully rather than being rescued by retries). Throughput: wrk's per
# phase, and HAProxy's counters sampled every 0.5 s for each disruption's
# window, with HAProxy's retries.
#
# Idempotent: a stack left by an aborted run is removed first. On exit,
# whatever the exit, the stack is removed and the swarm left if this script
# created it (now or in a run killed before it could clean up: the node
# carries the label nin.swarm-test=created). The images it builds
# (nin-haproxy:local, nin:cpu-next) are kept as a cache. Needs docker,
# python3, curl; load on loopback only (the stack publishes its ports in
# host mode on this machine).
#
# Environment: NIN_IMAGE (nin:cpu), NIN_NEXT_IMAGE (nin:cpu-next),
# NIN_LB_IMAGE (default: nin-haproxy:local, built here from
# deploy/swarm/haproxy; when set, used as it is), NIN_STACK (nin-swarm-test),
# NIN_SWARM_PORT (18080), NIN_SWARM_STATS_PORT (18404), LOAD_CLIENTS (64),
# STEADY_SECONDS (15), SETTLE_SECONDS (3), IMAGES (10), KEEP=1 keeps the
# work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

image=${NIN_IMAGE:-nin:cpu}
next_image=${NIN_NEXT_IMAGE:-nin:cpu-next}
lb_image=${NIN_LB_IMAGE:-nin-haproxy:local}
stack=${NIN_STACK:-nin-swarm-test}
port=${NIN_SWARM_PORT:-18080}
stats_port=${NIN_SWARM_STATS_PORT:-18404}
clients=${LOAD_CLIENTS:-64}
steady_seconds=${STEADY_SECONDS:-15}
settle_seconds=${SETTLE_SECONDS:-3}
images=${IMAGES:-10}
replicas=3
svc=${stack}_nin
base=http://127.0.0.1:$port
stats_url="http://127.0.0.1:$stats_port/stats;csv"

passed=0
failed=0
check() { # check NAME OK(0/1)
  if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "ok: $1"; else failed=$((failed + 1)); echo "FAILED: $1"; fi
}
say() { echo "-- $*"; }
mark() { echo "$(date +%s.%N) $1" >> "$work/events"; }

for tool in docker python3 curl; do
  command -v "$tool" >/dev/null || { echo "swarm-test: needs $tool" >&2; exit 2; }
done
if ! command -v wrk >/dev/null; then
  say "wrk from Debian"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 300 apt-get install -y -qq wrk > /dev/null
fi
docker image inspect "$image" > /dev/null 2>&1 || {
  echo "swarm-test: no image $image (build it: bash .ci/docker-images.sh cpu; or set NIN_IMAGE)" >&2
  exit 2
}

work=$(mktemp -d)
swarm_created=0
gwbridge_created=0
deployed=0
wrk_pid=
sampler_pid=
remove_stack() {
  docker stack ls --format '{{.Name}}' 2>/dev/null | grep -qx "$stack" || return 0
  timeout 60 docker stack rm "$stack" > /dev/null || true
  # Tasks stop within their stop_grace_period; then the network can go.
  for _ in $(seq 90); do
    [ -z "$(docker ps -q --filter "label=com.docker.stack.namespace=$stack")" ] && break
    sleep 1
  done
  for _ in $(seq 20); do
    docker network inspect "${stack}_default" > /dev/null 2>&1 || break
    docker network rm "${stack}_default" > /dev/null 2>&1 || sleep 1
  done
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [ -n "$wrk_pid" ] && kill "$wrk_pid" 2>/dev/null || true
  [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null || true
  # The services' last lines when something failed (not when interrupted).
  if [ "$deployed" = 1 ] && [ "$status" != 130 ] && [ "$status" != 143 ] \
    && { [ "$status" -ne 0 ] || [ "$failed" -ne 0 ]; }; then
    for service in "$svc" "${stack}_lb"; do
      echo "--- last lines of $service's log" >&2
      timeout 20 docker service logs --raw --tail 15 "$service" 2>&1 | tail -n 30 >&2 || true
    done
  fi
  say "cleaning up: stack $stack"
  remove_stack
  if [ "$swarm_created" = 1 ]; then
    timeout 60 docker swarm leave --force > /dev/null || true
    # `swarm init` made this bridge (it did not exist before); leave it as found.
    [ "$gwbridge_created" = 1 ] && docker network rm docker_gwbridge > /dev/null 2>&1 || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
  echo "swarm-test took $(($(date +%s) - started)) s"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "swarm"
case "$(docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}')" in
  "active true")
    # A swarm this script made in a run that could not clean up (killed)
    # carries its label: this run leaves it.
    if [ "$(docker node inspect self --format '{{index .Spec.Labels "nin.swarm-test"}}')" = created ]; then
      swarm_created=1
      echo "using the swarm a previous run made (it will be left on exit)"
    else
      echo "this engine is already a swarm manager: using its swarm"
    fi
    ;;
  "inactive "*)
    gwbridge_created=1
    docker network inspect docker_gwbridge > /dev/null 2>&1 && gwbridge_created=0
    swarm_created=1
    timeout 60 docker swarm init --advertise-addr 127.0.0.1 > /dev/null
    docker node update --label-add nin.swarm-test=created "$(docker info --format '{{.Swarm.NodeID}}')" > /dev/null
    echo "swarm initialised (it will be left on exit)"
    ;;
  *) echo "swarm-test: this engine is in a swarm but not a manager; cannot deploy" >&2; exit 2 ;;
esac
remove_stack

say "images: $lb_image, $next_image"
build() { # build ARGS...: docker build, its output shown only if it fails
  DOCKER_BUILDKIT=0 timeout 600 docker build -q "$@" > "$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; echo "swarm-test: docker build $* failed" >&2; exit 1; }
}
if [ -z "${NIN_LB_IMAGE:-}" ]; then
  build -t "$lb_image" deploy/swarm/haproxy
else
  docker image inspect "$lb_image" > /dev/null 2>&1 || { echo "swarm-test: no image $lb_image" >&2; exit 2; }
fi
# The next weights: the shipped network's architecture (so a request costs
# the same before and after the update, and throughput can be compared),
# trained for 1 epoch by the image's own nin-train on the committed test
# slice named as a training set (as .ci/cuda-build.sh does): seconds.
train_args=(--device cpu --data-dir /train/data --config /train/config.json --epochs 1 --seed 7 --val-size 0)
recipe=$( (docker image inspect --format '{{.Id}}' "$image"; cat weights/nin-fashion-mnist.config.json
  echo "${train_args[*]}") | sha256sum | cut -c1-16)
if [ "$(docker image inspect --format '{{index .Config.Labels "nin.swarm-test.recipe"}}' "$next_image" 2>/dev/null)" = "$recipe" ]; then
  echo "$next_image is up to date with $image"
else
  mkdir -p "$work/train/data" "$work/next"
  for kind in images-idx3 labels-idx1; do
    cp "tests/data/t10k-$kind-ubyte.gz" "$work/train/data/t10k-$kind-ubyte.gz"
    cp "tests/data/t10k-$kind-ubyte.gz" "$work/train/data/train-$kind-ubyte.gz"
  done
  cp weights/nin-fashion-mnist.config.json "$work/train/config.json"
  timeout 300 docker run --rm --user "$(id -u):$(id -g)" -v "$work/train:/train" \
    --entrypoint nin-train "$image" fit "${train_args[@]}" --out /train/run > "$work/train.log" 2>&1 \
    || { tail -n 20 "$work/train.log" >&2; echo "swarm-test: training the next weights failed" >&2; exit 1; }
  install -m 0644 "$work/train/run/nin-fashion-mnist.safetensors" "$work/next/nin-next.safetensors"
  cat > "$work/next/Dockerfile" <<'EOF'
ARG BASE
FROM ${BASE}
COPY nin-next.safetensors /opt/nin/weights/nin-next.safetensors
ENV NIN_WEIGHTS=/opt/nin/weights/nin-next.safetensors
ARG RECIPE
LABEL nin.swarm-test.recipe=${RECIPE}
EOF
  previous=$(docker image inspect --format '{{.Id}}' "$next_image" 2>/dev/null || true)
  build --build-arg "BASE=$image" --build-arg "RECIPE=$recipe" -t "$next_image" "$work/next"
  # The image this script made last time, now untagged.
  [ -n "$previous" ] && docker image rm "$previous" > /dev/null 2>&1 || true
  echo "$next_image built: $image + the shipped network trained for 1 epoch on the test slice"
fi

python3 bench/fashion_pngs.py tests/data "$work" "$images"
pngs=("$work"/image-*.png)

for p in "$port" "$stats_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "swarm-test: port $p is in use (set NIN_SWARM_PORT / NIN_SWARM_STATS_PORT)" >&2
    exit 2
  fi
done

say "deploy: stack $stack, $replicas x $image behind $lb_image on $base"
deployed=1
NIN_IMAGE=$image NIN_LB_IMAGE=$lb_image NIN_SWARM_PORT=$port NIN_SWARM_STATS_PORT=$stats_port \
  timeout 120 docker stack deploy --resolve-image never -c deploy/swarm/stack.yml "$stack" \
  > "$work/deploy.log" 2>&1 || { cat "$work/deploy.log" >&2; exit 1; }

up_count() { # replicas HAProxy has UP (status exactly "UP")
  curl -s --max-time 2 "$stats_url" 2>/dev/null | awk -F, '$1 == "nin" && $2 ~ /^nin[0-9]+$/ && $18 == "UP"' | wc -l
}
running_count() { # tasks Swarm wants running that run
  docker service ps --filter desired-state=running --format '{{.CurrentState}}' "$svc" 2>/dev/null | grep -c '^Running' || true
}
wait_for() { # wait_for SECONDS COMMAND...: true once COMMAND succeeds
  local deadline=$(($(date +%s) + $1))
  shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.25
  done
}
all_up() { [ "$(up_count)" -eq "$replicas" ] && [ "$(running_count)" -eq "$replicas" ]; }
fewer_up() { [ "$(up_count)" -lt "$replicas" ]; }
model_version() { # the model version one answer through HAProxy reports
  curl -s --max-time 10 -H 'Content-Type: image/png' --data-binary "@${pngs[0]}" "$base/classify" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["model"]["version"])'
}

t0=$(date +%s)
ok=1
wait_for 180 all_up && ok=0
check "$replicas replicas ready through HAProxy ($(($(date +%s) - t0)) s after deploy)" $ok
[ "$ok" = 0 ] || exit 1
old_version=$(model_version)
echo "serving: $old_version"

# HAProxy's statistics every 0.5 s, for the throughput of each window.
(
  while true; do
    echo "T $(date +%s.%N)"
    curl -s --max-time 2 "$stats_url" || true
    sleep 0.5
  done
) > "$work/stats.log" 2>/dev/null &
sampler_pid=$!
wait_for 10 grep -q '^# pxname' "$work/stats.log" || true # a sample before the first window

run_wrk() { # run_wrk PHASE SECONDS: in the background, RESULT line into PHASE.json
  timeout --kill-after=5 $(($2 + 60)) \
    wrk -t 2 -c "$clients" -d "${2}s" --timeout 10s -s bench/load.lua "$base/classify" -- "${pngs[@]}" \
    > "$work/$1.wrk" 2>&1 &
  wrk_pid=$!
}
finish_wrk() { # finish_wrk PHASE
  wait "$wrk_pid" || true
  wrk_pid=
  grep '^RESULT ' "$work/$1.wrk" | cut -d' ' -f2- > "$work/$1.json" || true
  [ -s "$work/$1.json" ] || { cat "$work/$1.wrk" >&2; echo "swarm-test: wrk gave no result for $1" >&2; exit 1; }
}

say "steady: $clients connections for $steady_seconds s"
mark steady-start
run_wrk steady "$steady_seconds"
finish_wrk steady
mark steady-end

say "disruption: $clients connections; rolling update to $next_image, docker stop, docker kill"
mark disruption-start
run_wrk disruption 600 # stopped with SIGINT below (wrk then reports what it did)
sleep "$settle_seconds"
mark update-start
t0=$(date +%s)
timeout 60 docker service update --detach --no-resolve-image --image "$next_image" "$svc" > /dev/null
update_state() { docker service inspect --format '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' "$svc"; }
update_done() { case "$(update_state)" in completed | paused | rollback_*) true ;; *) false ;; esac; }
wait_for 240 update_done || true
state=$(update_state)
mark update-end
update_seconds=$(($(date +%s) - t0))
ok=1
[ "$state" = completed ] && wait_for 60 all_up && ok=0
mark update-ready
check "rolling update to $next_image: $state in $update_seconds s" $ok
sleep "$settle_seconds"

# SIGTERM from outside Swarm's update: the task stays in DNS until it has
# exited, so only nin-serve's shutdown delay keeps HAProxy from sending
# requests to a closed port (Kubernetes' endpoints and SIGTERM race alike).
victim=$(docker ps -q --filter "label=com.docker.swarm.service.name=$svc" | head -n 1)
mark stop
t0=$(date +%s)
timeout 60 docker stop -t 30 "$victim" > /dev/null
stop_seconds=$(($(date +%s) - t0))
wait_for 15 fewer_up || true
ok=1
wait_for 90 all_up && ok=0
mark stop-recovered
check "replica $victim stopped (SIGTERM, exited after $stop_seconds s); back to $replicas within $(($(date +%s) - t0)) s" $ok
sleep "$settle_seconds"

victim=$(docker ps -q --filter "label=com.docker.swarm.service.name=$svc" | head -n 1)
mark kill
docker kill "$victim" > /dev/null
t0=$(date +%s)
wait_for 15 fewer_up || true
ok=1
wait_for 90 all_up && ok=0
mark kill-recovered
check "replica $victim killed (SIGKILL); Swarm and HAProxy back to $replicas within $(($(date +%s) - t0)) s" $ok
sleep "$settle_seconds"
kill -INT "$wrk_pid" 2>/dev/null || true
finish_wrk disruption
mark disruption-end
sleep 3 # a sample or two after the end (each takes up to 2.5 s)
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=

# Every replica now serves the new weights: 3 x replicas answers, one version.
versions=$(for _ in $(seq $((3 * replicas))); do model_version || echo "(no answer)"; done | sort | uniq -c)
ok=1
if [ "$(echo "$versions" | wc -l)" = 1 ] && ! echo "$versions" | grep -qF -- "$old_version"; then ok=0; fi
check "after the update every answer comes from the new weights: $(echo "$versions" | sed 's/^ *//' | paste -sd ';')" $ok

timeout 30 docker service logs --raw "${stack}_lb" > "$work/lb.log" 2>&1 || true

python3 - "$work" "$clients" > "$work/summary" <<'PY'
import json, sys
work, clients = sys.argv[1], int(sys.argv[2])
events = {}
for line in open(f"{work}/events"):
    t, name = line.split()
    events[name] = float(t)

# HAProxy CSV samples: time -> {(pxname, svname): row}
samples, t, header = [], None, None
for line in open(f"{work}/stats.log", errors="replace"):
    line = line.rstrip("\n")
    if line.startswith("T "):
        t = float(line[2:]); samples.append((t, {}))
    elif line.startswith("# "):
        header = line[2:].split(",")
    elif line and header and samples:
        row = dict(zip(header, line.split(",")))
        samples[-1][1][(row.get("pxname"), row.get("svname"))] = row

def counter(sample, key, field):
    try:
        return int(sample.get(key, {}).get(field) or 0)
    except ValueError:
        return 0

def window(start, end):
    """HAProxy's counters from the last sample before start to the first
    after end (a sample that failed leaves a gap; the window then widens,
    rather than missing what happened just after start)."""
    valid = [s for s in samples if s[1]]
    before = [s for s in valid if s[0] <= start]
    after = [s for s in valid if s[0] >= end]
    if not before or not after:
        return None
    (t1, a), (t2, b) = before[-1], after[0]
    inside = [s for s in valid if t1 <= s[0] <= t2]
    d = lambda key, field: counter(b, key, field) - counter(a, key, field)
    fe, be = ("nin", "FRONTEND"), ("nin", "BACKEND")
    return {
        "seconds": t2 - t1,
        "requests": d(fe, "req_tot"),
        "rps": d(fe, "req_tot") / (t2 - t1),
        "5xx": d(fe, "hrsp_5xx"),
        "retries": d(be, "wretr"),
        "redispatches": d(be, "wredis"),
        "conn_errors": d(be, "econ"),
        "resp_errors": d(be, "eresp"),
        "min_up": min(sum(1 for (px, sv), r in s.items() if px == "nin" and sv.startswith("nin")
                          and r.get("status") == "UP") for _, s in inside),
    }

results = {p: json.load(open(f"{work}/{p}.json")) for p in ("steady", "disruption")}
print(f"{'phase':<28}{'seconds':>8}{'requests':>10}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>9}  {'statuses':<14}{'503 no RA':>10}{'sock err':>9}")
bad = []
for p, r in results.items():
    seconds = r["duration_us"] / 1e6
    e = r["errors"]
    sock = e["connect"] + e["read"] + e["write"] + e["timeout"]
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(r["statuses"].items()))
    lat = r["latency_us"]
    print(f"{p + ' (wrk)':<28}{seconds:>8.1f}{r['requests']:>10}{r['requests'] / seconds:>8.0f}"
          f"{lat['p50'] / 1e3:>8.1f}{lat['p99'] / 1e3:>9.1f}  {statuses:<14}{r['503_without_retry_after']:>10}{sock:>9}")
    unexpected = {k: v for k, v in r["statuses"].items() if k not in ("200", "503")}
    if sock:
        bad.append(f"{p}: socket errors {e}")
    if unexpected:
        bad.append(f"{p}: answers {unexpected}")
    if r["503_without_retry_after"]:
        bad.append(f"{p}: {r['503_without_retry_after']} answers 503 without Retry-After")
    if r["requests"] == 0:
        bad.append(f"{p}: no request completed")
print()
print(f"{'HAProxy window':<28}{'seconds':>8}{'requests':>10}{'req/s':>8}{'5xx':>6}{'retries':>9}{'redisp':>8}{'conn err':>9}{'resp err':>9}{'min up':>8}")
windows = [
    ("steady", "steady-start", "steady-end"),
    ("disruption, all", "disruption-start", "disruption-end"),
    ("rolling update", "update-start", "update-ready"),
    ("docker stop to recovered", "stop", "stop-recovered"),
    ("docker kill to recovered", "kill", "kill-recovered"),
]
covered = True
retries = {}
for name, a, b in windows:
    w = window(events[a], events[b])
    retries[name] = None if w is None else w["retries"] + w["redispatches"]
    if w is None:
        print(f"{name:<28}  (no samples)")
        covered = False
        continue
    print(f"{name:<28}{w['seconds']:>8.1f}{w['requests']:>10}{w['rps']:>8.0f}{w['5xx']:>6}{w['retries']:>9}"
          f"{w['redispatches']:>8}{w['conn_errors']:>9}{w['resp_errors']:>9}{w['min_up']:>8}")
    if w["requests"] == 0:
        covered = False
covered = covered and events["disruption-end"] > events["kill-recovered"]
json.dump({"failures": bad, "covered": covered, "stop_retries": retries["docker stop to recovered"]},
          open(f"{work}/verdict.json", "w"))
PY
cat "$work/summary"
# HAProxy's log (its [WARNING] copies on stderr skipped): replicas in and
# out of rotation, and the requests it logs: those retried (retries field
# "+N") and those with an error (wrk's connection probe at start, "<BADREQ>"
# with nothing sent, is not one).
lb_log() { grep -v '^\[' "$work/lb.log" || true; }
lb_count() { lb_log | grep -cE "$1" || true; }
lb_errors=$(lb_log | awk '$3 == "nin" && $4 ~ /^nin\// && $6 != 200 && !/<BADREQ>/' | wc -l)
echo "HAProxy log: $(lb_count 'changed its IP from') replicas found in DNS," \
  "$(lb_count 'DOWN for maintenance') left DNS, $(lb_count 'Health check for server .* failed') failed" \
  "health checks, $(lb_count ' nin nin/.* [0-9]+/[0-9]+/[0-9]+/[0-9]+/\+[0-9]+ ') requests answered after a retry," \
  "$lb_errors requests with an error"
verdict() { python3 -c "import json, sys; v = json.load(open('$work/verdict.json')); $1" ; }
for phase in steady disruption; do
  problems=$(verdict "print('; '.join(f for f in v['failures'] if f.startswith('$phase:')))")
  ok=1
  [ -z "$problems" ] && ok=0
  check "$phase: no socket error, only 200 or 503 with Retry-After${problems:+ ($problems)}" $ok
done
ok=1
[ "$(verdict "print(v['covered'])")" = True ] && ok=0
check "the load ran throughout the update, the stop and the kill" $ok
stop_retries=$(verdict "print(v['stop_retries'])")
ok=1
[ "$stop_retries" = 0 ] && ok=0
check "docker stop: HAProxy retried no request ($stop_retries): nin-serve served until it was out of rotation" $ok

echo "swarm: $passed passed, $failed failed"
[ "$failed" = 0 ]
