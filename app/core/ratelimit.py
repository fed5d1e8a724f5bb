"""Per-key request rate limit: a token bucket in Redis (shared by API processes) or in process memory."""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from typing import Any

from app.core.config import Settings

logger = logging.getLogger("tuneforge.ratelimit")

# KEYS[1] bucket; ARGV rate per second, burst. Redis' clock, so API hosts with skewed clocks agree.
_REDIS_BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = math.min(burst, (tonumber(state[1]) or burst) + (now - (tonumber(state[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class MemoryBuckets:
    """Token buckets in this process: exact for one API process, N times the rate for N processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, *, rate: float, burst: int) -> float:
        """Take a token; 0 if allowed, else the seconds until one is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            return wait


class RedisBuckets:
    """Token buckets in Redis; falls back to memory buckets while Redis is unreachable."""

    def __init__(self, url: str, fallback: MemoryBuckets) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = self.client.register_script(_REDIS_BUCKET)
        self.fallback = fallback

    def take(self, key: str, *, rate: float, burst: int) -> float:
        """Take a token; 0 if allowed, else the seconds until one is available."""
        try:
            return float(self.script(keys=[f"tuneforge:ratelimit:{key}"], args=[rate, burst]))
        except Exception as exc:  # a limiter outage must not take the API down with it
            logger.warning("rate limiter: Redis unavailable, counting in memory: %s", type(exc).__name__)
            return self.fallback.take(key, rate=rate, burst=burst)


_memory = MemoryBuckets()


@lru_cache
def _redis_buckets(url: str) -> RedisBuckets:
    return RedisBuckets(url, _memory)


def seconds_until_allowed(settings: Settings, *, key: str) -> float:
    """Charge one request to key's bucket: 0 if allowed, else how long to wait (limit off: always 0)."""
    if settings.rate_limit_per_minute == 0:
        return 0.0
    rate = settings.rate_limit_per_minute / 60
    # Redis needs a Redis broker URL to reach; without one every backend counts in memory.
    use_redis = settings.rate_limit_backend != "memory" and settings.broker_url.startswith(("redis://", "rediss://"))
    buckets = _redis_buckets(settings.broker_url) if use_redis else _memory
    return buckets.take(key, rate=rate, burst=settings.rate_limit_burst)
