-- wrk script: POST a valid DTMF request; BURST_SHARE of them to an interaction that CXone rate limits.
-- KEYED=1: each with a fresh Idempotency-Key (a claim and a finish in the idempotency store per request).
local share = tonumber(os.getenv("BURST_SHARE") or "0")
local keyed = os.getenv("KEYED") == "1"
local threads = {}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local normal = '{"interaction_id":"bench-1","digits":"12#","timeout_ms":5000,"sequence_matrix_key":"menu.main"}'
local burst = '{"interaction_id":"burst-1","digits":"12#","timeout_ms":5000,"sequence_matrix_key":"menu.main"}'

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  ok = 0
  other = 0
  prefix = string.format("%d-%d-", os.time(), id)
end

function request()
  counter = counter + 1
  local body = normal
  if share >= 1 or (share > 0 and (counter % math.floor(1 / share)) == 0) then
    body = burst
  end
  if keyed then
    -- wrk.format replaces wrk.headers when given headers: Content-Type goes in again
    return wrk.format(nil, nil, {["Content-Type"] = "application/json", ["Idempotency-Key"] = prefix .. counter}, body)
  end
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local total_ok, total_other = 0, 0
  for _, t in ipairs(threads) do
    total_ok = total_ok + t:get("ok")
    total_other = total_other + t:get("other")
  end
  io.write(string.format("STATUS ok=%d other=%d\n", total_ok, total_other))
  io.write(string.format("LATENCY p50=%.3f p99=%.3f\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
