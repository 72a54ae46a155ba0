"""Fuzzing the model loader with GGUF mutants: tiny models (qwen3; qwen35 with its MTP block) whose header,
metadata or tensor table is changed - values set to the ends of their types, NaN and infinities, keys dropped
or retyped, tensor dimensions, types and offsets changed, tensors dropped or renamed, bytes flipped, the file
cut short. Every load must end in a model that runs a step (and tokenizes), or in the engine's ModelLoadError
(or OutOfDeviceMemory for a consistent model too large to fit) with a message: no other exception, no crash by
signal, no hang. Loads run in a worker subprocess, restarted after a crash.

Seeded (`NEXTN_FUZZ_SEED` replays a run); the fast suite tries 100 mutants, the slow one
`NEXTN_FUZZ_GGUF_N` (default 1000).
"""

import json
import math
import os
import random
import select
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nextn.devtools.tiny import make_tiny
from nextn.gguf.header import read_header

T = {"u8": 0, "i8": 1, "u16": 2, "i16": 3, "u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8, "arr": 9, "u64": 10,
     "i64": 11, "f64": 12}
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_RANGE = {0: (0, 255), 1: (-128, 127), 2: (0, 65535), 3: (-32768, 32767), 4: (0, 2**32 - 1), 5: (-2**31, 2**31 - 1),
          10: (0, 2**64 - 1), 11: (-2**63, 2**63 - 1)}


def _str(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def _val(vtype: int, v) -> bytes:
    if vtype == T["str"]:
        return _str(v)
    if vtype in (6, 12):
        v = float(v)
        if vtype == 6 and not math.isnan(v) and abs(v) > 3.4e38:
            v = float("inf") if v > 0 else float("-inf")  # what a float32 holds of it
        return struct.pack(_FMT[vtype], v)
    if vtype == 7:
        return struct.pack("<?", bool(v))
    lo, hi = _RANGE[vtype]
    return struct.pack(_FMT[vtype], min(max(int(v), lo), hi))


def write_gguf(path, kvs, tensors, data: bytes, align: int = 32):
    """kvs: [(key, vtype, sub, value)]; tensors: [(name, ne, type_id, offset from the data start)]; `align` places
    the data, whatever general.alignment says (a mutant may disagree with itself)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, vtype, sub, value in kvs:
        out += _str(key) + struct.pack("<I", vtype)
        if vtype == T["arr"]:
            out += struct.pack("<IQ", sub, len(value)) + b"".join(_val(sub, x) for x in value)
        else:
            out += _val(vtype, value)
    for name, ne, type_id, offset in tensors:
        out += _str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in ne)
        out += struct.pack("<IQ", type_id & (2**32 - 1), offset & (2**64 - 1))
    out += bytes(-len(out) % align)
    Path(path).write_bytes(bytes(out) + data)


def parse(path):
    """(kvs, tensors, data, align) of a well-formed file, in write_gguf's terms."""
    h = read_header(path)
    kvs = [(k, int(h.types[k][0]), None if h.types[k][1] is None else int(h.types[k][1]), v) for k, v in h.meta.items()]
    tensors = [(t.name, t.ne, t.type_id, t.offset - h.data_offset) for t in h.tensors]
    return kvs, tensors, Path(path).read_bytes()[h.data_offset:], h.meta.get("general.alignment", 32)


INTS = [0, 1, -1, 2, 3, 7, 255, 256, 4096, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -2**63, 2**64 - 1]
FLOATS = [0.0, -0.0, 1e-30, -1.0, 1e30, 3.5e38, float("nan"), float("inf"), float("-inf"), 1e308]


def mutate_kv(rng, kvs):
    kvs = list(kvs)
    i = rng.randrange(len(kvs))
    key, vtype, sub, value = kvs[i]
    op = rng.randrange(7)
    if op == 0:  # gone
        del kvs[i]
    elif op == 1 and vtype in _RANGE:  # an integer at the ends of its type, or just off its value
        kvs[i] = (key, vtype, sub, rng.choice(INTS + [value + 1, value - 1, value * 2, value // 2]))
    elif op == 1 or (op == 2 and vtype in (6, 12)):
        kvs[i] = (key, rng.choice([6, 12]), sub, rng.choice(FLOATS))
    elif op == 2:  # another type with a plausible value
        t = rng.choice([0, 1, 4, 5, 6, 7, 8, 10, 11, 12])
        v = (rng.choice(["", "x", "qwen3", "llama", "gpt2"]) if t == 8 else rng.choice(FLOATS) if t in (6, 12)
             else rng.choice(INTS[:12]))
        kvs[i] = (key, t, None, v if t != 7 else bool(v))
    elif op == 3 and vtype == T["arr"]:  # an array shortened, lengthened, emptied or retyped
        if value and rng.random() < 0.6:
            k = rng.randrange(len(value))
            value = value[:k] if rng.random() < 0.5 else value + value[:k]
        elif rng.random() < 0.5:
            value = []
        else:
            sub = rng.choice([4, 5, 6, 8])
            value = [rng.choice(INTS[:10]) if sub != 8 else "x" for _ in range(rng.randrange(1, 50))]
        kvs[i] = (key, vtype, sub, value)
    elif op == 3:  # an array where a scalar was
        kvs[i] = (key, T["arr"], 5, [rng.choice(INTS[:8]) for _ in range(rng.randrange(0, 4))])
    elif op == 4:  # a key twice, the second with another value
        kvs.insert(rng.randrange(len(kvs) + 1), (key, 5, None, rng.choice(INTS[:10])))
    elif op == 5 and vtype == T["arr"] and sub == T["str"] and value:  # a vocabulary entry replaced
        value = list(value)
        value[rng.randrange(len(value))] = rng.choice(["", "\x00", "\ud800", "<|im_start|>", "Ġ" * 300, value[0]])
        kvs[i] = (key, vtype, sub, value)
    else:  # a string value changed
        kvs[i] = (key, T["str"], None, rng.choice(["", "qwen3", "qwen35", "llama", "gpt2", "bpe", "\ud800", "x" * 1000]))
    return kvs


def mutate_tensor(rng, tensors, data_len):
    tensors = list(tensors)
    i = rng.randrange(len(tensors))
    name, ne, type_id, offset = tensors[i]
    op = rng.randrange(7)
    if op == 0 and ne:  # one dimension changed
        ne = list(ne)
        j = rng.randrange(len(ne))
        ne[j] = rng.choice([0, 1, ne[j] - 1, ne[j] + 1, ne[j] * 2, 2**31, 2**32 + ne[j], 2**63 - 1, 2**64 - 1])
        tensors[i] = (name, tuple(ne), type_id, offset)
    elif op == 1:  # dimensions added or removed
        ne = tuple(ne) + (1,) if rng.random() < 0.5 or not ne else tuple(ne)[:-1]
        tensors[i] = (name, ne, type_id, offset)
    elif op == 2:  # another element type
        tensors[i] = (name, ne, rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 20, 23, 30, 39, 40, 41, 99,
                                            2**31, 2**32 - 1]), offset)
    elif op == 3:  # the data elsewhere: misaligned, overlapping another, past the end
        tensors[i] = (name, ne, type_id, rng.choice([offset + 1, offset + 32, 0, data_len, data_len - 32,
                                                      tensors[rng.randrange(len(tensors))][3], 2**63, 2**64 - 32]))
    elif op == 4:  # gone
        del tensors[i]
    elif op == 5:  # renamed: another's name (twice in the table), or a name nobody knows
        tensors[i] = (rng.choice([tensors[rng.randrange(len(tensors))][0], name + ".x", "", "\ud800"]), ne, type_id,
                      offset)
    else:  # two tensors' table entries swapped
        j = rng.randrange(len(tensors))
        tensors[i], tensors[j] = (tensors[j][0],) + tensors[i][1:], (tensors[i][0],) + tensors[j][1:]
    return tensors


def make_mutant(rng, base, path):
    kvs, tensors, data, align = base
    kind = rng.randrange(10)
    if kind < 4:
        for _ in range(rng.randrange(1, 3)):
            kvs = mutate_kv(rng, kvs)
    elif kind < 8:
        for _ in range(rng.randrange(1, 3)):
            tensors = mutate_tensor(rng, tensors, len(data))
    write_gguf(path, kvs, tensors, data, align)
    if kind >= 8:  # bytes of the header flipped, set to the ends of a word, or the file cut short
        raw = bytearray(Path(path).read_bytes())
        header_end = len(raw) - len(data)
        if rng.random() < 0.2:
            raw = raw[:rng.randrange(len(raw))]
        else:
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(header_end)
                if rng.random() < 0.5:
                    raw[pos] ^= 1 << rng.randrange(8)
                else:
                    word = rng.choice([b"\x00" * 4, b"\xff" * 4, b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff" * 8])
                    raw[pos:pos + len(word)] = word
        Path(path).write_bytes(bytes(raw))


WORKER = r"""
import json, sys, traceback
from nextn.cl.runtime import Runtime
from nextn.errors import ModelLoadError, NextnError, OutOfDeviceMemory
from nextn.runner import ModelRunner
rt = Runtime()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    path, mtp = json.loads(line)
    try:
        r = ModelRunner(path, rt=rt, n_ctx=32, n_seq=1, n_batch=8, mtp=mtp)
        ids = r.tokenizer.encode("hello world", add_special=True) or [0]
        ids = [min(t, r.n_vocab - 1) for t in ids][:8]
        r.eval(0, ids, 0)
        r.tokenizer.decode(ids)
        out = {"result": "loaded"}
        del r
    except (ModelLoadError, OutOfDeviceMemory) as e:
        out = {"result": "refused", "type": type(e).__name__, "message": str(e)}
    except BaseException as e:
        out = {"result": "traceback", "type": type(e).__name__, "message": str(e)[:300],
               "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(out), flush=True)
"""


class Worker:
    """A subprocess that loads the models it is sent; a crash or a hang ends it, and the next load starts another."""

    def __init__(self, timeout: float):
        self.timeout, self.p, self.warm = timeout, None, False

    def _start(self):
        self.p = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert json.loads(self._line(120) or "{}").get("ready"), self.p.stderr.read()

    def _line(self, timeout):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        return self.p.stdout.readline() if r else None

    def load(self, path, mtp: bool) -> dict:
        if self.p is None or self.p.poll() is not None:
            self._start()
        self.p.stdin.write(json.dumps([str(path), mtp]) + "\n")
        self.p.stdin.flush()
        line = self._line(self.timeout if self.warm else 600)  # the first load may compile every kernel
        if line:
            self.warm = True
            return json.loads(line)
        if line is None:  # no answer in time
            self.p.kill()
            self.p.wait()
            return {"result": "hang"}
        self.p.wait()
        return {"result": "crash", "returncode": self.p.returncode, "stderr": self.p.stderr.read()[-2000:]}

    def close(self):
        if self.p is not None and self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(30)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzgguf")
    return [(parse(make_tiny(d / "qwen3.gguf", arch="qwen3", qtype="Q8_0", seed=3)), False),
            (parse(make_tiny(d / "qwen35.gguf", arch="qwen35", qtype="Q8_0", seed=3, mtp=True)), True)]


def run_fuzz(bases, tmp_path, seed: int, n: int):
    rng = random.Random(seed)
    counts = {"tried": 0, "loaded": 0, "refused": 0, "traceback": 0, "crash": 0, "hang": 0}
    bad, kinds = [], {}
    w = Worker(timeout=60)
    try:
        for i in range(n):
            base, mtp = bases[i % len(bases)]
            path = tmp_path / f"m{i % 4}.gguf"
            make_mutant(rng, base, path)
            got = w.load(path, mtp)
            counts["tried"] += 1
            counts[got["result"]] += 1
            if got["result"] == "refused":
                assert got["message"], got  # a message that says what is wrong
                kinds[got["type"]] = kinds.get(got["type"], 0) + 1
            elif got["result"] != "loaded":
                keep = tmp_path / f"bad-{seed}-{i}.gguf"
                keep.write_bytes(path.read_bytes())
                bad.append((f"seed {seed} mutant {i} ({keep})", got))
    finally:
        w.close()
    print(f"\nGGUF fuzz, seed {seed}: {counts['tried']} mutants: {counts['loaded']} loaded and ran, "
          f"{counts['refused']} clean errors ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), "
          f"{counts['traceback']} tracebacks, {counts['crash']} crashes, {counts['hang']} hangs")
    for b in bad[:10]:
        print(" ", b[0], json.dumps(b[1])[:1500])
    assert not bad, bad[:3]
    assert counts["refused"] > 0


def test_fuzz_gguf_mutants(bases, tmp_path):
    run_fuzz(bases, tmp_path, int(os.environ.get("NEXTN_FUZZ_SEED", "1")), int(os.environ.get("NEXTN_FUZZ_GGUF_N_FAST", "100")))


@pytest.mark.slow
def test_fuzz_gguf_mutants_long(bases, tmp_path):
    run_fuzz(bases, tmp_path, int(os.environ.get("NEXTN_FUZZ_SEED", "1000")), int(os.environ.get("NEXTN_FUZZ_GGUF_N", "1000")))


WRONG_TYPES = [  # each raised a TypeError, ValueError or OverflowError from inside a model or the tokenizer
    ("tokenizer.ggml.tokens", T["f32"], None, 1.5),
    ("tokenizer.ggml.token_type", T["f32"], None, 1.5),
    ("tokenizer.ggml.bos_token_id", T["str"], None, "\ufffd"),
    ("general.architecture", T["arr"], T["str"], ["qwen35"]),
    ("qwen35.attention.recurrent_layers", T["f32"], None, 2.0),
    ("qwen35.rope.dimension_sections", T["i32"], None, 3),
    ("qwen35.rope.dimension_sections", T["arr"], T["str"], ["a", "b", "c", "d"]),
    ("qwen35.feed_forward_length", T["f32"], None, float("inf")),
    ("qwen35.block_count", T["u32"], None, 2**31),  # not type errors: a table of 2**31 layers took minutes,
    ("qwen35.rope.dimension_count", T["u32"], None, 2**31),  # and so did a loop over 2**30 rotated pairs
    ("qwen35.rope.dimension_count", T["f32"], None, 3.5e38),
    ("qwen35.rope.dimension_count", T["u32"], None, 4096),  # a ValueError from qkv_prep, where the head has 16
]


@pytest.mark.parametrize("key, vtype, sub, value", WRONG_TYPES, ids=lambda v: str(v)[:30])
def test_metadata_of_the_wrong_type_is_refused_naming_the_key(bases, tmp_path, key, vtype, sub, value):
    from nextn.errors import ModelLoadError
    from nextn.model_info import model_summary

    kvs, tensors, data, align = bases[1][0]
    kvs = [kv for kv in kvs if kv[0] != key] + [(key, vtype, sub, value)]
    path = tmp_path / "wrong.gguf"
    write_gguf(path, kvs, tensors, data, align)
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        model_summary(path)  # the file is opened (and refused) before a model or the tokenizer reads the key
