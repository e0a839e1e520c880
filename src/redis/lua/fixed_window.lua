-- Fixed window: at most LIMIT units of cost per window [k * WINDOW, (k + 1) * WINDOW).
-- KEYS[1] hash {start, count}.
-- ARGV: limit, window_ms, cost, now_ms ("" = the server's TIME).
-- Returns {allowed, remaining, reset_at_ms, retry_after_ms, now_ms}.
-- Mirrored by `limits::math::fixed_window`.
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The expiry only collects garbage (the state above is judged by `now`), so it runs one
-- second past the moment the key stops mattering: a key read a little late, or under an
-- injected clock running behind the server's, still holds its state.
local GC_SLACK_MS = 1000
local key = KEYS[1]
local start = now - (now % window)
local reset_at = start + window
local stored = redis.call('HMGET', key, 'start', 'count')
local count = 0
if tonumber(stored[1]) == start then
  count = tonumber(stored[2]) or 0
end
local allowed = 0
local retry_after = 0
if count + cost <= limit then
  count = count + cost
  allowed = 1
  redis.call('HSET', key, 'start', start, 'count', count)
  redis.call('PEXPIRE', key, reset_at - now + GC_SLACK_MS)
else
  retry_after = reset_at - now
end
return {allowed, math.max(limit - count, 0), reset_at, retry_after, now}
