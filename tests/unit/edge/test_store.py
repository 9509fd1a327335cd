"""The store-and-forward buffer of a device without local fallback: pure, no clock, no I/O."""

from __future__ import annotations

import math

import pytest

from edge.breaker import CircuitBreaker
from edge.store import DEFAULT_CAPACITY_BYTES, DEFAULT_MAX_AGE_S, ForwardStore
from pipelines.models import get_spec
from simulators.scenario import SCENARIOS
from splitsense.config import BreakerConfig
from splitsense.errors import ConfigError


def test_fifo_and_byte_accounting() -> None:
    store: ForwardStore[str] = ForwardStore(capacity_bytes=1000, max_age_s=60.0)
    assert not store and len(store) == 0 and store.head() is None and store.oldest_age_s(5.0) == 0.0
    for i, n in enumerate((100, 250, 0, 300)):
        assert store.put(f"w{i}", n, now=float(i))
    assert len(store) == 4 and store.nbytes == 650 and store.free_bytes == 350 and store.peak_bytes == 650
    assert [s.item for s in store] == ["w0", "w1", "w2", "w3"]
    assert store.oldest_age_s(10.0) == 10.0
    head = store.head()
    assert head is not None and head.item == "w0" and len(store) == 4  # head does not take it out
    assert [store.pop().item for _ in range(2)] == ["w0", "w1"]
    assert store.nbytes == 300 and store.oldest_age_s(10.0) == 8.0
    assert store.stored_total == 4 and store.popped_total == 2
    assert [s.item for s in store.take_all()] == ["w2", "w3"]
    assert not store and store.nbytes == 0 and store.peak_bytes == 650
    with pytest.raises(IndexError):
        store.pop()


def test_a_window_of_a_burst_is_removed_wherever_it_is() -> None:
    store: ForwardStore[str] = ForwardStore(capacity_bytes=100)
    for name, n in (("a", 10), ("b", 20), ("c", 30)):
        assert store.put(name, n, 0.0)
    b = list(store)[1]
    assert store.remove(b) and [s.item for s in store] == ["a", "c"]
    assert store.nbytes == 40 and store.popped_total == 1
    assert not store.remove(b)  # gone already: nothing changes
    assert store.nbytes == 40 and store.popped_total == 1 and len(store) == 2


def test_a_full_store_refuses_the_new_window_with_a_reason_and_keeps_the_old_ones() -> None:
    store: ForwardStore[int] = ForwardStore(capacity_bytes=1000)
    assert store.put(1, 400, 0.0) and store.put(2, 400, 1.0)
    refused = store.put(3, 201, 2.0)
    assert not refused and not refused.accepted
    assert refused.reason.startswith("store full: 2 windows hold 800 of 1000 B")
    assert store.refused_total == 1 and store.refused_bytes == 201
    assert [s.item for s in store] == [1, 2] and store.nbytes == 800
    assert store.put(4, 200, 3.0)  # exactly full is fine
    assert store.free_bytes == 0
    store.pop()
    assert store.put(5, 400, 4.0)  # room again once the oldest was forwarded
    assert [s.item for s in store] == [2, 4, 5]
    too_big = store.put(6, 1001, 5.0)
    assert not too_big and "larger than the whole store" in too_big.reason
    assert store.refused_total == 2 and store.stored_total == 4


def test_zero_capacity_stores_nothing_but_empty_windows() -> None:
    store: ForwardStore[int] = ForwardStore(capacity_bytes=0)
    assert not store.put(1, 1, 0.0)
    assert store.put(2, 0, 0.0)


def test_windows_older_than_the_age_bound_expire_oldest_first() -> None:
    store: ForwardStore[str] = ForwardStore(capacity_bytes=10_000, max_age_s=10.0)
    for i in range(5):
        store.put(f"w{i}", 10, now=float(2 * i))  # stored at 0, 2, 4, 6, 8
    assert store.expire(10.0) == []  # w0 is exactly 10 s old: not older than the bound
    gone = store.expire(14.5)
    assert [s.item for s in gone] == ["w0", "w1", "w2"]
    assert [s.age_s(14.5) for s in gone] == [14.5, 12.5, 10.5]
    assert store.expired_total == 3 and store.nbytes == 20 and [s.item for s in store] == ["w3", "w4"]
    assert store.head() is not None and store.oldest_age_s(14.5) == 8.5


def test_no_age_bound() -> None:
    store: ForwardStore[int] = ForwardStore(capacity_bytes=10, max_age_s=math.inf)
    store.put(1, 1, 0.0)
    assert store.expire(1e12) == [] and len(store) == 1


@pytest.mark.parametrize(
    ("capacity", "age"), [(-1, 1.0), (1.5, 1.0), (True, 1.0), (10, 0.0), (10, -1.0), (10, math.nan)]
)
def test_bad_bounds_are_config_errors(capacity: object, age: float) -> None:
    with pytest.raises(ConfigError):
        ForwardStore(capacity_bytes=capacity, max_age_s=age)  # type: ignore[arg-type]


def test_bad_sizes_are_refused_loudly() -> None:
    store: ForwardStore[int] = ForwardStore(capacity_bytes=10)
    for n in (-1, 1.5, True):
        with pytest.raises(ValueError):
            store.put(1, n, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.put(1, 1, math.nan)
    assert not store and store.refused_total == 0


def test_default_holds_the_longest_scripted_outage_of_a_sensor_node() -> None:
    # The sensor node sends one window per window_s of sound at the bottleneck, ans-coded in at
    # most ~370 bytes. Offline: the longest scripted outage, then at most one more back-off of the
    # breaker (the bound, jitter included) before its probe finds the link back.
    longest = max(end - start for sc in SCENARIOS.values() for start, end in sc["simulator"].get("outages", []))
    offline_s = longest + CircuitBreaker(BreakerConfig()).backoff_bound_s()
    windows = math.ceil(offline_s / get_spec("fsdd_digit").window_s) + 1
    store: ForwardStore[int] = ForwardStore()
    assert store.capacity_bytes == DEFAULT_CAPACITY_BYTES and store.max_age_s == DEFAULT_MAX_AGE_S
    assert all(store.put(i, 370, float(i)) for i in range(windows))
    assert store.expire(offline_s) == []  # the age bound does not bite first
