"""A compact ``int64 key -> int32 value`` map for the routing indexes (8 B per key instead of ~100 B in a dict).

Layout::

    base   keys int32 [n] sorted, values int32 [n]     the bulk, looked up by binary search (keys int64 once
                                                       one does not fit an int32)
        or values int32 [max key + 1] by key           when the keys are dense (catalog ids: 1..n with few
                                                       gaps): one read per lookup, 4 B per possible key
    delta  dict key -> value (-1: removed from base)   recent changes, folded into base past 1/16 of its size

A lookup reads the delta first, then the base; a bulk insert of new keys goes straight into the base
(one sort). Folding costs O(n) numpy work every ``n / 16`` changes, so a change costs O(1) amortised.

The dense base exists for the route's cold lookups: after a 1M-key HNSW walk, a binary search over 4 MB of keys
missed the caches at every level (~40 us for the ~30 candidates of a route, twice per HYBRID route); reading
``values[key]`` misses once per key. It is chosen whenever the keys span less than :data:`DENSE_SPAN` times
their count (plus :data:`DENSE_SLACK`), so it never holds more than the sorted layout's 8 B per key.
"""

from __future__ import annotations

import numpy as np

MISSING = -1
_I32 = 2**31
DENSE_SPAN = 2  # a dense base spans at most this many slots (4 B each) per key: never above the sorted 8 B
DENSE_SLACK = 1024


def fits32(keys: np.ndarray) -> bool:
    """Whether every key fits an int32 (keys are stored as int32 while they do: 4 B per key saved)."""
    return not len(keys) or (int(np.min(keys)) >= 0 and int(np.max(keys)) < _I32)


def key_array(keys: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``keys`` in ``like``'s dtype, for lookups in ``like`` (a key an int32 array cannot hold becomes -1, which no
    int32 array holds); numpy would otherwise copy ``like`` to int64 on every lookup."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    if like.dtype == np.int32:
        return np.where((keys >= 0) & (keys < _I32), keys, -1).astype(np.int32)
    return keys


def narrow(keys: np.ndarray, wide: bool = False) -> np.ndarray:
    """``keys`` as int32 if they all fit (and not ``wide``), else int64."""
    return keys.astype(np.int64 if wide or not fits32(keys) else np.int32, copy=False)


class KeyMap:
    """``int64 key -> int32 value >= 0`` (module docstring); absent keys read as :data:`MISSING`."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, np.int32)  # int64 once a key does not fit; empty while the base is dense
        self._vals = np.zeros(0, np.int32)
        self._dense: np.ndarray | None = None  # values by key (MISSING where absent), when the keys are dense
        self._base_n = 0  # keys in the base
        self._delta: dict[int, int] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: int) -> bool:
        return self.get(key) != MISSING

    def _base_get(self, key: int) -> int:
        if self._dense is not None:
            return int(self._dense[key]) if 0 <= key < len(self._dense) else MISSING
        if self._keys.dtype == np.int32 and not 0 <= key < _I32:
            return MISSING
        i = int(np.searchsorted(self._keys, self._keys.dtype.type(key)))  # same dtype: no copy of keys
        return int(self._vals[i]) if i < len(self._keys) and self._keys[i] == key else MISSING

    def get(self, key: int) -> int:
        key = int(key)
        v = self._delta.get(key)
        return self._base_get(key) if v is None else v

    def get_many(self, keys: np.ndarray) -> np.ndarray:
        """int32 values of ``keys`` ``[m]`` (:data:`MISSING` where absent)."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        if self._dense is not None:
            n = len(self._dense)
            if len(keys) and 0 <= int(keys.min()) and int(keys.max()) < n:  # the usual case: no mask
                out = self._dense[keys]
            else:
                out = np.full(len(keys), MISSING, np.int32)
                ok = (keys >= 0) & (keys < n)
                out[ok] = self._dense[keys[ok]]
        else:
            out = np.full(len(keys), MISSING, np.int32)
            if len(self._keys):
                q = key_array(keys, self._keys)
                i = np.minimum(np.searchsorted(self._keys, q), len(self._keys) - 1)
                hit = self._keys[i] == q
                out[hit] = self._vals[i[hit]]
        if self._delta:
            rows = range(len(keys)) if len(keys) <= 64 else np.flatnonzero(
                np.isin(keys, np.fromiter(self._delta.keys(), np.int64, len(self._delta)))).tolist()
            for j in rows:
                v = self._delta.get(int(keys[j]))
                if v is not None:
                    out[j] = v
        return out

    def set(self, key: int, value: int) -> None:
        key, value = int(key), int(value)
        if value < 0:
            raise ValueError(f"`value` must be >= 0, got {value}")
        self._len += self.get(key) == MISSING
        self._delta[key] = value
        self._maybe_fold()

    def pop(self, key: int) -> int:
        """Remove ``key``; returns its value (:data:`MISSING` if it was absent)."""
        key = int(key)
        old = self.get(key)
        if old == MISSING:
            return MISSING
        if self._base_get(key) == MISSING:
            del self._delta[key]
        else:
            self._delta[key] = MISSING
        self._len -= 1
        self._maybe_fold()
        return old

    def pop_many(self, keys: np.ndarray) -> None:
        """Remove ``keys`` (absent ones ignored): a few beside a big base one by one (through the delta), else in
        one pass over the base."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        if not len(keys):
            return
        if len(keys) * 64 <= self._base_n:
            for k in keys.tolist():
                self.pop(k)
            return
        self._fold()
        base_k, base_v = self._base_items()
        keep = ~np.isin(base_k, keys)
        self._len -= int(len(base_k) - keep.sum())
        self._set_base(base_k[keep], base_v[keep])

    def set_new(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Bulk insert of keys that are absent (the caller checked) and distinct: a few keys beside a big base go
        into the delta while it has room (a sort of the whole base per call cost ~3 ms at 200K keys, paid per
        block of a refit's install), else one sort into the base."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        if not len(keys):
            return
        if len(keys) * 64 <= self._base_n and len(self._delta) + len(keys) <= self._delta_room():
            self._delta.update(zip(keys.tolist(), np.asarray(values, np.int64).reshape(-1).tolist()))
            self._len += len(keys)
            return
        self._fold()
        base_k, base_v = self._base_items()
        k = np.concatenate([base_k, keys])
        v = np.concatenate([base_v, np.asarray(values, np.int32).reshape(-1)])
        order = np.argsort(k, kind="stable")
        self._set_base(k[order], v[order])
        self._len += len(keys)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys [n] sorted (int32 while they fit, else int64), values int32 [n])``."""
        self._fold()
        return self._base_items()

    def _base_items(self) -> tuple[np.ndarray, np.ndarray]:
        """The base as sorted ``(keys, values)``."""
        if self._dense is None:
            return self._keys, self._vals
        keys = np.flatnonzero(self._dense != MISSING)
        return narrow(keys), self._dense[keys]

    def _set_base(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Make sorted, distinct ``keys`` with their ``vals`` the base: dense when they span little."""
        self._base_n = len(keys)
        vals = np.asarray(vals, np.int32)
        if len(keys) and int(keys[0]) >= 0 and int(keys[-1]) < min(_I32, DENSE_SPAN * len(keys) + DENSE_SLACK):
            dense = np.full(int(keys[-1]) + 1, MISSING, np.int32)
            dense[keys] = vals
            self._dense, self._keys, self._vals = dense, np.zeros(0, np.int32), np.zeros(0, np.int32)
        else:
            self._dense, self._keys, self._vals = None, narrow(np.asarray(keys)), vals

    def _delta_room(self) -> int:
        return max(4096, self._base_n // 16)

    def _maybe_fold(self) -> None:
        if len(self._delta) > self._delta_room():
            self._fold()

    def _fold(self) -> None:
        if not self._delta:
            return
        dk = np.fromiter(self._delta.keys(), np.int64, len(self._delta))
        dv = np.fromiter(self._delta.values(), np.int64, len(self._delta))
        base_k, base_v = self._base_items()
        keep = ~np.isin(base_k, dk)
        live = dv >= 0
        k = np.concatenate([base_k[keep], dk[live]])
        v = np.concatenate([base_v[keep], dv[live].astype(np.int32)])
        order = np.argsort(k, kind="stable")
        self._set_base(k[order], v[order])
        self._delta = {}

    def nbytes(self) -> int:
        """Bytes held (arrays, plus ~100 B per pending delta entry)."""
        base = self._dense.nbytes if self._dense is not None else self._keys.nbytes + self._vals.nbytes
        return int(base + 100 * len(self._delta))


def sorted_insert(keys: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``keys`` (sorted, distinct; int32 or int64) with ``new`` (distinct, absent from ``keys``) merged in, sorted,
    int32 while everything fits."""
    new = np.asarray(new, np.int64).reshape(-1)
    if not len(new):
        return keys
    wide = keys.dtype == np.int64
    if len(new) == 1 and (wide or fits32(new)):
        k = int(new[0])  # searched as keys' dtype: numpy would copy an int32 ``keys`` to compare with an int64
        return np.insert(keys, np.searchsorted(keys, keys.dtype.type(k)), k)
    return narrow(np.sort(np.concatenate([keys.astype(np.int64), new]), kind="stable"), wide)


def sorted_delete(keys: np.ndarray, gone: np.ndarray) -> np.ndarray:
    """``keys`` (sorted) without the values in ``gone``."""
    gone = np.asarray(gone, np.int64).reshape(-1)
    if not len(gone) or not len(keys):
        return keys
    if len(gone) == 1:
        g = int(gone[0])
        if keys.dtype == np.int32 and not 0 <= g < _I32:
            return keys
        i = int(np.searchsorted(keys, keys.dtype.type(g)))
        return np.delete(keys, i) if i < len(keys) and keys[i] == g else keys
    return keys[~np.isin(keys, gone)]
