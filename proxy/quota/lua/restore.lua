-- KEYS: pace, daily, paused. ARGV: day, count known before the outage, sends made during it,
-- hold (us), pause until (epoch us or 0). Puts back what a replica learned while Redis was
-- away, and what a restarted (empty) Redis forgot. Returns the day's count.
local day = tonumber(ARGV[1])
local counted = redis.call('HMGET', KEYS[2], 'day', 'sent')
local sent = 0
if tonumber(counted[1]) == day then sent = tonumber(counted[2]) or 0 end
if day == math.floor(now / DAY) then
  sent = math.max(0, math.max(sent, tonumber(ARGV[2])) + tonumber(ARGV[3]))
  redis.call('HSET', KEYS[2], 'day', int(day), 'sent', int(sent))
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
local held = now + tonumber(ARGV[4])
if held > tonumber(redis.call('GET', KEYS[1]) or 0) then set_pace(KEYS[1], held) end
local paused = tonumber(ARGV[5])
if paused > now and paused > tonumber(redis.call('GET', KEYS[3]) or 0) then
  redis.call('SET', KEYS[3], int(paused))
  redis.call('PEXPIREAT', KEYS[3], int(math.floor(paused / 1000) + 1))
end
return sent
