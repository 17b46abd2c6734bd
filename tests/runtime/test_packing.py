import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbert_edge.runtime.packing import pack, pack_reference, packed_size, unpack, unpack_reference


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(2, 8))
    n = draw(st.integers(0, 300))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
    return np.array(values, dtype=np.uint8), bits


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_round_trip_and_exact_size(cb):
    codes, bits = cb
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_size(codes.size, bits) == -(-codes.size * bits // 8)
    assert np.array_equal(unpack(packed, bits, codes.size), codes)


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_fast_unpack_matches_reference_bit_for_bit(cb):
    codes, bits = cb
    packed = pack_reference(codes, bits)
    assert np.array_equal(unpack(packed, bits, codes.size), unpack_reference(packed, bits, codes.size))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 13), (384, 3), (2, 1, 9)])
def test_awkward_shapes_flatten_in_c_order(bits, shape):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=shape).astype(np.uint8)
    packed = pack(codes, bits)
    assert np.array_equal(unpack(packed, bits, codes.size).reshape(shape), codes)


def test_worked_example_3_bits():
    # codes 5, 3, 7 -> stream bits 101 110 111 (LSB first) -> 0xDD, 0x01
    assert pack(np.array([5, 3, 7], np.uint8), 3).tolist() == [0xDD, 0x01]


def test_low_bits_first_within_a_byte():
    assert pack(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [0b00_11_10_01]
    assert pack(np.array([0xA, 0x5], np.uint8), 4).tolist() == [0x5A]


def test_unused_high_bits_are_zero():
    packed = pack(np.array([7], np.uint8), 3)
    assert packed.tolist() == [7]


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bad_width(bits):
    with pytest.raises(ValueError):
        pack(np.zeros(4, np.uint8), bits)
    with pytest.raises(ValueError):
        unpack(np.zeros(4, np.uint8), bits, 4)


def test_codes_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack(np.array([4], np.uint8), 2)
    with pytest.raises(ValueError, match="out of range"):
        pack(np.array([-1, 2]), 3)


def test_too_few_bytes():
    with pytest.raises(ValueError, match="fewer"):
        unpack(np.zeros(1, np.uint8), 3, 3)
