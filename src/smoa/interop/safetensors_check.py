"""A strict pre-parser for untrusted safetensors bytes, run *before* the safetensors library sees them.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON header, then one
byte buffer holding every tensor::

    ┌──────────┬────────────────────────────────────────────┬──────────────────────────────┐
    │ u64 LE n │ {"name": {"dtype", "shape", "data_offsets"}, │ tensor bytes, back to back,  │
    │          │  "__metadata__": {str: str}}  (n bytes)     │ covering the buffer exactly  │
    └──────────┴────────────────────────────────────────────┴──────────────────────────────┘

The safetensors library (Rust) already refuses most malformed files; this module is stricter and, above
all, *explains*: it collects every problem (header size cap, JSON that is not an object, duplicate keys at
any depth, unknown entry fields, dtypes outside the LoRA set, negative or overflowing shapes, offsets out of
range, gaps, overlaps, trailing bytes, a non ``str -> str`` ``__metadata__``) and raises one error listing
them all. Only bytes that pass are handed to :func:`safetensors.torch.load` (:func:`load_safetensors_bytes`).

The check uses ``json`` and ``struct`` only (no torch), and costs a few microseconds for a nano adapter.
Foreign files raise :class:`~smoa.errors.UnsafeAdapterFileError`; stored blobs (``stored=True``) raise
:class:`~smoa.errors.CorruptAdapterError` with the same list.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from smoa.errors import CorruptAdapterError, SmoaError, UnsafeAdapterFileError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MAX_HEADER_BYTES = 1 << 20  # 1 MiB: a 30-layer, 7-module adapter needs ~50 KiB
DTYPE_SIZES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}  # float dtypes a LoRA factor may have
MAX_TENSOR_DIMS = 8
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_MAX_SHOWN = 20  # problems listed one by one before "... and N more"


class TensorEntry(NamedTuple):
    """One tensor of a checked header.

    Attributes:
        name: tensor key.
        dtype: safetensors dtype code (``"F32"``, ``"F16"``, ``"BF16"``, ``"F64"``).
        shape: tensor shape.
        begin: start offset in the byte buffer (after the header).
        end: end offset (exclusive) in the byte buffer.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A header that passed every check.

    Attributes:
        tensors: entries in file-offset order.
        metadata: the ``__metadata__`` map (empty if absent).
        header_len: ``n``, the JSON header's length in bytes.
    """

    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    header_len: int


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f"has duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _no_constants(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token!r}")


def strict_json_loads(text: str | bytes) -> tuple[Any, str | None]:
    """Parse strict JSON: duplicate keys and ``NaN``/``Infinity`` refused, deep nesting caught.

    Returns:
        ``(value, None)`` on success, ``(None, problem)`` otherwise, the problem a predicate to put after the
        subject (``"is not valid JSON (...)"``); never raises on bad input.
    """
    try:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants), None
    except UnicodeDecodeError as exc:
        return None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
    except _DuplicateKeyError as exc:
        return None, str(exc)
    except RecursionError:
        return None, "is JSON nested too deeply"
    except ValueError as exc:  # json.JSONDecodeError and the constant refusal
        return None, f"is not valid JSON ({exc})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fast_entry(name: str, entry: Any, buffer_len: int) -> TensorEntry | None:
    """The common, valid case in a few type checks; ``None`` sends the entry to :func:`_check_entry`."""
    if type(entry) is not dict or entry.keys() != _ENTRY_FIELDS:
        return None
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPE_SIZES or type(shape) is not list or len(shape) > MAX_TENSOR_DIMS:
        return None
    if type(offsets) is not list or len(offsets) != 2:
        return None
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= buffer_len:
        return None
    numel = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        numel *= d  # at most 8 factors: exact Python ints, no overflow
    if numel * DTYPE_SIZES[dtype] != end - begin:
        return None
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_entry(name: str, entry: Any, buffer_len: int) -> tuple[TensorEntry | None, list[str]]:
    """Validate one tensor entry of the header; returns the entry (or None) and its problems."""
    label = f"tensor {name[:120]!r}"
    if not isinstance(entry, dict):
        return None, [f"{label}: entry must be a JSON object, got {type(entry).__name__}"]
    problems: list[str] = []
    missing = sorted(_ENTRY_FIELDS - entry.keys())
    unknown = sorted(entry.keys() - _ENTRY_FIELDS)
    if missing:
        problems.append(f"{label}: missing field(s) {', '.join(f'`{k}`' for k in missing)}")
    if unknown:
        problems.append(f"{label}: unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if "dtype" in entry and not (isinstance(dtype, str) and dtype in DTYPE_SIZES):  # a dict dtype is unhashable
        shown = repr(dtype[:20]) if isinstance(dtype, str) else json.dumps(dtype)[:40]
        problems.append(f"{label}: `dtype`={shown} is not allowed (allowed: {', '.join(DTYPE_SIZES)})")
    if "shape" in entry:
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            problems.append(f"{label}: `shape` must be a list of integers, got {json.dumps(shape)[:80]}")
            shape = None
        elif len(shape) > MAX_TENSOR_DIMS:
            problems.append(f"{label}: `shape` has {len(shape)} dimensions (at most {MAX_TENSOR_DIMS})")
            shape = None
        elif any(d < 0 for d in shape):
            problems.append(f"{label}: `shape`={shape} has a negative dimension")
            shape = None
    if "data_offsets" in entry:
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            problems.append(f"{label}: `data_offsets` must be [begin, end] integers, got {json.dumps(offsets)[:80]}")
            offsets = None
        elif not 0 <= offsets[0] <= offsets[1] <= buffer_len:
            problems.append(
                f"{label}: `data_offsets`={offsets} out of range (0 <= begin <= end <= {buffer_len} buffer bytes)"
            )
            offsets = None
    if problems or shape is None or offsets is None:
        return None, problems
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]  # exact Python ints (<= 8 factors): no overflow
    if nbytes != offsets[1] - offsets[0]:
        need = str(nbytes) if nbytes < 2**64 else "more than 2**64"
        problems.append(
            f"{label}: `shape`={json.dumps(shape)[:80]} x {dtype} needs {need} bytes "
            f"but `data_offsets`={offsets} span {offsets[1] - offsets[0]}"
        )
        return None, problems
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1]), problems


def _by_offset(e: TensorEntry) -> tuple[int, int]:
    return (e.begin, e.end)


def _check_layout(entries: list[TensorEntry], buffer_len: int) -> list[str]:
    """Tensors (sorted by offset) must tile the byte buffer exactly: no gap, no overlap, no trailing byte."""
    problems: list[str] = []
    pos = 0
    for t in entries:
        if t.begin > pos:
            problems.append(f"gap of {t.begin - pos} byte(s) before tensor {t.name[:120]!r} (offset {pos}..{t.begin})")
        elif t.begin < pos:
            problems.append(f"tensor {t.name[:120]!r} overlaps the previous tensor (starts at {t.begin} < {pos})")
        pos = max(pos, t.end)
    if pos < buffer_len:
        problems.append(f"{buffer_len - pos} trailing byte(s) after the last tensor (buffer has {buffer_len})")
    return problems


def _check_metadata(meta: Any) -> tuple[dict[str, str], list[str]]:
    if not isinstance(meta, dict):
        return {}, [f"`__metadata__` must be a JSON object of strings, got {type(meta).__name__}"]
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        return {}, [f"`__metadata__` values must be strings; not for key(s) {', '.join(repr(k[:40]) for k in bad[:5])}"]
    return dict(meta), []


def inspect_safetensors_bytes(
    data: bytes | bytearray | memoryview, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[SafetensorsHeader | None, list[str]]:
    """The pure check: every problem of ``data`` as a safetensors file, without raising.

    Args:
        data: the whole file's bytes.
        max_header_bytes: refuse a JSON header longer than this.

    Returns:
        ``(header, [])`` when the bytes pass, else ``(None, problems)`` with every problem found.
    """
    view = memoryview(data)
    size = view.nbytes
    if size < 8:
        return None, [f"file is {size} byte(s), shorter than the 8-byte header length prefix"]
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > max_header_bytes:
        return None, [f"header length {n} exceeds the cap of {max_header_bytes} bytes"]
    if n > size - 8:
        return None, [f"header length {n} exceeds the {size - 8} byte(s) after the prefix (truncated file?)"]
    raw = bytes(view[8 : 8 + n])
    if not raw.startswith(b"{"):
        return None, [f"header does not start with '{{' (first bytes {raw[:16]!r}): not a JSON object"]
    header, problem = strict_json_loads(raw)
    if problem is not None:
        return None, [f"header {problem}"]
    if not isinstance(header, dict):  # pragma: no cover - guarded by the '{' check
        return None, [f"header must be a JSON object, got {type(header).__name__}"]
    buffer_len = size - 8 - n
    problems: list[str] = []
    metadata: dict[str, str] = {}
    entries: list[TensorEntry] = []
    for name, entry in header.items():
        if name == "__metadata__":
            metadata, meta_problems = _check_metadata(entry)
            problems += meta_problems
            continue
        fast = _fast_entry(name, entry, buffer_len)
        if fast is not None:
            entries.append(fast)
            continue
        checked, entry_problems = _check_entry(name, entry, buffer_len)
        problems += entry_problems
        if checked is not None:
            entries.append(checked)
    entries.sort(key=_by_offset)
    if not problems:
        problems += _check_layout(entries, buffer_len)
    if problems:
        return None, problems
    return SafetensorsHeader(tuple(entries), metadata, n), []


def refuse(name: str, problems: list[str], *, stored: bool) -> SmoaError:
    """The error listing ``problems``: :class:`CorruptAdapterError` for stored blobs, else unsafe-file."""
    shown = problems[:_MAX_SHOWN]
    if len(problems) > _MAX_SHOWN:
        shown = shown + [f"... and {len(problems) - _MAX_SHOWN} more problem(s)"]
    if stored:
        lines = "\n".join(f"  - {p}" for p in shown)
        return CorruptAdapterError(f"{name}: stored weights are corrupt: {len(problems)} problem(s)\n{lines}")
    return UnsafeAdapterFileError(name, shown)


def check_safetensors_bytes(
    data: bytes | bytearray | memoryview,
    *,
    name: str,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    stored: bool = False,
) -> None:
    """Raise unless ``data`` is a well-formed safetensors file of float tensors.

    Args:
        data: the file's bytes.
        name: what to call the file/adapter in the error (a path or an adapter id).
        max_header_bytes: cap on the JSON header length.
        stored: ``True`` for bytes read back from smoa's own storage (raises
            :class:`CorruptAdapterError`), ``False`` for foreign files (raises :class:`UnsafeAdapterFileError`).
    """
    _, problems = inspect_safetensors_bytes(data, max_header_bytes=max_header_bytes)
    if problems:
        raise refuse(name, problems, stored=stored)


def check_stored_bytes(
    data: bytes | bytearray | memoryview, *, name: str, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> None:
    """:func:`check_safetensors_bytes` for smoa's own stored blobs: raises :class:`CorruptAdapterError`."""
    check_safetensors_bytes(data, name=name, max_header_bytes=max_header_bytes, stored=True)


def load_safetensors_bytes(
    data: bytes | bytearray | memoryview,
    *,
    name: str,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    stored: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check ``data``, then parse it with the safetensors library.

    Returns:
        ``(tensors, metadata)``: ``{key: tensor}`` (CPU, in file order) and the ``__metadata__`` map.

    Raises:
        UnsafeAdapterFileError | CorruptAdapterError: as :func:`check_safetensors_bytes`; also when the
            safetensors library disagrees with the pre-check (reported, never a foreign exception).
    """
    header, problems = inspect_safetensors_bytes(data, max_header_bytes=max_header_bytes)
    if header is None:
        raise refuse(name, problems, stored=stored)
    from safetensors.torch import load

    try:
        loaded = load(bytes(data))
    except Exception as exc:  # noqa: BLE001 - the library's own refusal, reported as ours
        raise refuse(name, [f"safetensors refused the file: {type(exc).__name__}: {str(exc)[:200]}"], stored=stored) from None
    tensors = {t.name: loaded[t.name] for t in header.tensors}
    return tensors, header.metadata

