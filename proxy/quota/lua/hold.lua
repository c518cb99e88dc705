-- KEYS: pace. ARGV: seconds (us) from now before which no send may go.
local held = now + tonumber(ARGV[1])
if held > tonumber(redis.call('GET', KEYS[1]) or 0) then set_pace(KEYS[1], held) end
return 1
