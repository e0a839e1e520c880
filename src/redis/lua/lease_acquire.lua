-- Concurrency leases: at most LIMIT unexpired leases. Expired leases (their holder crashed
-- or stalled) are reclaimed first. Acquiring a lease already held renews it, so a retried
-- call never takes two.
-- KEYS[1] sorted set: member = lease id, score = expiry (ms).
-- ARGV: limit, ttl_ms, lease_id, now_ms ("" = the server's TIME).
-- Returns {allowed, remaining, reset_at_ms (earliest expiry), retry_after_ms, now_ms}.
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local key = KEYS[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local held = redis.call('ZSCORE', key, ARGV[3])
local count = redis.call('ZCARD', key)
local allowed = 0
if held or count < limit then
  redis.call('ZADD', key, now + ttl, ARGV[3])
  if not held then
    count = count + 1
  end
  allowed = 1
end
local reset_at = now
local earliest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
if earliest[2] then
  reset_at = tonumber(earliest[2])
end
local latest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if latest[2] then
  redis.call('PEXPIRE', key, tonumber(latest[2]) - now)
end
local retry_after = 0
if allowed == 0 then
  retry_after = math.max(reset_at - now, 1)
end
return {allowed, math.max(limit - count, 0), reset_at, retry_after, now}
