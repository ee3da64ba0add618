import torch

from compressor.formats.packing import pack_nibbles, unpack_nibbles


def test_first_element_goes_in_the_high_nibble():
    packed = pack_nibbles(torch.tensor([0x1, 0x2, 0xA, 0xF], dtype=torch.uint8))
    assert packed.tolist() == [0x12, 0xAF]


def test_odd_count_is_padded_with_a_zero_low_nibble():
    assert pack_nibbles(torch.tensor([0x7, 0x3, 0x9], dtype=torch.uint8)).tolist() == [0x73, 0x90]


def test_unpack_inverts_pack():
    codes = torch.randint(0, 16, (1001,), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), 1001), codes)
