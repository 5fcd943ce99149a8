-- The latest-state merge of iotpipe, run inside Redis so that it is atomic per device and needs
-- one round trip. It must behave exactly like `iotpipe_pipeline::change::merge` (a property test
-- in this crate runs both on the same records and compares outcomes and final states).
--
-- KEYS[1]: the device's hash.
-- ARGV[1]: record id (32 hex chars)   ARGV[2]: device ts (epoch ms)
-- ARGV[3]: arrival stamp, zero-padded to 20 digits (compared as a string: it exceeds 2^53)
-- ARGV[4]: receive time (epoch ms)     ARGV[5..]: metric name, canonical JSON value, ...
--
-- Hash layout: `seq`, `ts`, `last_seen`, `recent` ("rid:arrival:seq,..." for the last 16 changes) and one
-- `m:<name>` per field holding "ts|arrival|rid|seq|json" (the JSON last, so it may contain '|').
--
-- Returns {'c', seq, name, json, ...} for a change, {'r', seq, name, json, ...} to re-emit the change
-- of a replayed record with its original seq, or {'u', 0} when nothing changed.
local key = KEYS[1]
local rid = ARGV[1]
local ts = tonumber(ARGV[2])
local arrival = ARGV[3]
local received = tonumber(ARGV[4])
local FIELD = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$'

local ls = redis.call('HGET', key, 'last_seen')
if (not ls) or tonumber(ls) < received then
  redis.call('HSET', key, 'last_seen', ARGV[4])
end

local recent = redis.call('HGET', key, 'recent') or ''
-- A replay is the same event again: same record id and same arrival stamp.
for r, a, s in string.gmatch(recent, '(%x+):(%d+):(%d+)') do
  if r == rid and a == arrival then
    local out = {'r', tonumber(s)}
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
      if string.sub(all[i], 1, 2) == 'm:' then
        local _, fa, frid, fseq, fv = string.match(all[i + 1], FIELD)
        if frid == rid and fa == arrival and fseq == s then
          out[#out + 1] = string.sub(all[i], 3)
          out[#out + 1] = fv
        end
      end
    end
    if #out == 2 then return {'u', 0} end
    return out
  end
end

local nxt = tonumber(redis.call('HGET', key, 'seq') or '0') + 1
local out = {'c', nxt}
local touched = false
for i = 5, #ARGV, 2 do
  local name, v = ARGV[i], ARGV[i + 1]
  local fkey = 'm:' .. name
  local cur = redis.call('HGET', key, fkey)
  if cur then
    local fts, fa, frid, fseq, fv = string.match(cur, FIELD)
    fts = tonumber(fts)
    local newer = ts > fts or (ts == fts and (arrival > fa or (arrival == fa and rid > frid)))
    if newer then
      touched = true
      if fv ~= v then
        redis.call('HSET', key, fkey, ARGV[2] .. '|' .. arrival .. '|' .. rid .. '|' .. nxt .. '|' .. v)
        out[#out + 1] = name
        out[#out + 1] = v
      else
        redis.call('HSET', key, fkey, ARGV[2] .. '|' .. arrival .. '|' .. rid .. '|' .. fseq .. '|' .. fv)
      end
    end
  else
    touched = true
    redis.call('HSET', key, fkey, ARGV[2] .. '|' .. arrival .. '|' .. rid .. '|' .. nxt .. '|' .. v)
    out[#out + 1] = name
    out[#out + 1] = v
  end
end

local st = redis.call('HGET', key, 'ts')
if touched or not st then
  if (not st) or tonumber(st) < ts then
    redis.call('HSET', key, 'ts', ARGV[2])
  end
end
if #out == 2 then return {'u', 0} end

redis.call('HSET', key, 'seq', nxt)
local list = {}
for entry in string.gmatch(recent, '(%x+:%d+:%d+)') do
  list[#list + 1] = entry
end
list[#list + 1] = rid .. ':' .. arrival .. ':' .. nxt
while #list > 16 do
  table.remove(list, 1)
end
redis.call('HSET', key, 'recent', table.concat(list, ','))
return out
