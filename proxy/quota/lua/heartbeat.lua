-- KEYS: replicas. ARGV: replica id, ttl (us), age (us). Returns {replicas alive, replicas
-- whose heartbeat is at most `age` old}.
redis.call('ZADD', KEYS[1], int(now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now - tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], int(tonumber(ARGV[2]) / 1000 * 10))
local fresh = redis.call('ZCOUNT', KEYS[1], int(now - tonumber(ARGV[3])), '+inf')
return {redis.call('ZCARD', KEYS[1]), fresh}
