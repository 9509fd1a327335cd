"""Device tokens an operator manages: random, expiring, revocable, stored only as a hash.

With broker.token_store "redis" a device's token is ``sst_`` + 43 URL-safe characters (32 random
bytes). `splitsense cloud token issue DEVICE` prints it once; Redis keeps only its SHA-256 (a
salt or a slow hash adds nothing to 256 random bits), in the plan store's Redis under a prefix of
its own::

    splitsense:tokens:h:{sha256 hex}   JSON TokenRecord {token_id, device_id, created_s, expires_s,
                                       revoked_s?}; Redis drops it RETAIN_S after the token expires
    splitsense:tokens:ids              hash: token id -> sha256 hex (listing, revoking)
    channel splitsense:tokens:revoked  the token id, published by every revocation

Revoking marks the record (it stays until it would have expired, so `list` and the broker's
metric still say "revoked") and publishes its id. Roles (cloud/planstore.py ACL_RULES): the
"operator" user issues, lists and revokes; the "broker" user only GETs ``h:*`` keys and follows
the channel.

A broker verifies every call (`TokenAuthenticator`): the hash of the presented token is looked up
in an in-memory cache (a verified record is trusted `cache_ttl_s`, 1 s by default), else in
Redis. A revocation notice evicts the token's entry at once, and every (re)subscription clears the
cache, so a revoked token is refused on the device's next call at every broker, and within
`cache_ttl_s` even if a notice is lost. Unknown, expired, revoked, malformed or another device's
token: UNAUTHENTICATED with one message that does not say which (the reason goes to
splitsense_broker_token_rejections_total). Redis unreachable on a cache miss: UNAVAILABLE.

The token itself is never logged, put in a metric, a plan or an exception message; only its id.
`token_verdict` and `parse_ttl` are pure; `TokenStore` is the Redis I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from types import TracebackType

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from cloud.auth import Metadata, claimed_credentials
from cloud.planstore import TOKEN_KEY_PREFIX, TOKEN_REVOKED_CHANNEL, redact_url
from splitsense.errors import ConfigError, DependencyError, RejectedError

__all__ = [
    "INVALID_TOKEN_MESSAGE",
    "IssuedToken",
    "TokenAuthenticator",
    "TokenRecord",
    "TokenRejection",
    "TokenStore",
    "hash_token",
    "parse_ttl",
    "token_verdict",
]

log = logging.getLogger(__name__)

TOKEN_PREFIX = "sst_"
_TOKEN_RE = re.compile(r"^sst_[A-Za-z0-9_-]{43}$")
_TOKEN_ID_RE = re.compile(r"^tok_[0-9a-f]{12}$")
RETAIN_S = 7 * 86400  # an expired record stays this long: `list` and the metric say "expired", not "unknown"
_CLOSE_TIMEOUT_S = 2.0

# One message for every bad token: which of unknown, expired, revoked it is helps only an attacker.
INVALID_TOKEN_MESSAGE = (
    "the device token is not valid for this device (unknown, expired or revoked): "
    "an operator issues a new one with `splitsense cloud token issue DEVICE_ID`"
)
STORE_DOWN_MESSAGE = "the broker cannot check device tokens now (its token store is unreachable); retry later"


class TokenRejection(StrEnum):
    """Why a stored token was refused: the `reason` label of splitsense_broker_token_rejections_total."""

    MALFORMED = "malformed"  # not of the sst_ form: no lookup made
    UNKNOWN = "unknown"  # no record of its hash (never issued, or gone RETAIN_S after expiry)
    EXPIRED = "expired"
    REVOKED = "revoked"
    WRONG_DEVICE = "wrong_device"  # issued to another device than the call names
    NOT_ALLOWED = "not_allowed"  # a device not on broker.allowed_device_ids
    STORE_UNAVAILABLE = "store_unavailable"  # Redis unreachable on a cache miss (UNAVAILABLE)


@dataclass(frozen=True)
class TokenRecord:
    """What Redis keeps of a token: never the token, only (under its key) its hash."""

    token_id: str
    device_id: str
    created_s: float  # Unix time
    expires_s: float
    revoked_s: float | None = None

    def to_json(self) -> str:
        d = asdict(self)
        if self.revoked_s is None:
            del d["revoked_s"]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TokenRecord:
        d = json.loads(text)
        return cls(
            token_id=str(d["token_id"]),
            device_id=str(d["device_id"]),
            created_s=float(d["created_s"]),
            expires_s=float(d["expires_s"]),
            revoked_s=None if d.get("revoked_s") is None else float(d["revoked_s"]),
        )

    def state(self, now_s: float) -> str:
        """ "active", "expired" or "revoked", for `list`."""
        return "revoked" if self.revoked_s is not None else "expired" if now_s >= self.expires_s else "active"


@dataclass(frozen=True)
class IssuedToken:
    token: str = ""  # shown once to the operator; repr-free so a stray print of this shows no secret
    record: TokenRecord | None = None

    def __repr__(self) -> str:
        return f"IssuedToken(token=<hidden>, record={self.record!r})"


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a token's record is kept."""
    return hashlib.sha256(token.encode()).hexdigest()


def is_token_id(text: str) -> bool:
    return bool(_TOKEN_ID_RE.match(text))


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(text: str) -> float:
    """'30d', '12h', '15m', '90s', '2w' or a number of seconds -> seconds (> 0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"a token lifetime is a positive number with a unit s, m, h, d or w (e.g. 30d), got {text!r}")
    return float(m.group(1)) * _TTL_UNITS[m.group(2) or "s"]


def token_verdict(record: TokenRecord | None, device_id: str, now_s: float) -> TokenRejection | None:
    """Why the token whose record this is may not authenticate `device_id` now; None: it may."""
    if record is None:
        return TokenRejection.UNKNOWN
    if record.revoked_s is not None:
        return TokenRejection.REVOKED
    if now_s >= record.expires_s:
        return TokenRejection.EXPIRED
    if record.device_id != device_id:
        return TokenRejection.WRONG_DEVICE
    return None


# KEYS: record key, ids hash. ARGV: record JSON, token id, hash, unix expiry of the Redis key.
_ISSUE_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: record key. ARGV: revocation time, channel, token id. -> 1 revoked now, 0 no such record.
_REVOKE_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec['revoked_s'] == nil then
  rec['revoked_s'] = tonumber(ARGV[1])
  redis.call('SET', KEYS[1], cjson.encode(rec), 'KEEPTTL')
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


class TokenStore:
    """Token records in Redis (see the module docstring for the keys). The operator's user issues,
    lists and revokes; a broker's user only `lookup`s and follows `revocations`. Every Redis
    failure is a DependencyError naming the URL with its password hidden."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        key_prefix: str = TOKEN_KEY_PREFIX,
        channel: str = TOKEN_REVOKED_CHANNEL,
    ) -> None:
        self.url = url
        self._prefix = key_prefix
        self._channel = channel
        try:
            self._client: aioredis.Redis = aioredis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                health_check_interval=max(1, int(timeout_s * 5)),
                retry=Retry(NoBackoff(), 1),
            )
        except (ValueError, RedisError) as e:
            raise DependencyError(f"Redis URL {redact_url(url)!r} is not valid: {e}") from None
        self._issue = self._client.register_script(_ISSUE_SCRIPT)
        self._revoke = self._client.register_script(_REVOKE_SCRIPT)

    def _record_key(self, token_hash: str) -> str:
        return f"{self._prefix}:h:{token_hash}"

    @property
    def _ids_key(self) -> str:
        return f"{self._prefix}:ids"

    def _down(self, what: str, e: BaseException) -> DependencyError:
        # The type only: a Redis error may quote a key, and a key holds a token's hash.
        return DependencyError(f"token store at {redact_url(self.url)}: {what} failed ({type(e).__name__})")

    async def __aenter__(self) -> TokenStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    # -- operator ----------------------------------------------------------------------------

    async def issue(self, device_id: str, ttl_s: float, *, now_s: float | None = None) -> IssuedToken:
        """A new token for `device_id`, valid `ttl_s` from `now_s` (default: now)."""
        if not isinstance(device_id, str) or not device_id.strip() or len(device_id) > 128:
            raise ConfigError(f"a device id must be a non-empty string of at most 128 characters, got {device_id!r}")
        if not ttl_s > 0:
            raise ConfigError(f"a token lifetime must be > 0 s, got {ttl_s!r}")
        now = time.time() if now_s is None else now_s
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(f"tok_{secrets.token_hex(6)}", device_id, now, now + ttl_s)
        token_hash = hash_token(token)
        keep_until = math.ceil(max(record.expires_s, time.time()) + RETAIN_S)
        try:
            await self._issue(
                keys=[self._record_key(token_hash), self._ids_key],
                args=[record.to_json(), record.token_id, token_hash, keep_until],
            )
        except (RedisError, OSError) as e:
            raise self._down("issue", e) from None
        log.info("issued token %s for device %r, expiring at %.0f", record.token_id, device_id, record.expires_s)
        return IssuedToken(token, record)

    async def records(self) -> list[TokenRecord]:
        """Every record still kept (active, expired within RETAIN_S, revoked), oldest first; ids
        whose record Redis has dropped are pruned from the index."""
        try:
            ids = {str(k): str(v) for k, v in (await self._client.hgetall(self._ids_key)).items()}
            if not ids:
                return []
            names = list(ids)
            raws = await self._client.mget([self._record_key(ids[n]) for n in names])
            gone = [n for n, raw in zip(names, raws, strict=True) if raw is None]
            if gone:
                await self._client.hdel(self._ids_key, *gone)
        except (RedisError, OSError) as e:
            raise self._down("list", e) from None
        records = [TokenRecord.from_json(str(raw)) for raw in raws if raw is not None]
        return sorted(records, key=lambda r: (r.created_s, r.token_id))

    async def revoke(self, device_or_token_id: str, *, now_s: float | None = None) -> list[TokenRecord]:
        """Revoke one token (by its id, tok_...) or every unrevoked token of a device; returns the
        records revoked. ConfigError when nothing matches. Brokers are told at once."""
        now = time.time() if now_s is None else now_s
        if is_token_id(device_or_token_id):
            targets = [r for r in await self.records() if r.token_id == device_or_token_id]
        else:
            targets = [r for r in await self.records() if r.device_id == device_or_token_id and r.revoked_s is None]
        if not targets:
            raise ConfigError(
                f"no token to revoke with id or device {device_or_token_id!r} (see `splitsense cloud token list`)"
            )
        done = []
        try:
            for record in targets:
                token_hash = await self._client.hget(self._ids_key, record.token_id)
                if token_hash is None:
                    continue
                key = self._record_key(str(token_hash))
                if await self._revoke(keys=[key], args=[now, self._channel, record.token_id]):
                    done.append(record)
        except (RedisError, OSError) as e:
            raise self._down("revoke", e) from None
        for record in done:
            log.info("revoked token %s of device %r", record.token_id, record.device_id)
        return done

    # -- broker ------------------------------------------------------------------------------

    async def lookup(self, token: str) -> TokenRecord | None:
        """The record of `token` (by its hash), None when there is none."""
        try:
            raw = await self._client.get(self._record_key(hash_token(token)))
        except (RedisError, OSError) as e:
            raise self._down("lookup", e) from None
        return None if raw is None else TokenRecord.from_json(str(raw))

    async def follow_revocations(
        self,
        on_revoked: Callable[[str], None],
        on_subscribed: Callable[[], None],
        *,
        poll_s: float = 1.0,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
    ) -> None:
        """Call `on_revoked(token_id)` for every revocation published, `on_subscribed()` on every
        (re)subscription (notices may have been missed before it). Never returns; never raises
        for an outage (it retries with back-off); cancel it to stop."""
        delay = retry_initial_s
        down = False
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                on_subscribed()
                if down:
                    log.warning("token store at %s is back; following revocations again", redact_url(self.url))
                    down = False
                delay = retry_initial_s
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
                    if msg is not None and isinstance(msg.get("data"), str):
                        on_revoked(msg["data"])
            except (RedisError, OSError) as e:
                if not down:
                    down = True
                    log.warning(
                        "token store at %s cannot be reached while following revocations (%s); retrying",
                        redact_url(self.url),
                        type(e).__name__,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_s)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(pubsub.aclose(), _CLOSE_TIMEOUT_S)


class TokenAuthenticator:
    """Verifies stored tokens for AuthInterceptor, with a short cache that revocations evict.

    `await start()` subscribes to revocations (waiting up to `ready_timeout_s` for the first
    subscription); `await aclose()` stops. `on_reason(reason)` counts each refusal."""

    def __init__(
        self,
        store: TokenStore,
        *,
        cache_ttl_s: float = 1.0,
        allowed_device_ids: Iterable[str] = (),
        on_reason: Callable[[TokenRejection], None] | None = None,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not cache_ttl_s > 0:
            raise ConfigError(f"broker.token_cache_ttl_s must be > 0, got {cache_ttl_s!r}")
        self._store = store
        self._ttl_s = float(cache_ttl_s)
        self._allowed = frozenset(allowed_device_ids)
        self._on_reason = on_reason
        self._max_cached = max_cached
        self._clock, self._monotonic = clock, monotonic
        self._cache: dict[str, tuple[TokenRecord, float]] = {}  # token hash -> (record, cached at)
        self._generation = 0  # bumped by every eviction: a lookup that raced one is not cached
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._store_down = False

    # -- cache -------------------------------------------------------------------------------

    def evict(self, token_id: str) -> None:
        """Forget the cached record of token `token_id` (a revocation notice)."""
        self._generation += 1
        for key in [k for k, (rec, _) in self._cache.items() if rec.token_id == token_id]:
            del self._cache[key]

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()

    def _subscribed_now(self) -> None:
        self.clear()  # notices may have been missed while not subscribed
        self._subscribed.set()

    async def _record(self, token: str) -> TokenRecord | None:
        token_hash = hash_token(token)
        cached = self._cache.get(token_hash)
        if cached is not None and self._monotonic() - cached[1] < self._ttl_s:
            return cached[0]
        generation = self._generation
        record = await self._store.lookup(token)
        if record is not None and generation == self._generation:
            if len(self._cache) >= self._max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[token_hash] = (record, self._monotonic())
        elif record is None:
            self._cache.pop(token_hash, None)
        return record

    # -- verifying ---------------------------------------------------------------------------

    def _refuse(
        self, reason: TokenRejection, message: str = INVALID_TOKEN_MESSAGE, code: str = "UNAUTHENTICATED"
    ) -> RejectedError:
        if self._on_reason is not None:
            self._on_reason(reason)
        return RejectedError(message, code=code)

    async def authenticate(self, metadata: Metadata | None) -> str:
        """The authenticated device id; RejectedError UNAUTHENTICATED (one message for every bad
        token), or UNAVAILABLE when Redis cannot be asked."""
        device_id, token = claimed_credentials(metadata)
        token = token.strip()
        if not _TOKEN_RE.match(token):
            raise self._refuse(TokenRejection.MALFORMED)
        try:
            record = await self._record(token)
        except DependencyError as e:
            if not self._store_down:
                log.warning("%s; refusing calls with UNAVAILABLE until it answers", e)
                self._store_down = True
            raise self._refuse(TokenRejection.STORE_UNAVAILABLE, STORE_DOWN_MESSAGE, "UNAVAILABLE") from None
        if self._store_down:
            log.warning("token store at %s answers again", redact_url(self._store.url))
            self._store_down = False
        reason = token_verdict(record, device_id, self._clock())
        if reason is not None:
            raise self._refuse(reason)
        if self._allowed and device_id not in self._allowed:
            raise self._refuse(TokenRejection.NOT_ALLOWED, f"device {device_id!r} is not on this broker's allow-list")
        return device_id

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, ready_timeout_s: float = 2.0) -> None:
        """Follow revocations; wait (bounded) until subscribed. Redis down: warn and go on (calls
        are then refused UNAVAILABLE until it answers, and the follower keeps retrying)."""
        if self._task is None:
            self._task = asyncio.create_task(
                self._store.follow_revocations(self.evict, self._subscribed_now), name="token-revocations"
            )
        try:
            await asyncio.wait_for(self._subscribed.wait(), ready_timeout_s)
        except TimeoutError:
            log.warning("not yet subscribed to token revocations at %s; retrying", redact_url(self._store.url))

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._store.aclose()
