"""`splitsense bench coders`: the two entropy coders issue 8 named, on the real bottleneck codes.

For every model with a bottleneck, the code of every test window is coded against the model's own
per-channel table (``Quantizer.pmf``) by

    constriction   the ans codec of pipelines/codecs.py (constriction's AnsCoder, Categorical model)
    compressai     CompressAI's rANS coder (``compressai.ans.RansEncoder.encode_with_indexes``) with
                   the same table quantised by its own ``pmf_to_quantized_cdf`` (16-bit precision,
                   plus its overflow bin), as its EntropyBottleneck does

and the figures are: mean bytes per window, the ideal code length (the table's entropy of the
codes), encode and decode time per window (median), and whether every window round-trips exactly.

compressai is not a dependency of splitsense (1.2.8 pins numpy < 2 and pulls torch-geometric,
torchvision, pandas and scipy): its compiled rANS extension is loaded on its own when the wheel is
installed (``pip install --no-deps compressai==1.2.8``); otherwise its rows say so.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from pipelines.codecs import Codec, decode, encode
from pipelines.training import held_out_set, load_trained
from splitsense.kinds import SymbolPrior

__all__ = ["bench_coders"]


def _compressai_ans() -> tuple[Any, Any] | None:
    spec = importlib.util.find_spec("compressai")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    mods = []
    for name in ("ans", "_CXX"):
        files = glob.glob(os.path.join(root, f"{name}.*.so"))
        if not files:
            return None
        s = importlib.util.spec_from_file_location(name, files[0])  # the name its PyInit_ function expects
        if s is None or s.loader is None:
            return None
        m = importlib.util.module_from_spec(s)
        s.loader.exec_module(m)
        mods.append(m)
    return mods[0], mods[1]


def _median_us(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _constriction_row(codes: list[np.ndarray], prior: SymbolPrior) -> dict[str, Any]:
    enc = [encode(c, Codec.ANS, prior) for c in codes]
    exact = all(np.array_equal(decode(e, prior), c) for e, c in zip(enc, codes, strict=True))
    return {
        "coder": "constriction",
        "bytes_mean": sum(e.nbytes for e in enc) / len(enc),
        "encode_us": _median_us(lambda: [encode(c, Codec.ANS, prior) for c in codes[:50]], 5) / min(50, len(codes)),
        "decode_us": _median_us(lambda: [decode(e, prior) for e in enc[:50]], 5) / min(50, len(codes)),
        "exact": exact,
    }


def _compressai_row(codes: list[np.ndarray], prior: SymbolPrior, mods: tuple[Any, Any]) -> dict[str, Any]:
    ans, cxx = mods
    cdfs = [cxx.pmf_to_quantized_cdf([*row.tolist(), 1e-9], 16) for row in prior.pmf]
    lengths = [len(c) for c in cdfs]
    offsets = [prior.low] * prior.channels

    def index_of(c: np.ndarray) -> list[int]:
        return (
            np.broadcast_to(np.arange(prior.channels).reshape((1, -1) + (1,) * (c.ndim - 2)), c.shape)
            .reshape(-1)
            .tolist()
        )

    idx = index_of(codes[0])
    sym = [c.reshape(-1).astype(np.int32).tolist() for c in codes]  # the coder subtracts the offsets itself

    def enc_one(s: list[int]) -> bytes:
        return ans.RansEncoder().encode_with_indexes(s, idx, cdfs, lengths, offsets)

    blobs = [enc_one(s) for s in sym]
    dec = [np.asarray(ans.RansDecoder().decode_with_indexes(b, idx, cdfs, lengths, offsets)) for b in blobs]
    exact = all(np.array_equal(d, np.asarray(s)) for d, s in zip(dec, sym, strict=True))
    return {
        "coder": "compressai",
        "bytes_mean": sum(len(b) for b in blobs) / len(blobs),
        "encode_us": _median_us(lambda: [enc_one(s) for s in sym[:50]], 5) / min(50, len(sym)),
        "decode_us": _median_us(
            lambda: [ans.RansDecoder().decode_with_indexes(b, idx, cdfs, lengths, offsets) for b in blobs[:50]], 5
        )
        / min(50, len(blobs)),
        "exact": exact,
    }


def bench_coders(models: list[str]) -> dict[str, Any]:
    """Rows per model (see the module docstring); models without a bottleneck are skipped."""
    mods = _compressai_ans()
    out: dict[str, Any] = {"compressai_available": mods is not None, "models": {}}
    torch.set_num_threads(1)
    for name in models:
        tm = load_trained(name)
        m = tm.model.eval()
        k = next((k for k in range(1, m.n_stages) if m.symbol_prior(k) is not None), None)
        if k is None:
            continue
        prior = m.symbol_prior(k)
        assert prior is not None
        x, _ = held_out_set(tm)
        with torch.no_grad():
            acts = m.run(x, 0, k).numpy()
        codes = [a[None] for a in acts]
        ideal = sum(prior.bits(c) for c in codes) / len(codes) / 8
        rows = [_constriction_row(codes, prior)]
        if mods is not None:
            rows.append(_compressai_row(codes, prior, mods))
        else:
            rows.append({"coder": "compressai", "skipped": "not installed: pip install --no-deps compressai==1.2.8"})
        out["models"][name] = {"cut": k, "windows": len(codes), "ideal_bytes_mean": round(ideal, 1), "rows": rows}
    return out
