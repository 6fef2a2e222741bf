"""The Lua scripts of the login throttle's counts in Redis (``RedisLoginLimits``, throttle_redis.py).

Each test or change of the counts is one of these scripts, run atomically by
Redis (EVALSHA, loaded on NOSCRIPT): ``LIMITS`` tests (and holds) an attempt,
``FAILED`` counts a failure and decides a lockout, ``REFRESH`` keeps a
replica's holds alive. The keys they take and why are in throttle_redis.py.
"""

from __future__ import annotations

from typing import Final

from bastion.security.redis_gate import LUA_NOW

__all__ = ["FAILED", "LIMITS", "REFRESH"]

_COMMON: Final = (
    LUA_NOW
    + """local function tokens(key, cap, rate)
  local state = redis.call('HMGET', key, 't', 's')
  local t, s = tonumber(state[1]), tonumber(state[2])
  if t == nil or s == nil then return cap, now end
  if now > s then return math.min(cap, t + (now - s) * rate), now end
  return t, s
end
local function wait(t, n, rate)
  if t >= n then return 0 end
  return (n - t) / rate
end
"""
)

#: KEYS: source bucket, pair failures, user bucket, pending source, pending pair, pending user, pair lockout.
#: ARGV: now ('' = TIME), mode (0 token check, 1 password check, 2 password attempt: hold it), has user
#: (0/1), burst, rate, max_failures, user capacity, user rate, hold id, hold seconds.
#: Returns {0, user wait, only pending make it wait (0/1)}, {1, wait} (at once: from the source),
#: {2, wait} (failed attempts from the source), {3, wait} (at once: the pair) or {4, wait} (the pair is
#: locked: FAILED decided its lockout).
LIMITS: Final = (
    _COMMON
    + """
local mode, has_user = tonumber(ARGV[2]), tonumber(ARGV[3])
local burst, rate, max_failures = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ucap, urate = tonumber(ARGV[7]), tonumber(ARGV[8])
local function pending(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key)
end
local fmt = function(x) return string.format('%.17g', x) end
local here = 0
if mode > 0 then here = pending(KEYS[4]) end
local st = tokens(KEYS[1], burst, rate)
local w = wait(st, 1 + here, rate)
if w > 0 then
  if here > 0 and wait(st, 1, rate) == 0 then return {1, fmt(math.min(w, 1))} end
  return {2, fmt(w)}
end
if mode == 0 then return {0, '0', 0} end
local failures = 0
if has_user == 1 then
  local locked = tonumber(redis.call('GET', KEYS[7]) or '0')
  if locked > now then return {4, fmt(locked - now)} end
  failures = tonumber(redis.call('GET', KEYS[2]) or '0')
end
if failures + pending(KEYS[5]) >= max_failures then return {3, '1'} end
local uw, at_once = 0, 0
if has_user == 1 then
  local in_flight = pending(KEYS[6])
  local ut = tokens(KEYS[3], ucap, urate)
  uw = wait(ut, 1 + in_flight, urate)
  if uw > 0 and in_flight > 0 and wait(ut, 1, urate) == 0 then at_once = 1 end
end
if mode == 2 then
  local hold = tonumber(ARGV[10])
  local last = 5
  if has_user == 1 then last = 6 end
  for i = 4, last do
    redis.call('ZADD', KEYS[i], now + hold, ARGV[9])
    redis.call('PEXPIRE', KEYS[i], math.ceil(hold * 1000) + 1000)
  end
end
return {0, fmt(uw), at_once}
"""
)

#: KEYS: source bucket, pair failures, user bucket, this failure's answer, pair lockout. ARGV: now ('' =
#: TIME), has user (0/1), burst, rate, max_failures, user capacity, user rate, seconds a failure count lives
#: (= a lockout). Returns 1 if the pair is to be locked (its count is gone; its lockout in Redis set: until
#: now + a lockout, which ``LIMITS`` answers at once on every replica, before the store has it), else 0.
#: Idempotent with a user: the answer is kept (KEYS[4], as long as a failure count lives) and run again, the
#: script answers it and counts nothing -- so a failure whose answer was lost is run again to learn it.
#: (Without one -- a bad token -- nothing is kept: no lockout to learn, and a spray of them would leave a
#: key per failure; run again, it would spend from the source again, so a bad token's whose answer was
#: lost is not run again: counted here meanwhile, not kept.)
FAILED: Final = (
    _COMMON
    + """
local done = redis.call('GET', KEYS[4])
if done then return tonumber(done) end
local has_user = tonumber(ARGV[2])
local function take(key, cap, rate)
  local t, s = tokens(key, cap, rate)
  if t >= 1 then t = t - 1 end
  redis.call('HSET', key, 't', string.format('%.17g', t), 's', string.format('%.17g', s))
  redis.call('PEXPIRE', key, math.ceil(cap / rate * 1000) + 1000)
end
take(KEYS[1], tonumber(ARGV[3]), tonumber(ARGV[4]))
local lock = 0
if has_user == 1 then
  take(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]))
  local count = redis.call('INCR', KEYS[2])
  if count >= tonumber(ARGV[5]) then
    redis.call('DEL', KEYS[2])
    local lockout = tonumber(ARGV[8])
    redis.call('SET', KEYS[5], string.format('%.17g', now + lockout), 'PX', math.ceil(lockout * 1000))
    lock = 1
  else
    redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[8]) * 1000))
  end
  redis.call('SET', KEYS[4], lock, 'PX', math.ceil(tonumber(ARGV[8]) * 1000))
end
return lock
"""
)

#: KEYS: pending sets; ARGV: now ('' = TIME), hold seconds, then the hold id in each KEYS[i]. Pushes back
#: the expiry of each hold still there (XX: one released or expired meanwhile is not brought back).
REFRESH: Final = (
    LUA_NOW
    + """
local hold = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + hold, ARGV[i + 2])
  redis.call('PEXPIRE', key, math.ceil(hold * 1000) + 1000)
end
return 0
"""
)
