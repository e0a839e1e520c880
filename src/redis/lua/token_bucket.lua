-- Token bucket of CAPACITY tokens refilled at CAPACITY per PERIOD, continuously.
-- The level is kept in token-milliseconds (tokens × PERIOD), so refilling is exact integer
-- arithmetic: one millisecond adds CAPACITY. A missing key is a full bucket.
-- KEYS[1] hash {level, ts}.
-- ARGV: capacity, period_ms, cost, now_ms ("" = the server's TIME), and optionally
-- "adjust": then COST is a correction after the fact (estimate-then-correct), applied
-- whatever the level: positive takes more, negative gives back; the level may go below
-- zero, a debt the next calls wait out, but never below minus one full bucket.
-- Returns {allowed, remaining_tokens, reset_at_ms (full again), retry_after_ms, now_ms}
-- (an adjustment is always allowed).
-- Mirrored by `limits::math::token_bucket`.
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3]) * period
local now = tonumber(ARGV[4])
local adjust = ARGV[5] == 'adjust'
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The expiry only collects garbage (the state above is judged by `now`), so it runs one
-- second past the moment the key stops mattering: a key read a little late, or under an
-- injected clock running behind the server's, still holds its state.
local GC_SLACK_MS = 1000
local key = KEYS[1]
local full = capacity * period
local stored = redis.call('HMGET', key, 'level', 'ts')
local level = tonumber(stored[1])
local ts = tonumber(stored[2])
if level == nil or ts == nil then
  level = full
  ts = now
end
if now > ts then
  -- Refilling is path-independent: min(min(l + a, F) + b, F) = min(l + a + b, F).
  level = math.min(full, level + math.min(now - ts, period) * capacity)
  ts = now
end
local allowed = 0
local retry_after = 0
if adjust then
  level = math.max(-full, math.min(full, level - cost))
  allowed = 1
elseif level >= cost then
  level = level - cost
  allowed = 1
else
  retry_after = math.ceil((cost - level) / capacity)
end
if allowed == 1 then
  redis.call('HSET', key, 'level', level, 'ts', ts)
  redis.call('PEXPIRE', key, math.ceil((full - level) / capacity) + 1 + GC_SLACK_MS)
end
local reset_at = now + math.ceil((full - level) / capacity)
return {allowed, math.floor(level / period), reset_at, retry_after, now}
