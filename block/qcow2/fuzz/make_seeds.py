#!/usr/bin/env python3
"""Writes the qcow2 fuzzer's seed images into corpus/ (run by hand; the output is committed).

extended_l2.qcow2: a 64 KiB (the fuzzer's -max_len) image with extended L2 entries and 16 KiB
clusters: header, refcount table (no blocks), L1 table and one L2 table whose entries cover
every subcluster state and the malformed bitmaps check must report. Data clusters lie past the
end of the file, where they read as zeros, so the seed stays small.
"""
import os
import struct

CS = 16384
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def extended_l2():
    img = bytearray(4 * CS)
    header = struct.pack(
        ">IIQIIQIIQQIIQQQQII",
        0x514649FB, 3,  # magic, version
        0, 0,  # no backing file
        14, 1 << 20,  # cluster_bits, virtual size
        0, 1, 2 * CS,  # crypt, l1_size, l1_table_offset
        CS, 1,  # refcount table offset, clusters
        0, 0,  # snapshots
        1 << 4, 0, 0,  # incompatible: extended L2; compatible; autoclear
        4, 112)  # refcount_order, header_length
    img[0:len(header)] = header
    struct.pack_into(">Q", img, 2 * CS, (1 << 63) | 3 * CS)  # L1[0] -> L2 table
    copied, compressed = 1 << 63, 1 << 62
    entries = [
        (copied | 4 * CS, 0x00000000_0000000F),  # subclusters 0-3 allocated
        (copied | 5 * CS, 0xFFFF0000_0000FFFF),  # half data, half zero
        (0, 0xFFFFFFFF_00000000),  # all zero, no host
        (copied | 6 * CS, 0),  # host reserved, nothing allocated
        (compressed | 7 * CS, 0),  # compressed
        (compressed | 8 * CS, 5),  # compressed with a bitmap: invalid
        (copied | 9 * CS, 0x00000001_00000001),  # allocated and zero: invalid
        (0, 0x00000000_00000003),  # allocated bits without a host: invalid
    ]
    for i, (word, bitmap) in enumerate(entries):
        struct.pack_into(">QQ", img, 3 * CS + 16 * i, word, bitmap)
    return img


os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "extended_l2.qcow2"), "wb") as f:
    f.write(extended_l2())
