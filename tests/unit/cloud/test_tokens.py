"""cloud.tokens: lifetimes, verdicts and the broker's token cache, without Redis or sockets."""

from __future__ import annotations

import pytest

from cloud.auth import DEVICE_ID_METADATA
from cloud.tokens import (
    INVALID_TOKEN_MESSAGE,
    IssuedToken,
    TokenAuthenticator,
    TokenRecord,
    TokenRejection,
    hash_token,
    parse_ttl,
    token_verdict,
)
from splitsense.errors import ConfigError, DependencyError, RejectedError

TOKEN = "sst_" + "a" * 43
OTHER = "sst_" + "b" * 43
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("15m", 900), ("90s", 90), ("2w", 14 * 86400), ("45", 45)],
)
def test_parse_ttl(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1d", "3y", "", "d"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="e.g. 30d"):
        parse_ttl(text)


def test_verdict() -> None:
    rec = TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 60)
    assert token_verdict(rec, "dev-1", NOW + 1) is None
    assert token_verdict(None, "dev-1", NOW) is TokenRejection.UNKNOWN
    assert token_verdict(rec, "dev-1", NOW + 60) is TokenRejection.EXPIRED
    assert token_verdict(rec, "dev-2", NOW) is TokenRejection.WRONG_DEVICE
    revoked = TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 60, revoked_s=NOW)
    assert token_verdict(revoked, "dev-1", NOW + 1) is TokenRejection.REVOKED


def test_record_json_round_trip_and_states() -> None:
    rec = TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 60)
    assert TokenRecord.from_json(rec.to_json()) == rec and "revoked_s" not in rec.to_json()
    revoked = TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 60, NOW + 5)
    assert TokenRecord.from_json(revoked.to_json()) == revoked
    assert (rec.state(NOW), rec.state(NOW + 61), revoked.state(NOW)) == ("active", "expired", "revoked")


def test_issued_token_repr_hides_the_token() -> None:
    assert TOKEN not in repr(IssuedToken(TOKEN, TokenRecord("tok_000000000001", "d", NOW, NOW + 1)))


class FakeStore:
    """TokenStore's lookup over a dict keyed by hash, counting lookups."""

    url = "redis://broker:***@127.0.0.1:6379/0"

    def __init__(self) -> None:
        self.records: dict[str, TokenRecord] = {}
        self.lookups = 0
        self.down = False
        self.on_lookup: object = None

    def put(self, token: str, record: TokenRecord) -> None:
        self.records[hash_token(token)] = record

    async def lookup(self, token: str) -> TokenRecord | None:
        self.lookups += 1
        if self.down:
            raise DependencyError("token store at redis://broker:***@127.0.0.1:6379/0: lookup failed (ConnectionError)")
        if callable(self.on_lookup):
            self.on_lookup()
        return self.records.get(hash_token(token))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def md(device: str, token: str) -> list[tuple[str, str]]:
    return [(DEVICE_ID_METADATA, device), ("authorization", f"Bearer {token}")]


def make(store: FakeStore, mono: Clock, reasons: list[TokenRejection]) -> TokenAuthenticator:
    return TokenAuthenticator(
        store,  # type: ignore[arg-type]
        cache_ttl_s=1.0,
        on_reason=reasons.append,
        clock=lambda: NOW + mono.t,
        monotonic=mono,
    )


async def test_cached_for_the_ttl_then_read_again() -> None:
    store, mono, reasons = FakeStore(), Clock(), []  # type: ignore[var-annotated]
    store.put(TOKEN, TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 3600))
    auth = make(store, mono, reasons)
    assert await auth.authenticate(md("dev-1", TOKEN)) == "dev-1"
    mono.t = 0.5
    assert await auth.authenticate(md("dev-1", TOKEN)) == "dev-1"
    assert store.lookups == 1
    store.put(TOKEN, TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 3600, revoked_s=NOW))  # notice lost
    mono.t = 1.01
    with pytest.raises(RejectedError) as e:
        await auth.authenticate(md("dev-1", TOKEN))
    assert store.lookups == 2 and e.value.code == "UNAUTHENTICATED" and reasons == [TokenRejection.REVOKED]


async def test_a_revocation_notice_evicts_at_once() -> None:
    store, mono, reasons = FakeStore(), Clock(), []  # type: ignore[var-annotated]
    store.put(TOKEN, TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 3600))
    store.put(OTHER, TokenRecord("tok_000000000002", "dev-2", NOW, NOW + 3600))
    auth = make(store, mono, reasons)
    await auth.authenticate(md("dev-1", TOKEN))
    await auth.authenticate(md("dev-2", OTHER))
    store.put(TOKEN, TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 3600, revoked_s=NOW))
    auth.evict("tok_000000000001")
    with pytest.raises(RejectedError):
        await auth.authenticate(md("dev-1", TOKEN))
    assert await auth.authenticate(md("dev-2", OTHER)) == "dev-2"
    assert store.lookups == 3  # the other device's entry stayed cached


async def test_a_lookup_racing_a_revocation_is_not_cached() -> None:
    store, mono, reasons = FakeStore(), Clock(), []  # type: ignore[var-annotated]
    store.put(TOKEN, TokenRecord("tok_000000000001", "dev-1", NOW, NOW + 3600))
    auth = make(store, mono, reasons)
    store.on_lookup = lambda: auth.evict("tok_000000000001")  # the notice lands mid-lookup
    await auth.authenticate(md("dev-1", TOKEN))
    store.on_lookup = None
    await auth.authenticate(md("dev-1", TOKEN))
    assert store.lookups == 2


async def test_every_bad_token_gets_one_message_and_its_own_reason() -> None:
    store, mono, reasons = FakeStore(), Clock(), []  # type: ignore[var-annotated]
    store.put(TOKEN, TokenRecord("tok_000000000001", "dev-1", NOW - 100, NOW - 1))
    store.put(OTHER, TokenRecord("tok_000000000002", "dev-2", NOW, NOW + 60))
    auth = make(store, mono, reasons)
    messages = set()
    for device, token in [("dev-1", TOKEN), ("dev-1", "sst_" + "c" * 43), ("dev-1", "not-a-token"), ("dev-1", OTHER)]:
        with pytest.raises(RejectedError) as e:
            await auth.authenticate(md(device, token))
        assert e.value.code == "UNAUTHENTICATED" and token not in str(e.value)
        messages.add(str(e.value))
    assert messages == {INVALID_TOKEN_MESSAGE}
    assert reasons == ["expired", "unknown", "malformed", "wrong_device"]
    assert store.lookups == 3  # a malformed token costs no lookup


async def test_store_down_is_unavailable() -> None:
    store, mono, reasons = FakeStore(), Clock(), []  # type: ignore[var-annotated]
    store.down = True
    auth = make(store, mono, reasons)
    with pytest.raises(RejectedError) as e:
        await auth.authenticate(md("dev-1", TOKEN))
    assert e.value.code == "UNAVAILABLE" and TOKEN not in str(e.value)
    assert reasons == [TokenRejection.STORE_UNAVAILABLE]


def test_broker_config_needs_a_redis_url_for_stored_tokens() -> None:
    from splitsense.config import BrokerConfig

    with pytest.raises(ConfigError, match="broker.redis_url"):
        BrokerConfig(token_store="redis")
    with pytest.raises(ConfigError, match="token_store"):
        BrokerConfig(token_store="jwt")
    cfg = BrokerConfig(token_store="redis", redis_url="redis://broker:p@127.0.0.1:6379/0")
    assert not cfg.uses_dev_secret  # no HMAC secret is used
