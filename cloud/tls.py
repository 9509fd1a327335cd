"""The broker's gRPC listener: TLS from the configured files, and the rule for plaintext.

    broker config                                   listener
    tls_cert_file + tls_key_file                    TLS
      + tls_client_ca_file                          mutual TLS: a device certificate signed by that
                                                    CA is required, and its subject CN must be the
                                                    call's device id (checked per call, cloud/auth.py)
    none of them, loopback host                     plaintext (tests, demo, simulate)
    none of them, other host                        refused, unless broker.allow_plaintext
    any non-loopback host with the development      refused
    auth secret

`BrokerConfig.exposure_problem` is the rule; `listen` applies it and binds. `splitsense cloud up`
checks the same rule before it starts Ray, so that a refusal is one line and exit code 2 at once.
"""

from __future__ import annotations

import grpc

from splitsense.config import BrokerConfig, read_pem
from splitsense.errors import ConfigError

__all__ = ["listen", "server_credentials"]


def server_credentials(config: BrokerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the listener from the configured PEM files; None: plaintext."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    cert = read_pem(config.tls_cert_file, "broker.tls_cert_file")
    key = read_pem(config.tls_key_file, "broker.tls_key_file")
    ca = None if config.tls_client_ca_file is None else read_pem(config.tls_client_ca_file, "broker.tls_client_ca_file")
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    except Exception as e:  # grpc checks little here; a bad pair mostly fails at the first handshake
        raise ConfigError(f"broker.tls_cert_file/tls_key_file: not a usable certificate and key ({e})") from None


def listen(server: grpc.aio.Server, config: BrokerConfig) -> int:
    """Bind `server` on config.host:config.port, TLS or plaintext as configured; the bound port.

    ConfigError saying what to set when the host is exposed without TLS or with the development
    secret, when a PEM file cannot be read, or when the address cannot be bound."""
    problem = config.exposure_problem()
    if problem is not None:
        raise ConfigError(problem)
    credentials = server_credentials(config)
    address = f"{config.host}:{config.port}"
    cause: Exception | None = None
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        port, cause = 0, e
    if not port:
        raise ConfigError(
            f"the broker cannot listen on {address} ({cause or 'bind failed'}); is the port taken? "
            "set broker.port (0 picks a free one) or broker.host"
        )
    return port
