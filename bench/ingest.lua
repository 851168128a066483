-- wrk script used by bench/ingest_bench.py (closed-loop scenarios).
--
--   wrk -t1 -c64 -d15s --latency -s bench/ingest.lua http://127.0.0.1:PORT \
--       -- MODE BATCH_SIZE NONCE AUTH_HEADER
--
-- MODE is "track" (one event per POST /v1/track), "batch" (BATCH_SIZE events per
-- POST /v1/batch), "conversions" (one event per request, alternately an "Order Completed"
-- with revenue, products, email and phone traits and a gclid on POST /v1/track, and a page
-- view on POST /v1/page, both granting every consent category: what ad platforms take) or
-- "gtag" (GET /g/collect hits of the GA4 property G-BENCH12345, alternately page_view and
-- purchase). Every event gets a unique messageId "NONCE-THREAD-COUNTER": the relay
-- deduplicates on messageId, so a fixed body would only measure the duplicate path.
-- bench/ingest_bench.py's BodyMaker builds the same bodies for its Python generators.
-- At the end one line "WRKJSON {...}" carries the figures for the Python side to parse.

local NAMES = { "Signed Up", "Product Viewed", "Order Completed", "Cart Viewed", "Checkout Started" }

local EVENT = '{"type":"track","event":"%s","anonymousId":"anon-%d","messageId":"%s",'
  .. '"properties":{"plan":"pro","value":%d,"currency":"EUR","coupon":null,"items":2},'
  .. '"context":{"page":{"path":"/signup","url":"https://shop.example/signup?utm_source=bench&utm_medium=load",'
  .. '"title":"Sign up","referrer":""},'
  .. '"userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",'
  .. '"library":{"name":"bench","version":"1"}},"timestamp":"%s"%s}'

local UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
local CONSENT = '{"analytics":"granted","ads":"granted","ad_user_data":"granted","ad_personalization":"granted"}'

local PURCHASE = '{"type":"track","event":"Order Completed","anonymousId":"anon-%d","userId":"user-%d",'
  .. '"messageId":"%s","properties":{"order_id":"%s","revenue":%d.5,"currency":"usd","products":['
  .. '{"product_id":"p-%d","sku":"SKU-%d","name":"T-shirt","price":19.5,"quantity":1},'
  .. '{"product_id":"p-%d","sku":"SKU-%d","name":"Mug","price":%d,"quantity":2}]},'
  .. '"context":{"consent":' .. CONSENT .. ',"traits":{"email":"Buyer.%d@Example.com",'
  .. '"phone":"+1 650 555 %04d"},"page":{"path":"/checkout/thanks",'
  .. '"url":"https://shop.example/checkout/thanks?gclid=Cj0KCQbench%d","title":"Thank you",'
  .. '"referrer":"https://shop.example/cart"},"userAgent":"' .. UA .. '",'
  .. '"library":{"name":"bench","version":"1"}},"timestamp":"%s"%s}'

local PAGE = '{"type":"page","name":"Product","anonymousId":"anon-%d","messageId":"%s",'
  .. '"properties":{"path":"/p/%d","url":"https://shop.example/p/%d","title":"Product %d"},'
  .. '"context":{"consent":' .. CONSENT .. ',"page":{"path":"/p/%d",'
  .. '"url":"https://shop.example/p/%d","title":"Product %d","referrer":""},'
  .. '"userAgent":"' .. UA .. '","library":{"name":"bench","version":"1"}},"timestamp":"%s"%s}'

local GTAG = "/g/collect?v=2&tid=G-BENCH12345&gcs=G111&cid=%d.1731420000&sid=1731425080&sct=1"
  .. "&seg=1&ul=en-us&dl=https%%3A%%2F%%2Fshop.example%%2Fp%%2F%d&dt=Product&_p=%s"

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
  wrk.headers["User-Agent"] = UA
  if args[4] and args[4] ~= "" then
    wrk.headers["Authorization"] = args[4]
  end
end

local function event(ts, extra)
  counter = counter + 1
  return string.format(EVENT, NAMES[counter % #NAMES + 1], counter % 5000,
    nonce .. "-" .. tid .. "-" .. counter, counter % 1000, ts, extra)
end

-- One event of the "conversions" mix: (path, body).
local function conversion(ts, extra)
  counter = counter + 1
  local n = counter
  local id = nonce .. "-" .. tid .. "-" .. n
  if n % 2 == 0 then
    return "/v1/track", string.format(PURCHASE, n % 5000, n % 5000, id, id, 10 + n % 90,
      n % 50, n % 50, n % 70, n % 70, 5 + n % 20, n % 5000, n % 5000, n, ts, extra)
  end
  local p = n % 500
  return "/v1/page", string.format(PAGE, n % 5000, id, p, p, p, p, p, p, ts, extra)
end

-- One gtag hit: its query (GA4's hits carry no messageId; _p makes each one distinct).
local function gtag()
  counter = counter + 1
  local n = counter
  local hit = string.format(GTAG, n % 5000, n % 500, nonce .. tid .. n)
  if n % 2 == 0 then
    return hit .. "&en=purchase&ep.transaction_id=T-" .. nonce .. n .. "&epn.value=" .. (10 + n % 90)
      .. "&cu=USD"
  end
  return hit .. "&en=page_view"
end

function request()
  local ts = os.date("!%Y-%m-%dT%H:%M:%SZ")
  local body
  if mode == "gtag" then
    return wrk.format("GET", gtag(), nil, nil)
  end
  if mode == "conversions" then
    local p, b = conversion(ts, ',"sentAt":"' .. ts .. '"')
    return wrk.format("POST", p, nil, b)
  end
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
