import pytest
import torch

from compressor.formats.packing import pack_bits, pack_nibbles, unpack_bits, unpack_nibbles


def test_first_element_goes_in_the_high_nibble():
    packed = pack_nibbles(torch.tensor([0x1, 0x2, 0xA, 0xF], dtype=torch.uint8))
    assert packed.tolist() == [0x12, 0xAF]


def test_odd_count_is_padded_with_a_zero_low_nibble():
    assert pack_nibbles(torch.tensor([0x7, 0x3, 0x9], dtype=torch.uint8)).tolist() == [0x73, 0x90]


def test_unpack_inverts_pack():
    codes = torch.randint(0, 16, (1001,), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), 1001), codes)


def test_four_bit_streams_are_the_nibble_layout():
    codes = torch.randint(0, 16, (1001,), dtype=torch.uint8)
    assert torch.equal(pack_bits(codes, 4), pack_nibbles(codes))


def test_two_bit_codes_fill_each_byte_from_the_top():
    assert pack_bits(torch.tensor([3, 0, 1, 2, 1], dtype=torch.uint8), 2).tolist() == [0b11000110, 0b01000000]


def test_three_bit_codes_run_across_bytes():
    # 101 011 111 000 -> 1010 1111 1000 0000
    assert pack_bits(torch.tensor([5, 3, 7, 0], dtype=torch.uint8), 3).tolist() == [0b10101111, 0b10000000]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_unpack_bits_inverts_pack_bits(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
