"""The S3 weight store against a real HTTP S3 endpoint (moto server mode): round trips, checksums, the local
cache tier, and an object store that refuses connections or never answers."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import boto3
import pytest

from smoa.errors import ConfigError, CorruptAdapterError, StorageError
from smoa.storage.s3 import S3Location, S3WeightStore


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _raw_client(endpoint: str):  # the test's own view of the bucket, independent of the store under test
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip


def test_location_parsing() -> None:
    assert S3Location.parse("s3://my-bucket/a/b/") == S3Location("my-bucket", "a/b")
    assert S3Location.parse("s3://my-bucket").key("weights/hot/ab/x") == "weights/hot/ab/x"
    for bad in ("s3:///x", "http://bucket/x", "s3://Bad_Bucket/x", "s3://bucket/a/../b"):
        with pytest.raises(ConfigError, match="weights_path"):
            S3Location.parse(bad)


def test_round_trip_listing_and_delete(s3_url: str, s3_server, tmp_path: Path) -> None:
    store = S3WeightStore(s3_url, cache_dir=tmp_path / "cache")
    data = b"safetensors bytes " * 100
    rel = store.write("weights/hot", _digest(data), data)
    assert rel == f"weights/hot/{_digest(data)[:2]}/{_digest(data)}"
    assert store.write("weights/hot", _digest(data), data) == rel  # idempotent
    cold = store.write("weights/cold", _digest(data), data)
    assert store.owned_files() == {rel, cold}
    # the object really is in the bucket, under the prefix, byte for byte
    loc = store.location
    raw = _raw_client(s3_server.endpoint).get_object(Bucket=loc.bucket, Key=f"{loc.prefix}/{rel}")["Body"].read()
    assert raw == data
    assert store.read(rel, name="a") == data
    store.delete(rel)
    store.delete(rel)  # missing is fine
    assert store.owned_files() == {cold}
    with pytest.raises(CorruptAdapterError, match="missing"):
        S3WeightStore(s3_url).read(rel, name="adapter x")  # no local tier: must ask the store


def test_bytes_that_do_not_match_their_name_are_refused(s3_url: str, s3_server, tmp_path: Path) -> None:
    store = S3WeightStore(s3_url, cache_dir=tmp_path / "cache")
    data = b"A" * 4096
    with pytest.raises(StorageError, match="do not hash"):
        store.write("weights/hot", _digest(b"other"), data)
    rel = store.write("weights/hot", _digest(data), data)
    loc = store.location
    _raw_client(s3_server.endpoint).put_object(Bucket=loc.bucket, Key=f"{loc.prefix}/{rel}", Body=b"A" * 4095 + b"B")
    with pytest.raises(CorruptAdapterError, match="checksum"):
        S3WeightStore(s3_url).read(rel, name="adapter y")  # torn/swapped object: refused, never parsed
    # a corrupted local copy is dropped and fetched again (here: the store's copy is bad too -> refused)
    (tmp_path / "cache" / _digest(data)[:2] / _digest(data)).write_bytes(b"junk")
    with pytest.raises(CorruptAdapterError):
        store.read(rel, name="adapter y")
    for bad in ("../../etc/passwd", "weights/hot/zz/" + "0" * 64, "weights/warm/00/" + "0" * 64):
        with pytest.raises(CorruptAdapterError, match="content address"):
            store.read(bad, name="z")


def test_local_tier_serves_while_the_store_is_down(s3_url: str, s3_server, tmp_path: Path) -> None:
    store = S3WeightStore(s3_url, cache_dir=tmp_path / "cache", connect_timeout_s=0.5, read_timeout_s=1, max_attempts=1)
    blobs = [bytes([i]) * 2048 for i in range(5)]
    rels = [store.write("weights/hot", _digest(b), b) for b in blobs]
    fresh = S3WeightStore(s3_url, cache_dir=tmp_path / "cache2", cache_max_bytes=3 * 2048)
    assert [fresh.read(r, name="a") for r in rels] == blobs  # downloads, keeps the last 3 (LRU budget)
    assert fresh.downloads == 5 and fresh.cache.statistics()["local_cache_bytes"] <= 3 * 2048
    s3_server.stop()
    try:
        assert store.read(rels[0], name="a") == blobs[0]  # local tier hit, no network
        started = time.monotonic()
        with pytest.raises(StorageError, match="object store upload"):
            store.write("weights/hot", _digest(b"new"), b"new")
        assert time.monotonic() - started < 10
    finally:
        s3_server.start()
    assert store.read(rels[4], name="a") == blobs[4]


def test_a_store_that_never_answers_times_out(s3_url: str, tmp_path: Path) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts TCP connections (kernel backlog) but never replies
    port = silent.getsockname()[1]
    try:
        client = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="t", aws_secret_access_key="t",
            config=__import__("botocore.config").config.Config(
                connect_timeout=0.5, read_timeout=0.5, retries={"max_attempts": 1, "mode": "standard"}),
        )  # fmt: skip
        started = time.monotonic()
        with pytest.raises(StorageError, match="object store open"):
            S3WeightStore(s3_url, client=client)
        assert time.monotonic() - started < 15
    finally:
        silent.close()


def test_unknown_bucket_is_a_clear_error(s3_server) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        S3WeightStore("s3://no-such-bucket-here/x")


def test_garbage_collection_spares_young_objects(s3_url: str, s3_server) -> None:
    store = S3WeightStore(s3_url)
    keep, orphan = b"keep" * 10, b"orphan" * 10
    rk = store.write("weights/hot", _digest(keep), keep)
    ro = store.write("weights/hot", _digest(orphan), orphan)
    assert store.collect_garbage({rk}) == 0  # another process may be about to commit a row naming it
    assert store.collect_garbage(set(), min_age_s=0) == 0  # an empty catalog never empties the bucket
    assert store.collect_garbage({rk}, min_age_s=0) == 1
    assert store.owned_files() == {rk} and ro not in store.owned_files()


def test_garbage_collection_is_bounded_and_wraps_around(s3_url: str, s3_server) -> None:
    store = S3WeightStore(s3_url)
    blobs = [f"orphan {i}".encode() for i in range(40)]
    for b in blobs:
        store.write("weights/hot", _digest(b), b)
    assert store.collect_garbage(set(), min_age_s=0) == 0  # a catalog naming nothing: a lost catalog, no sweep
    keep = {"weights/hot/00/" + "0" * 64}  # (names no real object)
    assert store.collect_garbage(keep, min_age_s=0, max_objects=10) == 10  # one bounded pass
    removed = 10
    for _ in range(10):
        removed += store.collect_garbage(keep, min_age_s=0, max_objects=10)
    assert removed == 40 and store.owned_files() == set()  # every object is reached over repeated passes
    keep = b"kept"
    rel = store.write("weights/hot", _digest(keep), keep)
    assert store.collect_garbage(lambda r: r == rel, min_age_s=0) == 0 and store.owned_files() == {rel}
