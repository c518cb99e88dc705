-- KEYS: pace, daily. ARGV: slot (us), spacing (us). The slot comes back only if nobody has
-- reserved after it (compare-and-set); the day's count always does. Returns 1 if it did.
local slot = tonumber(ARGV[1])
local returned = 0
if tonumber(redis.call('GET', KEYS[1]) or 0) == slot + tonumber(ARGV[2]) then
  set_pace(KEYS[1], slot)
  returned = 1
end
local counted = redis.call('HMGET', KEYS[2], 'day', 'sent')
if tonumber(counted[1]) == math.floor(slot / DAY) and (tonumber(counted[2]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[2], 'sent', -1)
end
return returned
