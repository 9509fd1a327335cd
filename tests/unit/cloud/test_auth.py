"""cloud.auth: per-device HMAC tokens from call metadata, decided without sockets."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from cloud.auth import (
    DEVICE_ID_METADATA,
    TOKEN_METADATA,
    Authenticator,
    device_id_of,
    device_token,
    is_open_method,
)
from splitsense.errors import ConfigError, RejectedError

SECRET = "unit-test-secret-0123456789"


def md(device: str | None = "dev-1", token: str | None = None, *, bearer: bool = True) -> list[tuple[str, str]]:
    out = []
    if device is not None:
        out.append((DEVICE_ID_METADATA, device))
    if token is not None:
        out.append(("authorization", f"Bearer {token}") if bearer else (TOKEN_METADATA, token))
    return out


def test_token_is_hex_hmac_sha256_of_the_device_id() -> None:
    t = device_token(SECRET, "dev-1")
    assert t == hmac.new(SECRET.encode(), b"dev-1", hashlib.sha256).hexdigest()
    assert len(t) == 64 and int(t, 16) >= 0
    assert device_token(SECRET, "dev-1") == t  # deterministic: no table needed
    assert device_token(SECRET, "dev-2") != t
    assert device_token(SECRET + "x", "dev-1") != t


@pytest.mark.parametrize("bearer", [True, False])
def test_valid_token_authenticates_its_device(bearer: bool) -> None:
    auth = Authenticator(SECRET)
    assert auth.authenticate(md("dev-1", device_token(SECRET, "dev-1"), bearer=bearer)) == "dev-1"


def test_bearer_scheme_and_hex_case_are_tolerated() -> None:
    auth = Authenticator(SECRET)
    tok = device_token(SECRET, "dev-1").upper()
    assert auth.authenticate([(DEVICE_ID_METADATA, "dev-1"), ("authorization", f"bearer {tok}")]) == "dev-1"


def test_bytes_metadata_values() -> None:
    auth = Authenticator(SECRET)
    tok = device_token(SECRET, "dev-1").encode()
    assert auth.authenticate([(DEVICE_ID_METADATA, b"dev-1"), (TOKEN_METADATA, tok)]) == "dev-1"


def reject(auth: Authenticator, metadata: list[tuple[str, str]] | None) -> str:
    with pytest.raises(RejectedError) as e:
        auth.authenticate(metadata)
    assert e.value.code == "UNAUTHENTICATED"
    return str(e.value)


def test_missing_device_id() -> None:
    msg = reject(Authenticator(SECRET), md(None, device_token(SECRET, "dev-1")))
    assert DEVICE_ID_METADATA in msg


def test_no_metadata_at_all() -> None:
    assert DEVICE_ID_METADATA in reject(Authenticator(SECRET), None)


def test_missing_token_says_how_to_send_one() -> None:
    msg = reject(Authenticator(SECRET), md("dev-1", None))
    assert "missing token" in msg and "authorization: Bearer" in msg and "splitsense cloud token" in msg


def test_token_of_another_device_is_rejected() -> None:
    msg = reject(Authenticator(SECRET), md("dev-1", device_token(SECRET, "dev-2")))
    assert "not valid for device 'dev-1'" in msg


def test_token_of_another_secret_is_rejected() -> None:
    reject(Authenticator(SECRET), md("dev-1", device_token("another-secret-0123456789", "dev-1")))


def test_garbage_token_is_rejected() -> None:
    reject(Authenticator(SECRET), md("dev-1", "not-hex-at-all"))
    reject(Authenticator(SECRET), [(DEVICE_ID_METADATA, "dev-1"), ("authorization", "Basic abc")])


def test_allow_list() -> None:
    auth = Authenticator(SECRET, allowed_device_ids=["dev-1"])
    assert auth.authenticate(md("dev-1", device_token(SECRET, "dev-1"))) == "dev-1"
    msg = reject(auth, md("dev-2", device_token(SECRET, "dev-2")))
    assert "allow-list" in msg


def test_overlong_device_id() -> None:
    long_id = "d" * 500
    msg = reject(Authenticator(SECRET), [(DEVICE_ID_METADATA, long_id), (TOKEN_METADATA, "x")])
    assert "at most 128" in msg


def test_bad_secret_or_device_id_for_tokens() -> None:
    with pytest.raises(ConfigError):
        device_token("", "dev-1")
    with pytest.raises(ConfigError):
        device_token(SECRET, "")
    with pytest.raises(ConfigError):
        Authenticator("")


def test_health_and_reflection_stay_open() -> None:
    assert is_open_method("/grpc.health.v1.Health/Check")
    assert is_open_method("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_open_method("/splitsense.v1.OffloadService/Offload")
    assert not is_open_method("/splitsense.v1.PlanService/WatchPlan")


def test_device_id_of() -> None:
    assert device_id_of(md("dev-9")) == "dev-9"
    assert device_id_of([("X-Splitsense-Device-Id", "dev-3")]) == "dev-3"
    assert device_id_of(None) is None
    assert device_id_of([]) is None


def test_cli_prints_the_token_of_the_configured_secret() -> None:
    from typer.testing import CliRunner

    from splitsense.cli import app
    from splitsense.config import Config

    result = CliRunner().invoke(app, ["cloud", "token", "dev-7"])
    assert result.exit_code == 0, result.output
    assert device_token(Config().broker.auth_secret, "dev-7") in result.output
    assert "DEVELOPMENT" in result.output  # the dev secret is called out
