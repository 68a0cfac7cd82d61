-- wrk script for bench/load.sh: POST real images to /classify and count the
-- answers by HTTP status.
--
--   wrk -c 64 -d 60s -s bench/load.lua http://127.0.0.1:PORT/classify -- a.png b.png ...
--
-- Each connection sends the images in turn (a different one per request).
-- wrk itself only counts "non-2xx" answers, so every thread keeps its own
-- table of statuses and done() adds them up. done() prints one line,
-- `RESULT {json}`, that load.sh and .ci/swarm-test.sh read: requests,
-- duration, socket errors, latency percentiles (microseconds, over every
-- answer, 503s included), the statuses, and how many 503s came without the
-- Retry-After header that tells a client it may retry.

local requests = {}
local next_request = 0
statuses = {}
no_retry_after = 0

-- Runs in each thread: the script's arguments are the image files.
function init(args)
  if #args == 0 then
    error("bench/load.lua: give the image files after `--`")
  end
  for _, path in ipairs(args) do
    local file = assert(io.open(path, "rb"))
    local body = file:read("*a")
    file:close()
    requests[#requests + 1] =
      wrk.format("POST", nil, { ["Content-Type"] = "image/png" }, body)
  end
  -- Threads start at different images, so all of them are in flight at once.
  next_request = math.random(#requests) - 1
end

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 503 and not (headers["retry-after"] or headers["Retry-After"]) then
    no_retry_after = no_retry_after + 1
  end
end

-- The main script state sees every thread here, and again in done().
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency)
  local counts = {}
  local without_retry_after = 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
    without_retry_after = without_retry_after + thread:get("no_retry_after")
  end
  local parts = {}
  for status, n in pairs(counts) do
    parts[#parts + 1] = string.format('"%d":%d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},'
      .. '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d},'
      .. '"statuses":{%s},"503_without_retry_after":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max,
    table.concat(parts, ","), without_retry_after))
end
