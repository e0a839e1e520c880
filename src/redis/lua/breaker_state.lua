-- Circuit breaker, read only: the state a call would meet now.
-- KEYS[1] hash {state, opened_at, trials, half_open_at}.
-- ARGV: reset_ms, now_ms ("" = the server's TIME).
-- Returns {state (0 closed, 1 half-open, 2 open), retry_after_ms}.
local reset = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local h = redis.call('HMGET', KEYS[1], 'state', 'opened_at')
local state = h[1] or 'closed'
if state == 'open' then
  local opened_at = tonumber(h[2]) or 0
  if now < opened_at + reset then
    return {2, opened_at + reset - now}
  end
  return {1, 0}
end
if state == 'half_open' then
  return {1, 0}
end
return {0, 0}
