-- KEYS: daily, paused. Returns {sent today, paused until (us) or 0}.
local counted = redis.call('HMGET', KEYS[1], 'day', 'sent')
local sent = 0
if tonumber(counted[1]) == math.floor(now / DAY) then sent = tonumber(counted[2]) or 0 end
local paused = tonumber(redis.call('GET', KEYS[2]) or 0)
if paused <= now then paused = 0 end
return {sent, paused}
