-- wrk script used by bench/ingest_bench.py (closed-loop scenarios).
--
--   wrk -t1 -c64 -d15s --latency -s bench/ingest.lua http://127.0.0.1:PORT \
--       -- MODE BATCH_SIZE NONCE AUTH_HEADER
--
-- MODE is "track" (one event per POST /v1/track) or "batch" (BATCH_SIZE events per
-- POST /v1/batch). Every event gets a unique messageId "NONCE-THREAD-COUNTER": the relay
-- deduplicates on messageId, so a fixed body would only measure the duplicate path.
-- At the end one line "WRKJSON {...}" carries the figures for the Python side to parse.

local NAMES = { "Signed Up", "Product Viewed", "Order Completed", "Cart Viewed", "Checkout Started" }

local EVENT = '{"type":"track","event":"%s","anonymousId":"anon-%d","messageId":"%s",'
  .. '"properties":{"plan":"pro","value":%d,"currency":"EUR","coupon":null,"items":2},'
  .. '"context":{"page":{"path":"/signup","url":"https://shop.example/signup?utm_source=bench&utm_medium=load",'
  .. '"title":"Sign up","referrer":""},'
  .. '"userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",'
  .. '"library":{"name":"bench","version":"1"}},"timestamp":"%s"%s}'

local next_tid = 0
local counter = 0
local mode, batch_size, nonce, path

-- Runs in the main Lua state, once per wrk thread: give each thread its own id.
function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
end

-- Runs in each thread's Lua state.
function init(args)
  mode = args[1] or "track"
  batch_size = tonumber(args[2] or "100")
  nonce = args[3] or tostring(math.random(1, 1000000000))
  path = (mode == "batch") and "/v1/batch" or "/v1/track"
  wrk.headers["Content-Type"] = "application/json"
  if args[4] and args[4] ~= "" then
    wrk.headers["Authorization"] = args[4]
  end
end

local function event(ts, extra)
  counter = counter + 1
  return string.format(EVENT, NAMES[counter % #NAMES + 1], counter % 5000,
    nonce .. "-" .. tid .. "-" .. counter, counter % 1000, ts, extra)
end

function request()
  local ts = os.date("!%Y-%m-%dT%H:%M:%SZ")
  local body
  if mode == "batch" then
    local parts = {}
    for i = 1, batch_size do
      parts[i] = event(ts, "")
    end
    body = '{"batch":[' .. table.concat(parts, ",") .. '],"sentAt":"' .. ts .. '"}'
  else
    body = event(ts, ',"sentAt":"' .. ts .. '"')
  end
  return wrk.format("POST", path, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"err_connect":%.0f,"err_read":%.0f,'
      .. '"err_write":%.0f,"err_status":%.0f,"err_timeout":%.0f,"p50_us":%.0f,"p90_us":%.0f,'
      .. '"p99_us":%.0f,"p999_us":%.0f,"max_us":%.0f,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
