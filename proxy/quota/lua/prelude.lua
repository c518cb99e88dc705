-- Shared Lua: Redis TIME in microseconds, and integers written without exponent notation
-- (Lua 5.1 prints large numbers as 1.8e+15, which would lose the microseconds).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local DAY = 86400000000
local function int(x) return string.format('%d', x) end
local function set_pace(key, next_free)
  redis.call('SET', key, int(next_free), 'PX', int(math.max(0, next_free - now) / 1000 + 60000))
end
