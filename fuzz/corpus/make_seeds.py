#!/usr/bin/env python3
"""Writes the seed corpora of the fuzzers (fuzz/corpus/capi, fuzz/corpus/drive): short, valid call
sequences in the input layouts that fuzz/capi_fuzzer.cpp and fuzz/drive_fuzzer.cpp decode (their
header comments). Run it after changing a layout; the files are committed."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- capi_fuzzer ---------------------------------------------------------------------------------
CREATE, FORK, FREE, REMOVE, LENGTH, APPEND, ATTEND, SPARSE, PREFETCH, FLUSH, STATS, NULLCACHE, CHECK, \
    APPEND_AT, FORK_AT, CHUNK, SLICE, STATE = range(18)
F32, F16, BF16 = 0, 1, 2
Q8_0, Q4_0 = "q8_0", "q4_0"  # h2 bits 5-6 (quantized kv dtypes, C API 0.3)


def header(ssd=False, dtype=F16, sparf=False, layers=1, kv_heads=1, group=1, softcap=False, page=3, chunks=16,
           scale=False, magnitude=1, threads=1, write_batch=0, caller_threads=False, salt=7):
    quant = dtype in (Q8_0, Q4_0)
    h0 = (ssd * 1) | ((F16 if quant else dtype) << 1) | (sparf << 3) | ((layers == 2) << 4) | \
         ((kv_heads == 2) << 5) | ((group == 2) << 6) | (softcap << 7)
    h1 = page | ((chunks - 1) << 2) | (scale << 7)
    h2 = magnitude | ((threads == 2) << 2) | (write_batch << 3) | (quant << 5) | ((dtype == Q4_0) << 6) | \
         (caller_threads << 7)
    return [h0, h1, h2, salt]


def append(sel, layer, n, how=0, seed=1):  # how: 0 f32 rows, 1 cache-dtype rows
    return [APPEND, sel, layer, n, how, seed]


def attend(layer, sels, flags=0, seed=3):
    return [ATTEND, layer, len(sels) - 1] + sels + [flags, seed]


def sparse(layer, sels, mode, a=0, b=0, flags=0, seed=5):
    return [SPARSE, layer, len(sels) - 1] + sels + [flags, seed, mode, a, b]


def append_at(sel, layer, n, how=0, seed=1, pos=0):  # pos: 0 at the end, 0xff past it, 0xfe before
    return [APPEND_AT, sel, layer, n, how, seed, pos]


def chunk(layer, entries, flags=0, seed=4, slice_byte=None):  # entries: (sel, position byte, rows byte)
    out = [CHUNK, layer, len(entries) - 1]
    for e in entries:
        out += list(e)
    out += [flags] + ([slice_byte] if flags & 128 else []) + [seed]
    return out


def attend_slice(layer, sels, ith_nth, flags=0, seed=6):  # ith_nth: bits 0-6 nth - 1 (mod 5), bits 3+ ith
    return [SLICE, layer, len(sels) - 1] + sels + [flags, seed, ith_nth]


CAPI = {
    "host-f16-basic": header() + [CREATE] + append(0, 0, 10) + attend(0, [0]) + [CHECK, 0],
    "host-f32-gqa-fork-remove": header(dtype=F32, layers=2, kv_heads=2, group=2, page=1, chunks=24) + [CREATE]
    + append(0, 0, 7) + append(0, 1, 5, 0, 2) + [FORK, 0, 0] + append(1, 0, 3, 0, 3)
    + [REMOVE, 0, 2, 3, 0] + attend(0, [0, 1]) + attend(1, [1, 0], 1) + [STATS, 0, LENGTH, 1, 1, 0],
    "host-bf16-sparf": header(dtype=BF16, sparf=True, chunks=32) + [CREATE] + append(0, 0, 40, 1)
    + sparse(0, [0], 1) + sparse(0, [0], 2, 64) + sparse(0, [0], 3, 16, 8) + sparse(0, [0], 7, 3),
    "host-small-pages-softcap": header(dtype=F16, page=0, chunks=32, softcap=True, scale=True, magnitude=3,
                                       threads=2) + [CREATE, CREATE] + append(0, 0, 13) + append(1, 0, 9, 1)
    + [FORK, 1, 0] + append(2, 0, 5) + [REMOVE, 0, 4, 0, 1] + attend(0, [0, 1, 2]) + [FREE, 1, CHECK, 0],
    "ssd-f16-flush": header(ssd=True, chunks=8, write_batch=1) + [CREATE] + append(0, 0, 70) + [FLUSH]
    + attend(0, [0]) + [FORK, 0, 0] + append(1, 0, 30) + [PREFETCH, 0, 1, 0, 1, 0] + attend(0, [1, 0])
    + [FREE, 0, CHECK, 0],
    "ssd-bf16-sparf-2layers": header(ssd=True, dtype=BF16, sparf=True, layers=2, chunks=32) + [CREATE]
    + append(0, 0, 80) + append(0, 1, 33) + sparse(0, [0], 1) + sparse(1, [0], 0) + [FORK, 0, 0]
    + [REMOVE, 1, 10, 20, 0] + sparse(0, [0, 1], 2, 100),
    "invalid-arguments": header(layers=2) + [CREATE] + append(0, 0, 4) + attend(0x80, [0]) + append(0, 0, 2, 4)
    + append(0, 0, 2, 3) + append(0, 0, 0) + append(0xF2, 0, 1) + [FREE, 0xF1, REMOVE, 0, 5, 1, 2]
    + [LENGTH, 0, 0x81, 0, LENGTH, 0, 0, 1, NULLCACHE, 6, STATS, 2, STATS, 1, FORK, 0xF3, 0]
    + attend(0, [0], 2) + [ATTEND, 0, 0xFF, 0, 0] + sparse(0, [0], 1) + [PREFETCH, 0x80, 0, 0, 0],
    "host-q8_0-v03": header(dtype=Q8_0, chunks=32, magnitude=2) + [CREATE] + append_at(0, 0, 40)
    + append(0, 0, 9, 2) + append_at(0, 0, 3, 0, 2, 0xff) + chunk(0, [(0, 0, 3)]) + [FORK_AT, 0, 1, 0]
    + append_at(1, 0, 7, 0, 3) + attend_slice(0, [0, 1], 1 | (1 << 3)) + [STATE, 0, 0, 0, STATE, 1, 4, 9]
    + attend(0, [0, 1, 2], 16),
    "ssd-q4_0-chunks-caller-threads": header(ssd=True, dtype=Q4_0, layers=2, kv_heads=2, group=2, chunks=24,
                                             caller_threads=True) + [CREATE] + append_at(0, 0, 60, 2)
    + append_at(0, 1, 20) + chunk(0, [(0, 1, 2), (0, 0, 0)], 64) + chunk(1, [(0, 0, 3)], 128, 4, 0x09)
    + [FLUSH] + [STATE, 0, 6, 0] + attend(1, [0, 1], 32),
    "states": header(dtype=BF16, layers=2, chunks=32) + [CREATE] + append(0, 0, 30) + append(0, 1, 12)
    + [STATE, 0, 0, 1, STATE, 0, 1, 3, STATE, 0, 2, 5, STATE, 0, 3, 7, STATE, 0, 4, 11, STATE, 0, 5, 2,
       STATE, 0, 7, 0, STATE, 0, 7, 1, STATE, 0xF2, 0, 0] + [CHECK, 1],
    "out-of-pages": header(dtype=F32, page=0, chunks=2) + [CREATE] + append(0, 0, 3) + append(0, 0, 3)
    + [FORK, 0, 0] + append(1, 0, 1) + [REMOVE, 0, 1, 1, 0] + [CHECK, 0],
}

# ---- drive_fuzzer --------------------------------------------------------------------------------
IDENTIFY, CONFIG, DELETE, WRITE, DATTEND, RECLAIM, MAP, COPY, READ, DSPARSE, DSTATS = range(11)
OWN, VICTIM, LAST, ZERO, NEXT = 0, 3, 4, 5, 6


def cmd(op, qp=1, ns=OWN, args=(), mutations=(), corrupt=None):
    out = [(qp & 1) | (ns << 1) | (op << 4)] + list(args) + [len(mutations)]
    for m in mutations:
        out += list(m)
    if corrupt is not None:
        out += list(corrupt)
    return out


def drive_seed(flags, cmds):
    return [flags] + [b for c in cmds for b in c]


def served(c):
    return c + [0]  # no corruption of the queue pair


# config b0: bit0 2 layers, bit1 2 kv heads, bit2 group 2, bits4-5 head dim, bit6 2 KiB page,
# bit7 dtypes 4-7 instead of 0-3; b1: bits0-1 dtype (f32, f16, bf16, q8_0 | q4_0, not a dtype...),
# bits2-3 sparf, bits4-6 capacity choice
CFG_F16 = cmd(CONFIG, args=(0x04, 0x01))
CFG_F16_SPARF = cmd(CONFIG, args=(0x04, 0x05))
WRITE_40 = cmd(WRITE, args=(0x01, 40, 0, 9))  # seq 1, layer 0, index 0, 40 tokens, a fresh chunk
ATTEND_37 = cmd(DATTEND, args=(0x00, 0x00, 37))  # one item: seq 1, 37 tokens
READ_OWN = cmd(READ, args=(2, 5))
DRIVE = {
    "direct-write-attend-read": drive_seed(0, [CFG_F16, WRITE_40, ATTEND_37, READ_OWN,
                                               cmd(READ, args=(4, 1)), cmd(READ, ns=VICTIM, args=(4, 1)),
                                               cmd(DSTATS, args=(0, 0)), cmd(IDENTIFY, args=(0, 0))]),
    "direct-attack-victim": drive_seed(0, [CFG_F16, cmd(WRITE, ns=VICTIM, args=(0x01, 4, 4, 1)),
                                           cmd(COPY, args=(0x01, 0, 4, 8)), cmd(MAP, args=(0x09, 4)),
                                           cmd(DATTEND, ns=VICTIM, args=(0, 0, 37)),
                                           cmd(RECLAIM, ns=VICTIM, args=(0x00, 0x00, 4)),
                                           cmd(DELETE, ns=VICTIM), cmd(DELETE, qp=0, ns=VICTIM)]),
    "direct-mutated": drive_seed(0, [CFG_F16, cmd(WRITE, args=(0x01, 20, 0, 3), mutations=[(0, 0xFF)]),
                                     cmd(WRITE, args=(0x01, 20, 0, 3), mutations=[(2, 1), (4, 0)]),
                                     cmd(DATTEND, args=(0, 0, 5), mutations=[(5, 0x10), (6, 3)]),
                                     cmd(READ, args=(2, 0x40), mutations=[(3, 4)]), cmd(15, args=(0x99,))]),
    "direct-ftl": drive_seed(0, [CFG_F16, WRITE_40, cmd(WRITE, args=(0x01, 79, 2, 4)),
                                 cmd(COPY, args=(0x09, 0, 2, 10)), cmd(MAP, args=(0x11, 2, 0)),
                                 cmd(RECLAIM, args=(0x02, 0x08)), cmd(RECLAIM, args=(0x00, 0x40, 2)),
                                 cmd(RECLAIM, args=(0x01, 0)), cmd(RECLAIM, args=(0x03, 0)), ATTEND_37]),
    "sparf-victim-and-attacker": drive_seed(2, [CFG_F16_SPARF, WRITE_40, cmd(WRITE, args=(0x01, 60, 2, 5)),
                                                cmd(DSPARSE, args=(0x00, 0x00, 37)),
                                                cmd(DSPARSE, args=(0x00, 0x01 | (16 << 2), 37)),
                                                cmd(DSPARSE, args=(0x00, 0x02 | (8 << 3), 4, 37)), ATTEND_37]),
    "quantized-namespaces": drive_seed(0, [cmd(CONFIG, args=(0x04, 0x03)), WRITE_40, ATTEND_37, READ_OWN,
                                           cmd(CONFIG, qp=0, args=(0x84, 0x00)),
                                           cmd(WRITE, qp=0, args=(0x01, 50, 0, 6)),
                                           cmd(DATTEND, qp=0, args=(0, 0, 37)), cmd(CONFIG, args=(0x84, 0x01))]),
    "served-basic": drive_seed(1, [served(CFG_F16), served(WRITE_40), served(ATTEND_37), served(READ_OWN),
                                   served(cmd(READ, ns=VICTIM, args=(4, 1))),
                                   served(cmd(CONFIG, qp=0, args=(0x04, 0x01))),
                                   served(cmd(WRITE, qp=0, args=(0x01, 10, 0, 2)))]),
    "served-corrupt-doorbells": drive_seed(1, [served(CFG_F16), served(WRITE_40),
                                               cmd(DATTEND, args=(0, 0, 37), corrupt=(0xF0, 9, 0, 0, 0)),
                                               cmd(READ, args=(2, 5), corrupt=(0xF1, 0xFF, 0xFF, 0xFF, 0xFF)),
                                               cmd(IDENTIFY, args=(0, 0), corrupt=(0xF4,)),
                                               cmd(DSTATS, args=(0, 0), corrupt=(0xF6, 2, 0x11))]),
}


def write(kind, name, data):
    d = os.path.join(HERE, kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(b & 0xFF for b in data))


if __name__ == "__main__":
    for name, data in CAPI.items():
        write("capi", name, data)
    for name, data in DRIVE.items():
        write("drive", name, data)
