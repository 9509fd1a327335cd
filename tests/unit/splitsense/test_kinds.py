"""splitsense.kinds: the shared vocabulary (codec and radio kinds, the symbol prior, the encoded tensor)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitsense.errors import CodecError
from splitsense.kinds import ANS_WORD_BYTES, VALID_CODECS, Codec, EncodedTensor, Radio, SymbolPrior, parse_codec
from splitsense.wire import RadioKind


def _prior(seed: int = 0, channels: int = 3, symbols: int = 5, low: int = -2) -> SymbolPrior:
    return SymbolPrior(low=low, pmf=np.random.default_rng(seed).uniform(0.1, 1.0, size=(channels, symbols)))


# --- Codec, Radio ---------------------------------------------------------------------------


def test_codecs_and_their_sizes() -> None:
    assert VALID_CODECS == ("fp32", "fp16", "int8", "ans")
    assert [c.itemsize for c in Codec if c.fixed_size] == [4, 2, 1]
    assert parse_codec(" ANS ") is Codec.ANS and not Codec.ANS.fixed_size
    with pytest.raises(CodecError, match="ans has no fixed size"):
        _ = Codec.ANS.itemsize
    with pytest.raises(CodecError, match="ans has no fixed element type"):
        _ = Codec.ANS.wire_dtype
    with pytest.raises(CodecError, match="valid codecs: fp32, fp16, int8, ans"):
        parse_codec("rans")


def test_radio_kinds_and_the_wire_alias() -> None:
    assert [r.value for r in Radio] == ["wifi", "lte", "3g", "ble"]
    assert Radio("3g") is Radio.THREEG and Radio.BLE == "ble"
    assert RadioKind is Radio  # the wire's name for it is the same enum


# --- SymbolPrior ----------------------------------------------------------------------------


def test_prior_normalises_rows_and_knows_its_range() -> None:
    p = SymbolPrior(low=-1, pmf=[[1, 1, 2], [0, 3, 1]])  # type: ignore[arg-type]
    assert p.channels == 2 and p.n_symbols == 3 and p.low == -1 and p.high == 1
    assert p.pmf.dtype == np.float64 and p.pmf.flags.c_contiguous
    np.testing.assert_allclose(p.pmf, [[0.25, 0.25, 0.5], [0.0, 0.75, 0.25]])
    assert isinstance(SymbolPrior(low=np.int64(-3), pmf=np.ones((1, 2))).low, int)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pmf", "match"),
    [
        (np.ones(5), "channels, symbols >= 2"),  # one dimension
        (np.ones((2, 1)), "channels, symbols >= 2"),  # a single symbol
        (np.ones((0, 4)), "channels, symbols >= 2"),  # no channel
        (np.ones((2, 3, 4)), "channels, symbols >= 2"),
        (np.array([[0.5, np.nan]]), "finite"),
        (np.array([[0.5, np.inf]]), "finite"),
        (np.array([[0.5, -0.1, 0.6]]), ">= 0"),
        (np.array([[0.5, 0.5], [0.0, 0.0]]), "sum to > 0"),
    ],
)
def test_prior_refuses_tables_that_are_not_probabilities(pmf: np.ndarray, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        SymbolPrior(low=0, pmf=pmf)


def test_digest_is_stable_and_names_the_table() -> None:
    p = _prior()
    assert len(p.digest) == 16 and int(p.digest, 16) >= 0
    assert p.digest == p.digest == _prior().digest  # same table, same name, every time
    # scaling a row does not change the (normalised) table, nor its name
    assert SymbolPrior(p.low, p.pmf * 7.0).digest == p.digest
    # anything that changes what is coded changes the name
    others = [
        _prior(seed=1),
        SymbolPrior(p.low + 1, p.pmf),
        SymbolPrior(p.low, p.pmf[::-1]),
        SymbolPrior(p.low, p.pmf.T),
    ]
    assert len({p.digest, *(o.digest for o in others)}) == 1 + len(others)
    # a pinned value: sha256 of "low:shape" and the float32 table, the name a device and a broker compare
    fixed = SymbolPrior(low=-1, pmf=np.array([[1.0, 2.0, 1.0]]))
    assert fixed.digest == SymbolPrior(low=-1, pmf=np.array([[0.25, 0.5, 0.25]])).digest
    assert fixed.digest == "3977c6b5daf781a4"


def test_bits_is_the_ideal_code_length_per_channel() -> None:
    p = SymbolPrior(low=-1, pmf=np.array([[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]]))
    x = np.array([[[-1, 0, 1], [-1, 1, 1]]])  # (batch 1, channels 2, 3)
    # channel 0: 1 + 2 + 2 bits; channel 1: 3 + 2 x -log2(0.75)
    assert p.bits(x) == pytest.approx(5 + 3 - 2 * math.log2(0.75))
    assert p.bits(x.astype(np.float32)) == p.bits(x)  # integer-valued floats are symbols too
    assert p.bits(np.concatenate([x, x])) == pytest.approx(2 * p.bits(x))  # additive over the batch
    assert p.bits(x[:, :, :0]) == 0.0
    uniform = SymbolPrior(low=0, pmf=np.ones((2, 8)))
    assert uniform.bits(np.zeros((4, 2, 5), np.int64)) == pytest.approx(4 * 2 * 5 * 3)  # 3 bits a symbol


@pytest.mark.parametrize(
    ("symbols", "match"),
    [
        (np.array([[[-2, 0]], [[0, 0]]]), r"integers in \[-1, 1\]"),  # below low: would wrap around
        (np.array([[[2, 0]], [[0, 0]]]), r"integers in \[-1, 1\]"),  # above high
        (np.array([[[0.5, 0]], [[0, 0]]]), r"integers in \[-1, 1\]"),
        (np.array([[[np.nan, 0]], [[0, 0]]]), r"integers in \[-1, 1\]"),
        (np.zeros((1, 2, 3)), "1 channels but the symbols' shape \\[1, 2, 3\\] has 2"),
        (np.zeros(3), "has no on axis 1"),
    ],
)
def test_bits_refuses_what_is_not_a_code_of_this_prior(symbols: np.ndarray, match: str) -> None:
    p = SymbolPrior(low=-1, pmf=np.array([[0.2, 0.5, 0.3]]))
    with pytest.raises(CodecError, match=match):
        p.bits(symbols)


# --- EncodedTensor --------------------------------------------------------------------------


def test_encoded_tensor_normalises_and_checks_its_fields() -> None:
    t = EncodedTensor("ans", [1, np.int64(2)], bytearray(8), prior_digest="ab")  # type: ignore[arg-type]
    assert t.codec is Codec.ANS and t.shape == (1, 2) and t.data == bytes(8) and t.numel == 2 and t.nbytes == 8
    assert EncodedTensor(Codec.FP32, (1,), bytes(4)).prior_digest == ""
    with pytest.raises(CodecError, match="prior_digest must be a string"):
        EncodedTensor(Codec.ANS, (1,), b"", prior_digest=None)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="data must be bytes"):
        EncodedTensor(Codec.ANS, (1,), "abcd")  # type: ignore[arg-type]


def test_ans_validate_checks_words_and_the_prior_name_only() -> None:
    EncodedTensor(Codec.ANS, (1, 3, 4), bytes(2 * ANS_WORD_BYTES), prior_digest="0123456789abcdef").validate()
    EncodedTensor(Codec.ANS, (1, 3, 4), b"", prior_digest="0123456789abcdef").validate()  # all-lowest code
    with pytest.raises(CodecError, match="not a whole number of 4-byte words; the message is truncated"):
        EncodedTensor(Codec.ANS, (1, 3, 4), bytes(6), prior_digest="x").validate()
    with pytest.raises(CodecError, match=r"must name the symbol prior it was coded with \(prior_digest\)"):
        EncodedTensor(Codec.ANS, (1, 3, 4), bytes(4)).validate()
    with pytest.raises(CodecError, match="no elements"):
        EncodedTensor(Codec.ANS, (1, 0), b"", prior_digest="x").validate()
