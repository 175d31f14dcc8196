-- wrk script: POST a valid DTMF request, each with a fresh Idempotency-Key (a claim and a finish
-- in the idempotency store per request); prints the same STATUS and LATENCY lines as post.lua.
local threads = {}
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"interaction_id":"bench-1","digits":"12#","timeout_ms":5000,"sequence_matrix_key":"menu.main"}'

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  ok = 0
  other = 0
  prefix = string.format("%d-%d-", os.time(), id)
end

function request()
  counter = counter + 1
  -- wrk.format replaces wrk.headers when given headers: Content-Type goes in again
  return wrk.format(nil, nil, {["Content-Type"] = "application/json", ["Idempotency-Key"] = prefix .. counter}, nil)
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
