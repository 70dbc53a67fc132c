"""Encoders: agreement with the sentence-transformers reference, unit norm, the LRU of query embeddings."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from smoa.errors import ConfigError
from smoa.routing.encoders import DEFAULT_ENCODER, CachedEncoder, available_encoders, get_encoder

SENTENCES = [
    "Analyze this chest X-ray for pneumonia",
    "Review the indemnification clause of this contract",
    "how do I bake sourdough bread at home",
    "",
    "a " * 400 + "very long input that is truncated at 256 tokens",
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """all-MiniLM-L6-v2 run by sentence-transformers itself, independent of smoa's wrapper."""
    from sentence_transformers import SentenceTransformer

    from smoa.routing.encoders._paths import minilm_dir

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


def test_registry_names_and_unknown_name() -> None:
    assert set(available_encoders()) >= {"minilm", "minilm-int8", "static", "hash"}
    assert DEFAULT_ENCODER != "hash"
    with pytest.raises(ConfigError, match="`encoder`"):
        get_encoder("nope")


def test_minilm_matches_reference(reference: np.ndarray) -> None:
    out = get_encoder("minilm").encode(SENTENCES)
    assert out.dtype == np.float32 and out.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(out, reference, atol=1e-5)


def test_minilm_int8_close_to_fp32_reference(reference: np.ndarray) -> None:
    out = get_encoder("minilm-int8").encode(SENTENCES)
    assert out.dtype == np.float32 and out.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    cos = (out * reference).sum(axis=1)
    assert cos.min() >= 0.99, cos


def test_static_is_mean_of_distilled_token_rows() -> None:
    enc = get_encoder("static")
    out = enc.encode(SENTENCES[:3])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    table = np.load(enc.path / "embeddings.npy")
    for text, vec in zip(SENTENCES[:3], out):
        ids = enc.model.tokenizer.encode(text, add_special_tokens=False).ids
        ref = table[ids].mean(axis=0)
        np.testing.assert_allclose(vec, ref / np.linalg.norm(ref), atol=1e-5)


def test_static_keeps_topical_neighbours() -> None:
    enc = get_encoder("static")
    a, b, c = enc.encode(["chest x-ray shows pneumonia", "lung scan with infection signs", "stock market prices"])
    assert a @ b > a @ c


def test_hash_encoder_deterministic_unit_norm() -> None:
    enc = get_encoder("hash")
    x, y = enc.encode(SENTENCES), enc.encode(SENTENCES)
    np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)


def test_cached_encoder_lru_steps() -> None:
    inner = get_encoder("hash")
    enc = CachedEncoder(inner, max_size=2)
    enc.encode(["a"])
    assert enc.stats() == {"size": 1, "hits": 0, "misses": 1}
    enc.encode(["b"])
    enc.encode(["a"])  # hit: "a" becomes the most recent
    assert enc.stats() == {"size": 2, "hits": 1, "misses": 2}
    enc.encode(["c"])  # evicts "b", the least recent
    assert enc.stats() == {"size": 2, "hits": 1, "misses": 3}
    enc.encode(["a"])
    assert enc.stats() == {"size": 2, "hits": 2, "misses": 3}
    enc.encode(["b"])
    assert enc.stats() == {"size": 2, "hits": 2, "misses": 4}
    np.testing.assert_array_equal(enc.encode(["a", "b"]), inner.encode(["a", "b"]))


def test_encode_batch_matches_encode() -> None:
    enc = CachedEncoder(get_encoder("hash"), batch_size=2)
    texts = [f"text number {i}" for i in range(5)]
    np.testing.assert_array_equal(enc.encode_batch(texts), enc.encode(texts))
    assert enc.encode_batch([]).shape == (0, 384)


def test_static_encodes_one_text_exactly_as_a_batch() -> None:
    """The one-text path (a route's query) gives the very floats of model2vec's batch path: long texts cut the
    same way, unknown-only and empty texts mapped to ``e_0``."""
    enc = get_encoder("static")
    texts = ["what is my bank balance", "", "   ", "zzzzqqqq", "x" * 5000, "hello world " * 400,
             "医学 c++ ＣＵＤＡ", "été à Paris", "[UNK] [CLS]"]  # fmt: skip
    batch = enc.encode(texts)
    one = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_array_equal(one, batch)
    assert one.dtype == np.float32 and one.flags.c_contiguous
