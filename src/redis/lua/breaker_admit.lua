-- Circuit breaker, before a call: closed admits; open refuses until RESET has passed, then
-- turns half-open; half-open admits at most MAX trial calls per round. A round whose trial
-- calls never reported (their callers crashed) ends after RESET and a new one starts.
-- KEYS[1] hash {state, opened_at, trials, half_open_at}.
-- ARGV: reset_ms, half_open_max, now_ms ("" = the server's TIME).
-- Returns {admitted, state (0 closed, 1 half-open, 2 open), retry_after_ms, trial}.
local reset = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local key = KEYS[1]
local h = redis.call('HMGET', key, 'state', 'opened_at', 'trials', 'half_open_at')
local state = h[1] or 'closed'
local trials = tonumber(h[3]) or 0
local since = tonumber(h[4]) or now
if state == 'open' then
  local opened_at = tonumber(h[2]) or 0
  if now < opened_at + reset then
    return {0, 2, opened_at + reset - now, 0}
  end
  state = 'half_open'
  trials = 0
  since = now
  redis.call('HSET', key, 'state', state, 'trials', 0, 'half_open_at', now)
end
if state == 'half_open' then
  if trials >= max and now >= since + reset then
    trials = 0
    since = now
    redis.call('HSET', key, 'trials', 0, 'half_open_at', now)
  end
  if trials < max then
    redis.call('HSET', key, 'trials', trials + 1)
    return {1, 1, 0, 1}
  end
  return {0, 1, math.max(since + reset - now, 1), 0}
end
return {1, 0, 0, 0}
