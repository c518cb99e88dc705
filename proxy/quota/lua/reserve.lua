-- KEYS: pace, daily, paused. ARGV: spacing (us), daily quota.
-- Returns {status, delay_us, sent_today, at_us}: status 0 = slot at `at`; 1 = paused until
-- `at`; 2 = the day's quota is used up, it resets at `at`.
local spacing = tonumber(ARGV[1])
local quota = tonumber(ARGV[2])
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or 0))
local day = math.floor(slot / DAY)
local counted = redis.call('HMGET', KEYS[2], 'day', 'sent')
local sent = 0
if tonumber(counted[1]) == day then sent = tonumber(counted[2]) or 0 end
local paused = tonumber(redis.call('GET', KEYS[3]) or 0)
if paused > slot then return {1, 0, sent, paused} end
if sent >= quota then return {2, 0, sent, (day + 1) * DAY} end
sent = sent + 1
redis.call('HSET', KEYS[2], 'day', int(day), 'sent', int(sent))
redis.call('EXPIRE', KEYS[2], ARGV[3])
set_pace(KEYS[1], slot + spacing)
return {0, slot - now, sent, slot}
