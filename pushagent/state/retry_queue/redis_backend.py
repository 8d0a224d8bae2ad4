"""Redis retry queue: one hash per item and three sorted sets, changed only by Lua scripts.

    <prefix>item:<key>  hash: meta (JSON of the item), source, version, batch, next, created, token
    <prefix>pending     zset: key -> next attempt time
    <prefix>leased      zset: key -> lease expiry
    <prefix>dead        zset: key -> time it died

A script runs atomically on the server, so a take (reclaim expired leases,
pick due keys, lease them) can never hand one item to two drainers, and a
crash of a drainer between take and ack leaves its items leased until the
lease expires. Several Slurm array tasks can share one server. The scripts
build item keys from the prefix, so they suit a single server, not Redis
Cluster.
"""

import orjson
import redis

from pushagent.errors import QueueError
from pushagent.state.retry_queue.base import (DEAD, PENDING, QUARANTINED, QueueItem, RetryQueue, new_lease_token, now,
                                              redact_url, retry_delay)

PREFIX = "pushagent:"
PAGE = 500
META_FIELDS = ("batch_id", "index", "doc_id", "version", "version_type", "op", "input_file", "line", "kind",
               "last_error",
               "attempts", "next_attempt_at", "status")

# Leases that ran out (a drainer died) go back to pending at their old next-attempt time.
RECLAIM = """
local now = tonumber(ARGV[1])
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], key)
  redis.call('HSET', KEYS[1] .. key, 'token', '')
  redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1] .. key, 'next') or now, key)
end
"""
# ARGV: now, lease expiry, token, limit, highest next-attempt time, batch ('' for all).
TAKE = RECLAIM + """
local limit, batch, taken, skipped = tonumber(ARGV[4]), ARGV[6], {}, 0
while #taken < limit do
  local keys = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5], 'LIMIT', skipped, 1000)
  if #keys == 0 then break end
  for _, key in ipairs(keys) do
    if #taken >= limit then break end
    if batch == '' or redis.call('HGET', KEYS[1] .. key, 'batch') == batch then
      table.insert(taken, key)
      redis.call('ZREM', KEYS[2], key)
    else
      skipped = skipped + 1
    end
  end
end
local out = {}
for _, key in ipairs(taken) do
  redis.call('ZADD', KEYS[3], ARGV[2], key)
  redis.call('HSET', KEYS[1] .. key, 'token', ARGV[3])
  local fields = redis.call('HMGET', KEYS[1] .. key, 'meta', 'source')
  table.insert(out, key); table.insert(out, fields[1]); table.insert(out, fields[2])
end
return out
"""
# ARGV: now, then per item: key, meta, source, version, batch, status, next. Older versions never win.
PUT = """
local written = 0
for i = 2, #ARGV, 7 do
  local key, version = ARGV[i], ARGV[i + 3]
  local hkey = KEYS[1] .. key
  local old = redis.call('HGET', hkey, 'version')
  if not (old and old ~= '' and version ~= '' and tonumber(version) < tonumber(old)) then
    redis.call('ZREM', KEYS[2], key); redis.call('ZREM', KEYS[3], key); redis.call('ZREM', KEYS[4], key)
    redis.call('HSET', hkey, 'meta', ARGV[i + 1], 'source', ARGV[i + 2], 'version', version,
               'batch', ARGV[i + 4], 'next', ARGV[i + 6], 'token', '')
    redis.call('HSETNX', hkey, 'created', ARGV[1])
    if ARGV[i + 5] == 'dead' then redis.call('ZADD', KEYS[4], ARGV[1], key)
    else redis.call('ZADD', KEYS[2], ARGV[i + 6], key) end
    written = written + 1
  end
end
return written
"""
# ARGV: now, then per item: key, token, status ('' = ack: delete), meta, next. Only the lease holder may.
SETTLE = """
local done = 0
for i = 2, #ARGV, 5 do
  local key, hkey, status = ARGV[i], KEYS[1] .. ARGV[i], ARGV[i + 2]
  if ARGV[i + 1] ~= '' and redis.call('HGET', hkey, 'token') == ARGV[i + 1] then
    redis.call('ZREM', KEYS[3], key)
    if status == '' then redis.call('DEL', hkey)
    else
      redis.call('HSET', hkey, 'meta', ARGV[i + 3], 'next', ARGV[i + 4], 'token', '')
      if status == 'dead' then redis.call('ZADD', KEYS[4], ARGV[1], key)
      else redis.call('ZADD', KEYS[2], ARGV[i + 4], key) end
    end
    done = done + 1
  end
end
return done
"""
# ARGV: now, batch ('' for all). Pending items not leased, due later, become due now.
MAKE_DUE = """
local now, batch, moved = ARGV[1], ARGV[2], 0
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')) do
  local hkey = KEYS[1] .. key
  if batch == '' or redis.call('HGET', hkey, 'batch') == batch then
    local meta = redis.call('HGET', hkey, 'meta')
    meta = (string.gsub(meta, '"next_attempt_at":[^,}]*', '"next_attempt_at":' .. now))
    redis.call('HSET', hkey, 'meta', meta, 'next', now)
    redis.call('ZADD', KEYS[2], now, key)
    moved = moved + 1
  end
end
return moved
"""
# ARGV: per document: key, acknowledged version. Items of that version or older go, whatever their state.
RESOLVE = """
local removed = 0
for i = 1, #ARGV, 3 do
  local key, acked = ARGV[i], tonumber(ARGV[i + 1])
  local version = redis.call('HGET', KEYS[1] .. key, 'version')
  local kept = false
  if version and version ~= '' and ARGV[i + 2] == '1' and tonumber(version) == acked then
    kept = cjson.decode(redis.call('HGET', KEYS[1] .. key, 'meta'))['version_type'] == 'external_gte'
  end
  if version and version ~= '' and tonumber(version) <= acked and not kept then
    redis.call('DEL', KEYS[1] .. key)
    redis.call('ZREM', KEYS[2], key); redis.call('ZREM', KEYS[3], key); redis.call('ZREM', KEYS[4], key)
    removed = removed + 1
  end
end
return removed
"""
# ARGV: keys of dead items to delete (chosen by the caller); each is deleted only if still dead.
PURGE = """
local removed = 0
for _, key in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[4], key) == 1 then
    redis.call('DEL', KEYS[1] .. key)
    removed = removed + 1
  end
end
return removed
"""


class RedisQueue(RetryQueue):
    def __init__(self, url: str, max_attempts: int = 8, max_retry_delay: float = 6 * 3600, prefix: str = PREFIX):
        self.url = redact_url(url)
        self.max_attempts = max_attempts
        self.max_retry_delay = max_retry_delay
        self._keys = [prefix + "item:", prefix + "pending", prefix + "leased", prefix + "dead"]
        try:
            self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
            self._scripts = {name: self._redis.register_script(body)
                             for name, body in (("take", TAKE), ("put", PUT), ("settle", SETTLE),
                                                ("reclaim", RECLAIM), ("make_due", MAKE_DUE),
                                                ("resolve", RESOLVE), ("purge", PURGE))}
        except ValueError as error:
            raise QueueError(f"bad queue_url {self.url}: {error}") from None
        self._call(self._redis.ping)

    def _call(self, function, *args, **kwargs):
        """Run one Redis call; connection and server errors become a QueueError naming the URL."""
        try:
            return function(*args, **kwargs)
        except redis.RedisError as error:
            # redis-py messages name host and port only, never the password.
            raise QueueError(f"retry queue {self.url} is unreachable or failed: {error}",
                             hint="check that redis-server runs and queue_url is right; nothing was "
                                  "acknowledged that did not reach the cluster") from None

    def _script(self, name: str, argv: list):
        return self._call(self._scripts[name], keys=self._keys, args=argv)

    def put(self, items) -> None:
        moment = now()
        for item in items:
            item.status = PENDING
            item.next_attempt_at = item.next_attempt_at or moment + retry_delay(item.attempts, self.max_retry_delay)
        self._write(items, moment)

    def dead_letter(self, items) -> None:
        for item in items:
            item.status = DEAD
        self._write(items, now())

    def _write(self, items, moment: float) -> None:
        for start in range(0, len(items), PAGE):
            argv = [moment]
            for item in items[start:start + PAGE]:
                argv += [item.key, _meta(item), item.source or b"", "" if item.version is None else item.version,
                         item.batch_id, item.status, item.next_attempt_at]
            self._script("put", argv)

    def take(self, limit, lease_seconds=300.0, batch_id=None, due_only=True) -> list:
        moment, token = now(), new_lease_token()
        horizon = repr(moment) if due_only else "+inf"
        flat = self._script("take", [moment, moment + lease_seconds, token, limit, horizon, batch_id or ""])
        return [_item(flat[i + 1], flat[i + 2], token) for i in range(0, len(flat), 3)]

    def _settle(self, changes) -> int:
        done = 0
        for start in range(0, len(changes), PAGE):
            argv = [now()]
            for item, status in changes[start:start + PAGE]:
                argv += [item.key, item.lease, status or "", _meta(item) if status else "", item.next_attempt_at]
            done += self._script("settle", argv)
        return done

    def requeue_dead(self, batch_id=None) -> int:
        items = [item for item in self._all(DEAD, batch_id) if item.kind != QUARANTINED]
        for item in items:
            item.attempts, item.next_attempt_at = 0, now()
        self.put(items)
        return len(items)

    def make_due(self, batch_id=None) -> int:
        return self._script("make_due", [repr(now()), batch_id or ""])

    def _empty(self) -> bool:
        # An item is in one of the sorted sets, and Redis keeps no empty one.
        return self._call(self._redis.exists, *self._keys[1:]) == 0

    def _resolve(self, rows) -> int:
        return sum(self._script("resolve", [value for row in rows[start:start + PAGE] for value in row])
                   for start in range(0, len(rows), PAGE))

    def purge(self, batch_id=None, reason=None, older_than=None) -> int:
        before = None if older_than is None else now() - older_than
        keys = [key for key, _, (batch, created, meta) in self._scan(self._keys[3])
                if (batch_id is None or batch.decode() == batch_id)
                and (before is None or float(created) < before)
                and (reason is None or reason in orjson.loads(meta)["last_error"])]
        return sum(self._script("purge", keys[start:start + PAGE]) for start in range(0, len(keys), PAGE))

    def persistence(self) -> dict:
        """The server's persistence settings: appendonly and save, or INFO persistence where CONFIG is refused."""
        try:
            found = self._redis.config_get("appendonly")
            found.update(self._redis.config_get("save"))
            return found
        except redis.ResponseError:   # managed servers often rename or disable CONFIG
            return self._call(self._redis.info, "persistence")

    def _all(self, status: str | None, batch_id: str | None) -> list:
        return self.list(status, limit=None, batch_id=batch_id)

    def _batch_rows(self, moment):
        self._script("reclaim", [moment])
        rows, kinds = {}, {}
        for name, zset in ((None, self._keys[1]), ("leased", self._keys[2]), ("dead", self._keys[3])):
            for key, score, fields in self._scan(zset):
                batch, created, meta = fields
                kind = orjson.loads(meta)["kind"]
                kinds[kind] = kinds.get(kind, 0) + 1
                column = name or ("due" if score <= moment else "later")
                row = rows.setdefault(batch.decode(), {"due": 0, "later": 0, "leased": 0, "dead": 0, "oldest": None})
                row[column] += 1
                row["oldest"] = min(float(created), row["oldest"] or float("inf"))
        return [(batch, r["due"], r["later"], r["leased"], r["dead"], r["oldest"])
                for batch, r in sorted(rows.items())], kinds

    def _scan(self, zset: str, fields=("batch", "created", "meta")):
        """(key, score, fields) of every member of `zset`, read in pages."""
        for start in range(0, self._call(self._redis.zcard, zset), PAGE):
            members = self._call(self._redis.zrange, zset, start, start + PAGE - 1, withscores=True)
            pipe = self._redis.pipeline(transaction=False)
            for key, _ in members:
                pipe.hmget(self._keys[0] + key.decode(), *fields)
            for (key, score), values in zip(members, self._call(pipe.execute)):
                if values[0] is not None:  # deleted between the two reads
                    yield key.decode(), score, values

    def list(self, status=None, limit=100, batch_id=None) -> list:
        items = []
        for zset in ((self._keys[1], self._keys[2], self._keys[3]) if status is None else
                     (self._keys[1], self._keys[2]) if status == PENDING else (self._keys[3],)):
            for key, _, (meta, source, created) in self._scan(zset, ("meta", "source", "created")):
                item = _item(meta, source, "")
                if batch_id is None or item.batch_id == batch_id:
                    items.append((float(created), item))
        items.sort(key=lambda pair: pair[0])
        return [item for _, item in items[:limit]]

    def close(self) -> None:
        self._redis.close()


def _meta(item: QueueItem) -> bytes:
    return orjson.dumps({"key": item.key, **{name: getattr(item, name) for name in META_FIELDS}})


def _item(meta: bytes, source: bytes, lease: str) -> QueueItem:
    values = orjson.loads(meta)
    return QueueItem(**values, source=source or None, lease=lease)
