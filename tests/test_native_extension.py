import pytest

from llmfast import _C


def test_byte_pair_encode_merges_lowest_rank_first():
    ranks = {bytes([b]): 100 + b for b in range(256)}
    ranks.update({b"ab": 1, b"bc": 0, b"abc": 2})
    # "bc" outranks "ab"; then "a"+"bc" forms "abc", which has a rank; "abc"+"d" has none.
    assert _C.byte_pair_encode(b"abcd", ranks) == [2, 100 + ord("d")]
    assert _C.byte_pair_encode(b"abd", ranks) == [1, 100 + ord("d")]
    assert _C.byte_pair_encode(b"abc", ranks) == [2]


def test_byte_pair_encode_missing_byte_raises_value_error():
    with pytest.raises(ValueError):
        _C.byte_pair_encode(b"xyz", {b"x": 0})
