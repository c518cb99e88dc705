-- KEYS: paused. ARGV: until (epoch us). Pauses only ever lengthen; the key expires with them.
local paused = tonumber(ARGV[1])
if paused > now and paused > tonumber(redis.call('GET', KEYS[1]) or 0) then
  redis.call('SET', KEYS[1], int(paused))
  redis.call('PEXPIREAT', KEYS[1], int(math.floor(paused / 1000) + 1))
end
return 1
