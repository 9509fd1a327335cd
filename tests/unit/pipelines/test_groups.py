"""pipelines.groups: several tasks sharing a front, folded into one catalog the planner can use."""

from __future__ import annotations

import pytest

from pipelines.catalog import CodecEntry, ModelCatalog
from pipelines.codecs import Codec
from pipelines.groups import group_catalog, group_members, shared_cut
from splitsense.errors import ModelError
from tests.unit.cloud.controller.synthetic import make_catalog


def _two() -> tuple[ModelCatalog, ModelCatalog]:
    a = make_catalog([1.0, 2.0, 3.0], [400, 100, 800], codec_drops={Codec.INT8: [0.01, 0.0, 0.02]}, base=0.9, name="a")
    b = make_catalog([1.0, 5.0, 1.0], [400, 100, 300], codec_drops={Codec.INT8: [0.03, 0.0, 0.0]}, base=0.8, name="b")
    return a, b


def test_shared_front_counted_once_tails_summed() -> None:
    a, b = _two()
    g = group_catalog([a, b], shared=1)
    assert g.model == "a+b"
    assert g.stage_latency_ms == (1.0, 7.0, 4.0)
    assert g.result_bytes == a.result_bytes + b.result_bytes
    assert g.level(1.0).front_latency_ms == (0.0, 1.0, 8.0, 12.0)


def test_only_shared_cuts_and_local_are_offered() -> None:
    a, b = _two()
    g = group_catalog([a, b], shared=1)
    fp32 = g.codec(Codec.FP32)
    assert fp32.available == (True, True, False, True)
    assert fp32.activation_bytes[:2] == (400, 100)  # one upload serves both tasks


def test_accuracy_binds_the_worst_task() -> None:
    a, b = _two()
    g = group_catalog([a, b], shared=1)
    int8 = g.codec(Codec.INT8)
    # cut 0: a loses 1 point, b 3: the group loses 3 points from the mean base
    assert g.base_accuracy == pytest.approx(0.85)
    assert int8.accuracy[0] == pytest.approx(0.85 - 0.03)
    assert int8.accuracy[1] == pytest.approx(0.85)


def test_the_window_is_preprocessed_once_as_the_first_member_does() -> None:
    a = make_catalog([1.0, 2.0, 3.0], [400, 100, 800], base=0.9, name="a", prep_ms=0.3, prep_ops=1000)
    b = make_catalog([1.0, 5.0, 1.0], [400, 100, 300], base=0.8, name="b", prep_ms=0.4, prep_ops=2000)
    g = group_catalog([a, b], shared=1)
    assert (g.prep_ms, g.prep_ops) == (0.3, 1000)


def test_round_trips_through_json() -> None:
    a, b = _two()
    g = group_catalog([a, b], shared=1)
    assert ModelCatalog.from_dict(g.to_dict()) == g


def test_unavailable_cut_is_never_a_choice() -> None:
    from cloud.controller.costmodel import choices_of

    a, b = _two()
    cuts = {c.cut for c in choices_of(group_catalog([a, b], shared=1))}
    assert cuts == {0, 1, 3}


def test_members_and_shared_cut_of_the_shipped_models() -> None:
    assert group_members("fsdd_speaker+fsdd_digit") == ("fsdd_speaker", "fsdd_digit")
    assert shared_cut(("fsdd_speaker", "fsdd_digit")) == 1
    with pytest.raises(ModelError, match="same sensor data"):
        shared_cut(("fsdd_speaker", "uci_har"))
    with pytest.raises(ModelError, match="distinct"):
        group_members("a+a")


def test_a_codec_missing_from_one_member_is_left_out() -> None:
    a, b = _two()
    b2 = ModelCatalog.from_dict({**b.to_dict(), "codecs": [c.to_dict() for c in b.codecs if c.codec is Codec.FP32]})
    g = group_catalog([a, b2], shared=1)
    assert [c.codec for c in g.codecs] == [Codec.FP32]
    assert isinstance(g.codecs[0], CodecEntry)
