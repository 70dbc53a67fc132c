"""The strict safetensors reader and the writer smoa uses for every adapter file (its own and foreign ones).

Reader: a strict pre-parser for untrusted safetensors bytes, run *before* the safetensors library sees them.
Writer: :func:`encode_safetensors` (deterministic, header cached per layout) and :func:`encode_adapter_file` /
:func:`with_row_meta`, which also record the adapter's catalog row in the header's ``__metadata__`` under
:data:`ROW_META_KEY`, so ``smoa fsck --repair`` can rebuild a lost catalog from the weight files alone
(:func:`read_adapter_meta`).

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
This module imports nothing from :mod:`smoa.interop` (``smoa.interop.safetensors_check`` re-exports it).
Foreign files raise :class:`~smoa.errors.UnsafeAdapterFileError`; stored blobs (``stored=True``) raise
:class:`~smoa.errors.CorruptAdapterError` with the same list.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Mapping, Sequence
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


# -- writer --------------------------------------------------------------------------------------------------------
FORMAT = "smoa-lora/1"
ROW_META_KEY = "smoa.row"  # __metadata__ key holding the adapter's catalog row as JSON
ROW_META_VERSION = 1
MAX_ROW_META_BYTES = 256 * 1024  # the row's JSON, as escaped in the header; examples are cut to fit (flagged)
ROW_FIELDS = (
    "id", "specialization", "granularity", "rank", "alpha", "description", "target_modules", "num_parameters",
    "profile", "created_at", "domain_tags", "skill_tags", "metadata", "examples", "pinned", "created_query",
    "version",
)  # fmt: skip
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def st_dtype(t: torch.Tensor) -> str:
    """safetensors dtype code of a float tensor (``"F32"`` ...)."""
    return ST_DTYPES[str(t.dtype).removeprefix("torch.")]


@functools.lru_cache(maxsize=4096)
def _header(layout: tuple[tuple[str, str, tuple[int, ...], int], ...], metadata: tuple[tuple[str, str], ...]) -> bytes:
    """8-byte length + JSON header (padded to 8 bytes) for tensors laid out back to back in ``layout`` order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, nbytes in layout:
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad the header to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> bytes:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.dtype is torch.bfloat16 else t.numpy().tobytes()


def encode_safetensors(tensors: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> bytes:
    """Encode named tensors in the safetensors format (header cached per layout: the bulk path is one join).

    Args:
        tensors: ``(name, tensor)`` pairs, written in this order; float dtypes only.
        metadata: string -> string header metadata.
    """
    layout = []
    parts = []
    for name, t in tensors:
        raw = _tensor_bytes(t)
        layout.append((name, st_dtype(t), tuple(t.shape), len(raw)))
        parts.append(raw)
    return _header(tuple(layout), tuple(sorted(metadata.items()))) + b"".join(parts)


def row_meta_json(row_meta: Mapping[str, Any]) -> str:
    """The JSON text stored under :data:`ROW_META_KEY`: the known row fields only, examples cut to fit.

    Raises:
        InvalidInputError: ``row_meta`` lacks ``id`` or is not JSON-serialisable.
    """
    from smoa.errors import InvalidInputError

    if not isinstance(row_meta, Mapping) or not isinstance(row_meta.get("id"), str):
        raise InvalidInputError(f"`row_meta` must be a mapping with a string `id`, got {row_meta!r:.100}")
    out: dict[str, Any] = {"v": ROW_META_VERSION}
    for k in ROW_FIELDS:
        v = row_meta.get(k)
        if v is not None:
            out[k] = v
    try:
        text = _ROW_ENCODER.encode(out)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"`row_meta` of {row_meta['id']!r} is not JSON-serialisable: {exc}") from None
    if 6 * len(text) > MAX_ROW_META_BYTES and _escaped_size(text) > MAX_ROW_META_BYTES:  # 6: worst-case escape
        examples = list(out.pop("examples", []))
        kept, size = [], _escaped_size(json.dumps(out, ensure_ascii=False, separators=(",", ":"))) + 64
        for e in examples:
            size += _escaped_size(json.dumps(e, ensure_ascii=False)) + 1
            if size > MAX_ROW_META_BYTES:
                break
            kept.append(e)
        out["examples"], out["examples_truncated"] = kept, len(examples) - len(kept)
        text = json.dumps(out, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text


def _escaped_size(text: str) -> int:
    """Bytes ``text`` takes as a JSON string value inside the header."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8"))


_ROW_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def _split_header(raw: bytes) -> tuple[str, str]:
    """``(metadata entries but the row, tensor entries)`` of a header, each a JSON fragment without braces."""
    header = json.loads(raw)
    meta = dict(header.pop("__metadata__", {}) or {})
    meta.pop(ROW_META_KEY, None)
    meta_fragment = json.dumps(dict(sorted(meta.items())), ensure_ascii=False, separators=(",", ":"))[1:-1]
    return meta_fragment, json.dumps(header, separators=(",", ":"))[1:-1]


def with_row_meta(data: bytes | bytearray | memoryview, row_meta: Mapping[str, Any]) -> bytes:
    """``data`` (safetensors bytes smoa wrote) with ``row_meta`` recorded in its header (tensor bytes unchanged).

    The tensor part of the header is parsed once per layout (cached), so the bulk create path pays a JSON dump
    of the row and one copy of the bytes per adapter. Any previous row metadata is replaced.

    Raises:
        CorruptAdapterError: ``data`` is not a safetensors file.
        InvalidInputError: ``row_meta`` has no string ``id`` or does not serialise.
    """
    view = memoryview(data)
    if view.nbytes < 8:
        raise CorruptAdapterError(f"with_row_meta: {view.nbytes} byte(s) are not a safetensors file")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > view.nbytes - 8:
        raise CorruptAdapterError(f"with_row_meta: header length {n} exceeds the data ({view.nbytes} bytes)")
    raw = bytes(view[8 : 8 + n]).rstrip(b" ")
    try:
        meta, fragment = _split_header(raw)
    except (ValueError, AttributeError, TypeError) as exc:
        raise CorruptAdapterError(f"with_row_meta: header does not parse ({exc})") from None
    row = json.dumps(ROW_META_KEY) + ":" + json.dumps(row_meta_json(row_meta), ensure_ascii=False)
    head = '{"__metadata__":{' + (meta + "," if meta else "") + row + "}" + ("," + fragment if fragment else "") + "}"
    encoded = head.encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(view[8 + n :])


def encode_adapter_file(weights: Any, row_meta: Mapping[str, Any]) -> bytes:
    """The stored file of one adapter: its LoRA factors (keys ``<module>.lora_A`` / ``.lora_B``, in
    ``weights`` order), ``format``/``alpha``/``rank`` and the catalog row ``row_meta`` in ``__metadata__``.

    Args:
        weights: a :class:`~smoa.adapter.weights.LoraWeights`.
        row_meta: the row's fields (:data:`ROW_FIELDS`; unknown keys are dropped, ``None`` values omitted).
    """
    tensors: list[tuple[str, Any]] = []
    for m, (a, b) in weights.factors.items():
        tensors.append((f"{m}.lora_A", a))
        tensors.append((f"{m}.lora_B", b))
    meta = {"format": FORMAT, "alpha": repr(float(weights.alpha)), "rank": str(int(weights.rank)),
            ROW_META_KEY: row_meta_json(row_meta)}  # fmt: skip
    return encode_safetensors(tensors, meta)


def read_adapter_meta(data: bytes | bytearray | memoryview, *, name: str = "adapter file") -> dict[str, Any]:
    """The catalog row recorded in an adapter file's header (strictly checked first).

    Returns:
        The row fields (:data:`ROW_FIELDS` present in the file), plus ``alpha``/``rank`` from the header when the
        row lacks them, ``format``, and ``examples_truncated`` when examples were cut to fit. ``{}`` with only
        ``format``/``alpha``/``rank`` for a file written before row metadata existed (no ``id`` key).

    Raises:
        CorruptAdapterError: the bytes are not a valid safetensors file, or the row JSON does not parse.
    """
    header, problems = inspect_safetensors_bytes(data)
    if header is None:
        raise refuse(name, problems, stored=True)
    meta = header.metadata
    out: dict[str, Any] = {}
    text = meta.get(ROW_META_KEY)
    if text is not None:
        row, problem = strict_json_loads(text)
        if problem is not None or not isinstance(row, dict):
            raise CorruptAdapterError(f"{name}: `{ROW_META_KEY}` header metadata {problem or 'is not an object'}")
        out.update(row)
        out.pop("v", None)
    for key, conv in (("alpha", float), ("rank", int)):
        if key not in out and key in meta:
            try:
                out[key] = conv(meta[key])
            except ValueError:
                raise CorruptAdapterError(f"{name}: header `{key}`={meta[key][:40]!r} is not a number") from None
    if "format" in meta:
        out["format"] = meta["format"]
    return out
