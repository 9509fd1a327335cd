"""The plaintext rule, the TLS config fields and the listener's refusals (cloud/tls.py, config).

No sockets and no certificates: what needs a handshake is in tests/integration/cloud/test_tls.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloud.tls import listen, server_credentials
from edge.transport import channel_credentials
from splitsense.config import (
    BrokerConfig,
    Config,
    EdgeConfig,
    host_of_address,
    is_loopback_host,
    read_pem,
)
from splitsense.errors import ConfigError

SECRET = "unit-test-secret-0123456789"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.8.9.10", "127.255.255.254", "::1", "[::1]", "localhost", "LocalHost", " localhost "]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "[::]", "", "10.0.0.5", "128.0.0.1", "192.168.1.2", "example.org", "localhost.evil.org"]
)
def test_other_hosts_are_not_loopback(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("localhost:50051", "localhost"),
        ("broker.example.org:443", "broker.example.org"),
        ("[::1]:50051", "[::1]"),
        ("dns:///broker.example.org:443", "broker.example.org"),
        ("ipv4:10.0.0.5:50051", "10.0.0.5"),
        ("ipv6:[::1]:50051", "[::1]"),
        ("unix:/run/splitsense.sock", "localhost"),
        ("broker.example.org", "broker.example.org"),
    ],
)
def test_host_of_address(address: str, host: str) -> None:
    assert host_of_address(address) == host


# --- the broker ---------------------------------------------------------------------------------


def broker(**kw: Any) -> BrokerConfig:
    return BrokerConfig(**{"auth_secret": SECRET, **kw})


def test_loopback_is_served_without_tls_even_with_the_development_secret() -> None:
    assert BrokerConfig().exposure_problem() is None  # the defaults: 127.0.0.1, dev secret, plaintext
    assert BrokerConfig(host="localhost").exposure_problem() is None
    assert BrokerConfig(host="::1").exposure_problem() is None


def test_an_exposed_host_needs_tls_and_a_real_secret_in_one_line() -> None:
    problem = BrokerConfig(host="0.0.0.0").exposure_problem()
    assert problem is not None and "\n" not in problem
    assert "'0.0.0.0'" in problem and "broker.auth_secret" in problem and "broker.tls_cert_file" in problem


def test_an_exposed_host_with_a_secret_needs_tls() -> None:
    problem = broker(host="0.0.0.0").exposure_problem()
    assert problem is not None and "broker.tls_cert_file + broker.tls_key_file" in problem
    assert "auth_secret" not in problem


def test_an_exposed_host_with_tls_needs_a_real_secret() -> None:
    problem = BrokerConfig(host="10.0.0.5", tls_cert_file=Path("c.crt"), tls_key_file=Path("c.key")).exposure_problem()
    assert problem is not None and "broker.auth_secret" in problem and "tls_cert_file" not in problem
    # allow_plaintext is about TLS only: it never lets the development secret out
    problem = BrokerConfig(host="10.0.0.5", allow_plaintext=True).exposure_problem()
    assert problem is not None and "broker.auth_secret" in problem


def test_an_exposed_host_is_served_with_tls_or_when_the_scenario_allows_plaintext() -> None:
    assert broker(host="0.0.0.0", tls_cert_file="c.crt", tls_key_file="c.key").exposure_problem() is None
    assert broker(host="0.0.0.0", allow_plaintext=True).exposure_problem() is None


def test_listen_refuses_an_exposed_host_before_binding() -> None:
    with pytest.raises(ConfigError, match="refusing to serve on non-loopback broker.host"):
        listen(object(), BrokerConfig(host="0.0.0.0"))  # type: ignore[arg-type]  # never touched


def test_broker_tls_fields() -> None:
    tls = {"tls_cert_file": "/etc/t/broker.crt", "tls_key_file": "/etc/t/broker.key", "allow_plaintext": False}
    cfg = Config.from_dict({"broker": tls}).broker
    assert cfg.tls_cert_file == Path("/etc/t/broker.crt") and cfg.uses_tls and not cfg.uses_mtls
    cfg = broker(tls_cert_file="a.crt", tls_key_file="a.key", tls_client_ca_file="ca.crt")
    assert cfg.uses_mtls and cfg.tls_client_ca_file == Path("ca.crt")
    assert Config(broker=cfg).to_dict()["broker"]["tls_client_ca_file"] == "ca.crt"
    assert not BrokerConfig().uses_tls


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert_file": "a.crt"}, "broker.tls_cert_file and broker.tls_key_file go together"),
        ({"tls_key_file": "a.key"}, "broker.tls_cert_file and broker.tls_key_file go together"),
        ({"tls_client_ca_file": "ca.crt"}, "needs the broker's own certificate"),
        ({"tls_cert_file": "", "tls_key_file": "a.key"}, "broker.tls_cert_file must be null or a file path"),
        ({"tls_cert_file": 3, "tls_key_file": "a.key"}, "broker.tls_cert_file must be null or a file path"),
        ({"allow_plaintext": "yes"}, "broker.allow_plaintext must be true or false"),
    ],
)
def test_broker_tls_fields_are_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        broker(**fields)


def test_no_tls_files_no_credentials() -> None:
    assert server_credentials(BrokerConfig()) is None


def test_unreadable_or_non_pem_files_name_their_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker.tls_cert_file: cannot read .*missing.crt"):
        server_credentials(broker(tls_cert_file=tmp_path / "missing.crt", tls_key_file=tmp_path / "k"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="broker.tls_cert_file: .*junk.pem is not a PEM file"):
        server_credentials(broker(tls_cert_file=junk, tls_key_file=junk))
    with pytest.raises(ConfigError, match="edge.tls_ca_file: .*is not a PEM file"):
        read_pem(junk, "edge.tls_ca_file")


# --- the device ---------------------------------------------------------------------------------


def test_a_device_dials_loopback_in_plaintext_and_nothing_else() -> None:
    assert channel_credentials(EdgeConfig()) is None  # 127.0.0.1:50051
    assert channel_credentials(EdgeConfig(broker_address="localhost:50051")) is None
    far = EdgeConfig(broker_address="broker.example.org:443")
    problem = far.exposure_problem()
    assert problem is not None and "edge.tls_ca_file" in problem and "\n" not in problem
    with pytest.raises(ConfigError, match="refusing to send the token in plaintext"):
        channel_credentials(far)
    assert EdgeConfig(broker_address="10.0.0.5:50051", allow_plaintext=True).exposure_problem() is None
    assert EdgeConfig(broker_address="10.0.0.5:50051", tls_ca_file=Path("ca.crt")).exposure_problem() is None


def test_edge_tls_fields() -> None:
    cfg = Config.from_dict({"edge": {"tls_ca_file": "ca.crt", "tls_cert_file": "d.crt", "tls_key_file": "d.key"}}).edge
    assert (cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file) == (Path("ca.crt"), Path("d.crt"), Path("d.key"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_ca_file": "ca.crt", "tls_cert_file": "d.crt"}, "edge.tls_cert_file and edge.tls_key_file go together"),
        ({"tls_cert_file": "d.crt", "tls_key_file": "d.key"}, "needs edge.tls_ca_file"),
        ({"tls_ca_file": ""}, "edge.tls_ca_file must be null or a file path"),
        ({"allow_plaintext": 1}, "edge.allow_plaintext must be true or false"),
    ],
)
def test_edge_tls_fields_are_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EdgeConfig(**fields)


def test_a_device_ca_that_cannot_be_read_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="edge.tls_ca_file: cannot read"):
        channel_credentials(EdgeConfig(tls_ca_file=tmp_path / "nope.crt"))
