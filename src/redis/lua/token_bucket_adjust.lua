-- Corrects a token bucket after the fact (estimate-then-correct): DELTA tokens more
-- (positive) or given back (negative), with the same refill as token_bucket.lua. The level
-- may go below zero, a debt the next calls wait out, but never below minus one full
-- bucket; it never rises above full.
-- KEYS[1] hash {level, ts}.
-- ARGV: capacity, period_ms, delta, now_ms ("" = the server's TIME).
-- Returns {1, remaining_tokens, reset_at_ms (full again), 0, now_ms}.
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local delta = tonumber(ARGV[3]) * period
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
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
  level = math.min(full, level + math.min(now - ts, period) * capacity)
  ts = now
end
level = math.max(-full, math.min(full, level - delta))
redis.call('HSET', key, 'level', level, 'ts', ts)
redis.call('PEXPIRE', key, math.ceil((full - level) / capacity) + 1 + GC_SLACK_MS)
local reset_at = now + math.ceil((full - level) / capacity)
return {1, math.floor(level / period), reset_at, 0, now}
