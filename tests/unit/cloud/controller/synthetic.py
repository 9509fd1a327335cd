"""Synthetic catalogs and hypothesis strategies shared by the cost-model and planner tests."""

from __future__ import annotations

from hypothesis import strategies as st

from cloud.controller.costmodel import CloudState, DeviceCostProfile
from pipelines.catalog import CodecEntry, LevelEntry, ModelCatalog
from pipelines.codecs import Codec
from pipelines.power import Radio


def make_catalog(
    stage_ms: list[float],
    fp32_bytes: list[int],
    *,
    level_factors: dict[float, list[float]] | None = None,
    level_drops: dict[float, list[float]] | None = None,
    codec_drops: dict[Codec, list[float]] | None = None,
    base: float = 0.9,
    window_s: float = 1.0,
    result_bytes: int = 40,
    name: str = "synthetic",
    prep_ms: float = 0.0,
    prep_ops: int = 0,
) -> ModelCatalog:
    """Synthetic catalog (same shape as test_costmodel's): per-stage latency, fp32 bytes per cut
    0..N-1, per level a latency factor per stage and an accuracy drop per cut 0..N, per codec an
    accuracy drop per cut 0..N-1 (fp16 halves the bytes, int8 quarters them); no preprocessing unless
    `prep_ms`/`prep_ops` say so."""
    n = len(stage_ms)
    level_factors, level_drops, codec_drops = level_factors or {}, level_drops or {}, codec_drops or {}

    def cum(values: list[float]) -> tuple[float, ...]:
        out = [0.0]
        for v in values:
            out.append(out[-1] + v)
        return tuple(out)

    levels = [LevelEntry(1.0, cum(stage_ms), tuple(int(x) for x in cum([100.0] * n)), (base,) * (n + 1))]
    for lvl, factors in level_factors.items():
        drops = level_drops.get(lvl, [0.0] * (n + 1))
        levels.append(
            LevelEntry(
                lvl,
                cum([s * f for s, f in zip(stage_ms, factors, strict=True)]),
                tuple(int(x) for x in cum([100.0 * f for f in factors])),
                tuple(max(base - d, 0.0) for d in drops),
            )
        )
    codecs = [CodecEntry(Codec.FP32, (*fp32_bytes, 0), (base,) * (n + 1))]
    for codec, div in ((Codec.FP16, 2), (Codec.INT8, 4)):
        if codec in codec_drops:
            codecs.append(
                CodecEntry(
                    codec,
                    (*(max(b // div, 1) for b in fp32_bytes), 0),
                    (*(max(base - d, 0.0) for d in codec_drops[codec]), base),
                )
            )
    return ModelCatalog(
        model=name,
        stage_names=tuple(f"s{i}" for i in range(n)),
        stage_latency_ms=tuple(stage_ms),
        stage_macs=(1,) * n,
        stage_params=(100,) * n,
        activation_shapes=tuple((max(b // 4, 1),) for b in fp32_bytes) + ((10,),),
        result_bytes=result_bytes,
        window_s=window_s,
        base_accuracy=base,
        levels=tuple(levels),
        codecs=tuple(codecs),
        prep_ms=prep_ms,
        prep_ops=prep_ops,
    )


@st.composite
def catalogs(draw: st.DrawFn, prep: bool = False) -> ModelCatalog:
    """A synthetic catalog; `prep`: with a window preprocessing (prep_ms, prep_ops) too."""
    n = draw(st.integers(2, 6))
    stage_ms = draw(st.lists(st.floats(0.01, 50.0), min_size=n, max_size=n))
    fp32_bytes = draw(st.lists(st.integers(4, 2_000_000), min_size=n, max_size=n))
    levels = draw(st.sets(st.sampled_from([0.9, 0.7, 0.5]), max_size=2))
    factors = {lv: draw(st.lists(st.floats(0.2, 1.0), min_size=n, max_size=n)) for lv in levels}
    drop = st.floats(0.0, 0.1)
    drops = {lv: [0.0, *draw(st.lists(drop, min_size=n, max_size=n))] for lv in levels}
    codecs = draw(st.sets(st.sampled_from([Codec.FP16, Codec.INT8])))
    cdrops = {c: draw(st.lists(drop, min_size=n, max_size=n)) for c in codecs}
    return make_catalog(
        stage_ms,
        fp32_bytes,
        level_factors=factors,
        level_drops=drops,
        codec_drops=cdrops,
        base=draw(st.floats(0.5, 1.0)),
        window_s=draw(st.sampled_from([0.05, 1.0, 2.56, 20.0])),
        result_bytes=draw(st.integers(0, 4096)),
        prep_ms=draw(st.floats(0.001, 5.0)) if prep else 0.0,
        prep_ops=draw(st.integers(1, 2_000_000)) if prep else 0,
    )


devices = st.builds(
    DeviceCostProfile,
    name=st.just("dev"),
    speed_factor=st.floats(0.5, 20.0),
    active_mw=st.floats(0.0, 7000.0),
    idle_mw=st.floats(0.0, 3000.0),
    radio=st.sampled_from(list(Radio)),
)
clouds = st.builds(
    CloudState,
    speedup_vs_host=st.floats(0.5, 10.0),
    queue_ms=st.floats(0.0, 100.0),
    overhead_ms=st.floats(0.0, 20.0),
)
