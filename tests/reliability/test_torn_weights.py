"""Torn, truncated and bit-flipped weights at every byte offset: a clean CorruptAdapterError naming the adapter.

A sample adapter's stored bytes (an inline BLOB, and the same bytes as a content-addressed file) are cut at every
offset ``0 .. n-1`` and have bits flipped at every byte; each damaged version is loaded through the library:

* with the stored checksum intact, every damage is caught by the sha256 check;
* with the checksum forged to match the damaged bytes, the safetensors parser and the profile validation must
  still refuse every truncation, and a bit flip either gives a clean error or a complete, valid adapter
  (a flip inside tensor data is a different but well-formed adapter; it never yields partial tensors).

After every failure the cache is unchanged (no entry for the failed load, nothing evicted, LRU order kept) and
the other adapters keep loading. ``-m slow`` flips all 8 bits of every byte instead of one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smoa import AdapterSpec, CorruptAdapterError, StorageError
from smoa.adapter.weights import LoraWeights, checksum
from smoa.library import AdapterLibrary

from .helpers import TINY, open_lib, seeded_weights

SAMPLE_MODULES = ("layers.1.v", "layers.3.q")  # rank 1: A [1, 64], B [32, 1] / [64, 1]: 1,272 bytes with the header


class Fixture:
    """A library with 3 good adapters cached (cache of 4) and one sample adapter to damage."""

    def __init__(self, path: Path, in_file: bool) -> None:
        # inline: the sample is a BLOB; in_file: a 256-byte inline limit sends every adapter to a file
        self.lib: AdapterLibrary = open_lib(path, max_loaded_adapters=4, blob_inline_max_bytes=256 if in_file else 1 << 20)
        self.good = [self.lib.create(AdapterSpec(weights=seeded_weights(i))) for i in range(3)]
        self.sample = self.lib.create(AdapterSpec(weights=seeded_weights(7, SAMPLE_MODULES, rank=1)))
        self.key = self.sample.key
        _, self.file, self.digest, _ = self.lib.catalog.read_weights(self.key)
        assert (self.file is not None) == in_file
        self.data = self.lib.catalog.read_weights(self.key)[0] if not in_file else (self.lib.directory / self.file).read_bytes()
        for g in self.good:
            self.lib.get_weights(g.id)
        self.cache_keys = list(self.lib.cache._device.keys())

    def store(self, data: bytes, forge_checksum: bool) -> None:
        """Put damaged bytes where the sample's weights live (optionally with a matching checksum)."""
        if self.file is None:
            self.lib.catalog._db.execute("UPDATE weights SET data = ? WHERE key = ?", (data, self.key))
        else:
            (self.lib.directory / self.file).write_bytes(data)
        digest = checksum(data) if forge_checksum else self.digest
        self.lib.catalog._db.execute("UPDATE adapters SET checksum = ? WHERE key = ?", (digest, self.key))

    def load(self) -> LoraWeights | None:
        """Load the sample: its weights, or None after a clean CorruptAdapterError (checked to name it)."""
        stats = self.lib.cache.statistics()
        try:
            w = self.lib.get_weights(self.sample.id)
        except CorruptAdapterError as exc:
            assert self.sample.id in str(exc), str(exc)
            assert list(self.lib.cache._device.keys()) == self.cache_keys  # no entry, nothing evicted, same order
            assert self.lib.cache.statistics()["evictions"] == stats["evictions"]
            return None
        self.lib.cache.invalidate(self.sample.id)  # a (valid) damaged version must not stay for the next offset
        self.cache_keys = list(self.lib.cache._device.keys())
        return w

    def check_others(self) -> None:
        for g in self.good:
            assert checksum(self.lib.get_weights(g.id).to_bytes()) == g.checksum


def _assert_complete(w: LoraWeights) -> None:
    """A loaded adapter is whole: every factor has its full profile shape and finite values."""
    w.validate(TINY, name="damaged sample")
    for m, (a, b) in w.items():
        d_in, d_out = TINY.shape(m)
        assert a.shape == (w.rank, d_in) and b.shape == (d_out, w.rank)


@pytest.mark.parametrize("in_file", [False, True], ids=["blob", "file"])
@pytest.mark.parametrize("forge", [False, True], ids=["checksum-kept", "checksum-forged"])
def test_truncation_at_every_offset(tmp_path: Path, in_file: bool, forge: bool) -> None:
    fx = Fixture(tmp_path / "lib", in_file)
    n = len(fx.data)
    assert n > 800
    for cut in range(n):
        fx.store(fx.data[:cut], forge_checksum=forge)
        assert fx.load() is None, f"truncation at {cut}/{n} loaded"
        if cut % 97 == 0:
            fx.check_others()
    # and the bytes plus trailing garbage
    fx.store(fx.data + b"\x00" * 8, forge_checksum=forge)
    assert fx.load() is None
    fx.store(fx.data, forge_checksum=False)  # repaired: loads again, bit for bit
    assert checksum(fx.lib.get_weights(fx.sample.id).to_bytes()) == fx.digest
    fx.check_others()
    fx.lib.close()


def _flip_positions(n: int, all_bits: bool) -> list[tuple[int, int]]:
    return [(i, b) for i in range(n) for b in range(8)] if all_bits else [(i, i % 8) for i in range(n)]


def _flip_loop(tmp_path: Path, in_file: bool, all_bits: bool) -> tuple[int, int]:
    fx = Fixture(tmp_path / "lib", in_file)
    refused_kept = refused_forged = 0
    for i, bit in _flip_positions(len(fx.data), all_bits):
        damaged = bytearray(fx.data)
        damaged[i] ^= 1 << bit
        fx.store(bytes(damaged), forge_checksum=False)
        assert fx.load() is None, f"flip of bit {bit} at byte {i} passed the checksum"
        refused_kept += 1
        fx.store(bytes(damaged), forge_checksum=True)
        w = fx.load()
        if w is None:
            refused_forged += 1
        else:
            _assert_complete(w)
        if i % 101 == 0:
            fx.check_others()
    fx.check_others()
    fx.lib.close()
    return refused_kept, refused_forged


@pytest.mark.parametrize("in_file", [False, True], ids=["blob", "file"])
def test_bit_flip_at_every_byte(tmp_path: Path, in_file: bool) -> None:
    kept, forged = _flip_loop(tmp_path, in_file, all_bits=False)
    assert kept > 800 and forged > 50  # header flips with a forged checksum are refused by the parser


@pytest.mark.slow
@pytest.mark.parametrize("in_file", [False, True], ids=["blob", "file"])
def test_every_bit_of_every_byte(tmp_path: Path, in_file: bool) -> None:
    kept, forged = _flip_loop(tmp_path, in_file, all_bits=True)
    assert kept > 6400 and forged > 400


def test_missing_moved_and_escaping_files(tmp_path: Path) -> None:
    fx = Fixture(tmp_path / "lib", in_file=True)
    path = fx.lib.directory / fx.file
    os.unlink(path)  # missing
    assert fx.load() is None
    path.symlink_to("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd")  # symlink out of the library
    assert fx.load() is None
    path.unlink()
    for ref in ("../../outside", "/etc/passwd", "blobs/../../x"):  # a tampered file reference
        fx.lib.catalog._db.execute("UPDATE weights SET file = ? WHERE key = ?", (ref, fx.key))
        assert fx.load() is None
    path.mkdir()  # a directory where the file should be: an I/O error, still clean
    fx.lib.catalog._db.execute("UPDATE weights SET file = ? WHERE key = ?", (fx.file, fx.key))
    with pytest.raises(StorageError, match=fx.sample.id):
        fx.lib.get_weights(fx.sample.id)
    fx.check_others()
    fx.lib.close()


def test_wrong_shapes_or_modules_with_a_valid_checksum_are_corrupt(tmp_path: Path) -> None:
    """Well-formed safetensors that do not fit the profile (a swapped-in foreign file) are refused too."""
    fx = Fixture(tmp_path / "lib", in_file=False)
    wrong = [
        LoraWeights({"layers.1.v": (torch.ones(1, 63), torch.ones(32, 1))}, 2.0, 1),  # bad d_in
        LoraWeights({"layers.9.q": (torch.ones(1, 64), torch.ones(64, 1))}, 2.0, 1),  # unknown module
        LoraWeights({"layers.1.v": (torch.full((1, 64), float("nan")), torch.ones(32, 1))}, 2.0, 1),  # NaN
        LoraWeights({"layers.1.v": (torch.ones(1, 64, dtype=torch.float16), torch.ones(32, 1))}, -1.0, 1),  # alpha
    ]
    for w in wrong:
        fx.store(w.to_bytes(), forge_checksum=True)
        assert fx.load() is None
    fx.store(fx.data[:8] + b"{" * (len(fx.data) - 8), forge_checksum=True)  # header not JSON
    assert fx.load() is None
    fx.store(b"\xff" * 8 + fx.data[8:], forge_checksum=True)  # header length 2^64 - 1
    assert fx.load() is None
    fx.check_others()
    fx.lib.close()
