-- Sliding-window log: at most LIMIT entries with a score in (now - WINDOW, now].
-- KEYS[1] sorted set: member = request id, score = admission time (ms).
-- ARGV: limit, window_ms, member, now_ms ("" = the server's TIME).
-- Returns {allowed, remaining, reset_at_ms, retry_after_ms, now_ms}.
-- Mirrored by `limits::math::sliding_window`.
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
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
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
local allowed = 0
if count < limit then
  -- ZADD of a member already present (a retried call) does not add a second entry.
  count = count + redis.call('ZADD', key, now, ARGV[3])
  allowed = 1
  redis.call('PEXPIRE', key, window + GC_SLACK_MS)
end
-- A slot frees when the oldest entry leaves the window.
local reset_at = now + window
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
if oldest[2] then
  reset_at = tonumber(oldest[2]) + window
end
local retry_after = 0
if allowed == 0 then
  retry_after = reset_at - now
end
return {allowed, math.max(limit - count, 0), reset_at, retry_after, now}
