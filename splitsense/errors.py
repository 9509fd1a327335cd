"""The one error tree of splitsense.

    SplitsenseError                  base of everything we raise on purpose
    ├── ConfigError                  a config value or CLI argument is wrong (says which, and what to do)
    ├── DataError                    a data file is missing, corrupt or not what it claims (names the file)
    ├── ModelError                   unknown model, cut out of range, missing or mismatched weights
    ├── CodecError                   an activation cannot be encoded/decoded (NaN/inf, empty, wrong dtype)
    ├── WireError                    a wire message is malformed (broker answers INVALID_ARGUMENT)
    │   └── NonFiniteOutputError     a well-formed activation the tail turns into NaN/inf logits
    ├── OffloadError                 an offload attempt did not produce a result (the edge finishes locally)
    │   ├── BrokerUnavailableError   transport down, UNAVAILABLE, breaker open
    │   ├── ShedError                broker shed the request (RESOURCE_EXHAUSTED), carries a retry hint
    │   ├── OffloadDeadlineError     the deadline passed before the answer came
    │   └── RejectedError            the broker refused the request (auth / invalid argument)
    ├── PlanError                    a plan names an unknown model, cut or codec, or is malformed
    └── DependencyError              an external service (Redis, Prometheus, Ray) cannot be reached

gRPC status codes are mapped to and from these only at the wire boundary (servicers and clients).
"""

from __future__ import annotations


class SplitsenseError(Exception):
    """Base class of every error splitsense raises on purpose."""


class ConfigError(SplitsenseError):
    pass


class DataError(SplitsenseError):
    pass


class ModelError(SplitsenseError):
    pass


class CodecError(SplitsenseError):
    pass


class WireError(SplitsenseError):
    pass


class NonFiniteOutputError(WireError):
    """A finite activation whose tail output overflows: the request, not the cloud, is at fault
    (the same window fails alike on every broker), so it is INVALID_ARGUMENT, never UNAVAILABLE."""


class OffloadError(SplitsenseError):
    pass


class BrokerUnavailableError(OffloadError):
    pass


class ShedError(OffloadError):
    def __init__(self, message: str, retry_after_ms: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class OffloadDeadlineError(OffloadError):
    pass


class RejectedError(OffloadError):
    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class PlanError(SplitsenseError):
    pass


class DependencyError(SplitsenseError):
    pass
