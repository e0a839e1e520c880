-- Circuit breaker, after a call. Closed: a failure is logged; THRESHOLD failures within
-- WINDOW open the breaker. Half-open: a trial's success closes it, a trial's failure opens
-- it again. Results of calls admitted before the breaker opened are ignored once it has.
-- KEYS[1] hash {state, opened_at, trials, half_open_at}; KEYS[2] sorted set of failures.
-- ARGV: outcome ("success" | "failure"), threshold, window_ms, failure_id, trial (0 | 1),
--       now_ms ("" = the server's TIME).
-- Returns {state (0 closed, 1 half-open, 2 open), changed (0 | 1)}.
local outcome = ARGV[1]
local threshold = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local trial = ARGV[5] == '1'
local now = tonumber(ARGV[6])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local key = KEYS[1]
local failures = KEYS[2]
local state = redis.call('HGET', key, 'state') or 'closed'
if state == 'open' then
  return {2, 0}
end
if state == 'half_open' then
  if not trial then
    return {1, 0}
  end
  if outcome == 'success' then
    redis.call('DEL', key, failures)
    return {0, 1}
  end
  redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'trials', 0)
  return {2, 1}
end
if outcome == 'failure' then
  redis.call('ZREMRANGEBYSCORE', failures, '-inf', now - window)
  redis.call('ZADD', failures, now, ARGV[4])
  redis.call('PEXPIRE', failures, window)
  if redis.call('ZCARD', failures) >= threshold then
    redis.call('DEL', failures)
    redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'trials', 0)
    return {2, 1}
  end
end
return {0, 0}
