"""Adapter weights in an S3-compatible object store, with a local on-disk cache tier in front of it.

``SMoAConfig(weights_path="s3://bucket/prefix")`` stores every weight file the library would put under
``weights/`` of its directory as an object instead (same relative paths, so a library moves between a local
directory and a bucket by copying files; see ``smoa migrate``)::

    s3://<bucket>/<prefix>/weights/hot/ab/<sha256>    weights of active adapters (bigger than the inline limit)
    s3://<bucket>/<prefix>/weights/cold/ab/<sha256>   weights of archived and merged-away adapters

The endpoint comes from the standard ``AWS_ENDPOINT_URL`` (MinIO, Ceph, R2, moto ...; unset = AWS), credentials
and region from boto3's usual chain. Objects are **content-addressed** (named by the sha256 of their bytes), so
an object never changes once written and any replica can cache it forever; every load checks the bytes against
the name (and the library checks them against the catalog row) — a torn or swapped object is refused with
:class:`~smoa.errors.CorruptAdapterError`, never parsed. The library writes an object *before* the catalog row
that names it commits and deletes it only *after* the last row naming it is gone.

Local cache tier: a load first looks in ``cache_dir`` (files named like the objects, written by temp file +
rename, sized by ``cache_max_bytes`` with least-recently-used eviction); a miss downloads, verifies, then keeps a
copy. Network calls have connect/read timeouts and bounded retries (botocore "standard" mode); a store that
refuses or times out raises :class:`~smoa.errors.StorageError` naming the bucket and key, and no catalog row is
written for a failed upload.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from smoa.errors import ConfigError, CorruptAdapterError, StorageError

AREAS = ("weights/hot", "weights/cold")
LEGACY_AREAS = ("blobs", "cold")  # libraries written before the weights/ layout (copied as they are)
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` parsed; ``prefix`` has no leading or trailing slash (may be empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"`weights_path` must look like 's3://bucket/prefix', got {url!r}")
        bucket = parsed.netloc
        if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in ".-" for c in bucket) or bucket != bucket.lower():
            raise ConfigError(f"`weights_path` has an invalid S3 bucket name {bucket!r}")
        prefix = parsed.path.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise ConfigError(f"`weights_path` has an invalid prefix {prefix!r} (empty, '.' or '..' segments)")
        return cls(bucket, prefix)

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def check_rel(rel: str, name: str = "") -> tuple[str, str]:
    """``(area, digest)`` of a relative weight path ``<area>/<dd>/<digest>``; anything else is corrupt."""
    area, _, tail = rel.rpartition("/")
    area, _, shard = area.rpartition("/")
    ok = (area in AREAS + LEGACY_AREAS and len(tail) == 64 and set(tail) <= _HEX and shard == tail[:2])
    if not ok:
        who = f"{name}: " if name else ""
        raise CorruptAdapterError(f"{who}weight reference {rel!r} is not a content address (<area>/<dd>/<sha256>)")
    return area, tail


class S3WeightStore:
    """Content-addressed weight objects in ``s3://bucket/prefix`` with a local LRU disk cache.

    Args:
        url: ``s3://bucket/prefix``.
        cache_dir: the local cache tier's directory (created); ``None`` = no local tier.
        cache_max_bytes: the local tier's budget (least recently used files are evicted past it).
        connect_timeout_s, read_timeout_s, max_attempts: per-call network limits (botocore "standard" retries).
        client: a ready boto3 S3 client (tests); by default one is built from the environment.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_dir: str | Path | None = None,
        cache_max_bytes: int = 1024**3,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 20.0,
        max_attempts: int = 3,
        client: Any = None,
    ) -> None:
        self.location = S3Location.parse(url)
        self._client = client if client is not None else _make_client(connect_timeout_s, read_timeout_s, max_attempts)
        self.cache = LocalCacheTier(Path(cache_dir), cache_max_bytes) if cache_dir is not None else None
        self.uploads = 0
        self.downloads = 0
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0
        self._check_bucket()

    @property
    def url(self) -> str:
        return self.location.url

    # -- the FileStore interface -------------------------------------------------------------------------------
    def write(self, area: str, digest: str, data: bytes) -> str:
        """Upload ``data`` as ``<area>/<digest[:2]>/<digest>`` (verified against ``digest``); returns that path.

        Idempotent; the object is complete when this returns (S3 PUT is atomic: readers see all or nothing).
        """
        area = {"blobs": "weights/hot", "cold": "weights/cold"}.get(area, area)  # the pre-schema-2 names
        if area not in AREAS or len(digest) != 64 or not set(digest) <= _HEX:
            raise StorageError(f"invalid blob address {area!r}/{digest!r}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise StorageError(f"refusing to store {area}/{digest[:12]}...: the bytes do not hash to their name")
        rel = f"{area}/{digest[:2]}/{digest}"
        key = self.location.key(rel)
        self._call("upload", key, lambda: self._client.put_object(
            Bucket=self.location.bucket, Key=key, Body=data, ContentLength=len(data),
            ContentType="application/octet-stream", Metadata={"sha256": digest},
        ))  # fmt: skip
        self.uploads += 1
        self.bytes_uploaded += len(data)
        if self.cache is not None:
            self.cache.put(digest, data)
        return rel

    def read(self, rel: str, *, name: str) -> bytes:
        """The object's bytes, from the local tier or the store; checked against the sha256 in its name."""
        _area, digest = check_rel(rel, name)
        if self.cache is not None:
            cached = self.cache.get(digest)
            if cached is not None:
                return cached
        key = self.location.key(rel)
        try:
            body = self._call("download", key, lambda: self._client.get_object(Bucket=self.location.bucket, Key=key))
            data = self._call("download", key, lambda: body["Body"].read())
        except _NotFound:
            raise CorruptAdapterError(f"{name}: weight object s3://{self.location.bucket}/{key} is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptAdapterError(
                f"{name}: weight object s3://{self.location.bucket}/{key} fails its checksum ({len(data)} bytes)"
            )
        self.downloads += 1
        self.bytes_downloaded += len(data)
        if self.cache is not None:
            self.cache.put(digest, data)
        return data

    def exists(self, rel: str) -> bool:
        check_rel(rel)
        key = self.location.key(rel)
        try:
            self._call("check", key, lambda: self._client.head_object(Bucket=self.location.bucket, Key=key))
        except _NotFound:
            return False
        return True

    def delete(self, rel: str) -> None:
        """Delete the object (missing is fine) and its local copy (another area holding the same bytes, as after
        an archive, downloads them again on its next read)."""
        _area, digest = check_rel(rel)
        key = self.location.key(rel)
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.location.bucket, Key=key))
        if self.cache is not None:
            self.cache.discard(digest)

    def owned_files(self) -> set[str]:
        """Relative paths of every content-addressed weight object under the prefix (orphan sweep, fsck)."""
        return {rel for rel, _size, _mtime in self.list_objects()}

    all_files = owned_files

    def list_objects(self) -> Iterator[tuple[str, int, float]]:
        """``(relative path, size, last-modified epoch seconds)`` of every weight object under the prefix."""
        for area in AREAS + LEGACY_AREAS:
            yield from self._list_area(area)

    def _list_area(self, area: str, start_after: str | None = None) -> Iterator[tuple[str, int, float]]:
        """One area's objects by name (after ``<area>/<start_after>`` if given), 1,000 per LIST request."""
        start = self.location.key(area + "/")
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": start, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after:
                kwargs["StartAfter"] = start + start_after
            page = self._call("list", start, lambda kw=kwargs: self._client.list_objects_v2(**kw))
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(self.location.key("")):]
                try:
                    check_rel(rel)
                except CorruptAdapterError:
                    continue  # not ours (never deleted, never listed)
                yield rel, int(obj["Size"]), obj["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _wrapped(self, area: str, shard: str) -> Iterator[tuple[str, int, float]]:
        """An area's objects from shard ``shard`` to ``ff``, then from ``00`` up to (not including) ``shard``."""
        yield from self._list_area(area, shard)  # StartAfter "<area>/ab": "<area>/ab/..." and later
        for item in self._list_area(area):
            if item[0].rsplit("/", 1)[-1][:2] >= shard:
                return
            yield item

    def collect_garbage(
        self, referenced: set[str] | Callable[[str], bool], min_age_s: float = 3600.0, max_objects: int = 100_000
    ) -> int:
        """Delete objects no catalog row references that are older than ``min_age_s``; returns how many.

        The age guard matters when several processes share the store: another process uploads an object *before*
        its catalog row commits, so a young unreferenced object may be one that is about to be referenced.
        An empty ``referenced`` set sweeps nothing: a catalog that names no object next to a bucket that holds
        some is a lost or wrong catalog (finding 1 of issue 10), never a reason to delete. Bounded: one call looks at
        no more than ``max_objects`` objects per area, from a random two-hex-digit
        shard on (wrapping around), so opening a library of a billion objects costs a bounded number of LIST
        requests and every object is looked at sooner or later over many opens. ``referenced``: a set or a
        predicate.
        """
        if isinstance(referenced, (set, frozenset)) and not referenced:
            return 0  # an empty catalog beside a store that holds objects is a lost catalog: never sweep for it
        is_ref = referenced.__contains__ if isinstance(referenced, (set, frozenset)) else referenced
        shard = secrets.token_hex(1)
        now = time.time()
        candidates: list[str] = []
        for area in AREAS + LEGACY_AREAS:
            for rel, _size, mtime in itertools.islice(self._wrapped(area, shard), max_objects):
                if now - mtime >= min_age_s:
                    candidates.append(rel)
        removed = 0
        for rel in dict.fromkeys(candidates):
            if not is_ref(rel):
                self.delete(rel)
                removed += 1
        return removed

    def stored_bytes(self) -> int:
        return sum(size for _rel, size, _mtime in self.list_objects())

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "weights_url": self.url, "uploads": self.uploads, "downloads": self.downloads,
            "bytes_uploaded": self.bytes_uploaded, "bytes_downloaded": self.bytes_downloaded,
        }  # fmt: skip
        if self.cache is not None:
            out.update(self.cache.statistics())
        return out

    def close(self) -> None:
        """Nothing to release: the HTTP client is shared by the process's stores (and closed with it)."""

    # -- internals ---------------------------------------------------------------------------------------------
    def _check_bucket(self) -> None:
        b = self.location.bucket
        self._call("open", "", lambda: self._client.head_bucket(Bucket=b), missing=f"S3 bucket {b!r} does not exist")

    def _call(self, what: str, key: str, fn: Any, missing: str | None = None) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                if missing is not None:
                    raise StorageError(missing) from None
                raise _NotFound(key) from None
            raise StorageError(f"object store {what} of s3://{self.location.bucket}/{key} failed: {code} {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageError(
                f"object store {what} of s3://{self.location.bucket}/{key} failed ({type(exc).__name__}: {exc}); "
                f"endpoint {os.environ.get('AWS_ENDPOINT_URL', '(AWS default)')}"
            ) from exc


class _NotFound(Exception):
    pass


_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _make_client(connect_timeout_s: float, read_timeout_s: float, max_attempts: int) -> Any:
    """One boto3 client per endpoint/region/limits, shared by the stores of this process (boto3 clients are
    thread-safe; building one costs ~100 ms, which a library reopened often should not pay each time)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    key = (endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"), connect_timeout_s, read_timeout_s, max_attempts)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = _new_client(endpoint, region, connect_timeout_s, read_timeout_s, max_attempts)
        return client


def _new_client(endpoint: str | None, region: str, connect_timeout_s: float, read_timeout_s: float,
                max_attempts: int) -> Any:  # fmt: skip
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise ConfigError(
            "`weights_path` s3://... needs boto3: pip install 'smoa[distributed]'"
        ) from exc
    config = Config(
        connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=32, s3={"addressing_style": "path"},
    )  # fmt: skip
    # boto3 reads AWS_ENDPOINT_URL itself (botocore >= 1.31); passing it explicitly keeps older ones working
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


class LocalCacheTier:
    """Verified copies of weight objects on local disk, named by their sha256, evicted least-recently-used.

    A file is written to a temporary name, fsync-free (it is a cache: a torn copy fails its checksum on read and
    is dropped), then renamed into place. Thread-safe; safe across processes (rename is atomic, reads verify).
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # digest -> size, in least-recently-used order (dict order)
        try:
            root.mkdir(parents=True, exist_ok=True)
            for p in sorted(root.glob("*/*"), key=lambda p: p.stat().st_atime):
                if len(p.name) == 64 and set(p.name) <= _HEX:
                    self._sizes[p.name] = p.stat().st_size
                elif p.name.startswith(".tmp-"):
                    p.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot use the weight cache directory {str(root)!r}: {exc}") from exc
        self._total = sum(self._sizes.values())

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def get(self, digest: str) -> bytes | None:
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except OSError:
            with self._lock:
                self.misses += 1
                if digest in self._sizes:
                    self._total -= self._sizes.pop(digest)
            return None
        if hashlib.sha256(data).hexdigest() != digest:  # torn or tampered copy: drop it, fetch again
            self.discard(digest)
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
            size = self._sizes.pop(digest, len(data))
            self._sizes[digest] = size
        return data

    def put(self, digest: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            return  # a full cache disk only costs a download next time
        with self._lock:
            if digest not in self._sizes:
                self._total += len(data)
            self._sizes.pop(digest, None)
            self._sizes[digest] = len(data)
            victims = []
            while self._total > self.max_bytes and self._sizes:
                victim, size = next(iter(self._sizes.items()))
                del self._sizes[victim]
                self._total -= size
                victims.append(victim)
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)

    def discard(self, digest: str) -> None:
        with self._lock:
            size = self._sizes.pop(digest, None)
            if size is not None:
                self._total -= size
        self._path(digest).unlink(missing_ok=True)

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            return {"local_cache_files": len(self._sizes), "local_cache_bytes": self._total,
                    "local_cache_hits": self.hits, "local_cache_misses": self.misses}  # fmt: skip


def default_cache_dir(location: S3Location) -> Path:
    """``$XDG_CACHE_HOME/smoa/s3/<bucket>/<prefix>`` (``~/.cache`` when unset): shared by every library process
    of this user on this machine (files are immutable and verified, so sharing is safe)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "smoa" / "s3" / location.bucket / (location.prefix or "_")


def open_weight_store(url: str, config: Any = None) -> S3WeightStore:
    """Factory registered for ``s3://`` in :mod:`smoa.storage.base`.

    The local cache tier lives in ``config.weights_cache_path`` (or ``config.extra["weights_cache_path"]``),
    default :func:`default_cache_dir`; ``weights_cache_path=""`` turns it off. Its budget is
    ``weights_cache_max_bytes`` (default 4 GiB).
    """
    extra = getattr(config, "extra", None) or {}
    location = S3Location.parse(str(url))
    cache = getattr(config, "weights_cache_path", None)
    if cache is None:
        cache = extra.get("weights_cache_path")
    cache_dir: Path | None = default_cache_dir(location) if cache is None else (Path(cache) if str(cache) else None)
    max_bytes = getattr(config, "weights_cache_max_bytes", None) or extra.get("weights_cache_max_bytes") or 4 * 1024**3
    return S3WeightStore(
        str(url), cache_dir=cache_dir, cache_max_bytes=int(max_bytes),
        connect_timeout_s=float(extra.get("s3_connect_timeout_s", 3.0)),
        read_timeout_s=float(extra.get("s3_read_timeout_s", 20.0)),
        max_attempts=int(extra.get("s3_max_attempts", 3)),
    )  # fmt: skip
