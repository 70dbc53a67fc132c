"""PEFT LoRA directories in and out: untrusted import, exact export.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys read
``base_model.model.<module>.lora_A.weight`` (``[r, d_in]``) and ``...lora_B.weight`` (``[d_out, r]``),
optionally with an adapter-name infix (``.lora_A.default.weight``). With ``s = lora_alpha / r`` the adapted
layer computes ``y = W x + s * B (A x)`` — exactly :class:`~smoa.adapter.weights.LoraWeights`.

Import treats the directory as hostile::

    directory ──► files: regular, inside the directory (no escaping symlink), size-capped;
    │              pickles (.bin/.pt/.pkl ...) never opened
    ├─ adapter_config.json ──► strict JSON ──► PeftLoraSettings  (peft_config.py: refused features, warnings)
    └─ adapter_model.safetensors ──► safetensors_check (header) ──► key -> profile module, shapes, rank
                                                          └──► safetensors load ──► NaN/Inf check
    every problem of every stage ──► one UnsafeAdapterFileError

Export writes both files into a temporary sibling directory and renames it into place, so a reader never
sees a half-written adapter; ``PeftModel.from_pretrained(base, path)`` then gives the same outputs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smoa.adapter.profile import BaseProfile
from smoa.adapter.safetensors_io import (
    DEFAULT_MAX_HEADER_BYTES,
    SafetensorsHeader,
    inspect_safetensors_bytes,
    refuse,
)
from smoa.adapter.weights import LoraWeights
from smoa.errors import InvalidAdapterError, InvalidInputError, StorageError, UnsafeAdapterFileError
from smoa.interop.peft_config import (
    DEFAULT_MAX_CONFIG_BYTES,
    PeftLoraSettings,
    check_module_name,
    matches_target,
    parse_peft_config,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_MAX_FILE_BYTES = 2 << 30  # 2 GiB
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$")
_MAX_LISTED = 10


@dataclass
class ImportedAdapter:
    """A PEFT LoRA adapter that passed every check.

    Attributes:
        weights: the factors, keyed by profile module name, in the file's dtype.
        target_modules: profile module names the adapter adapts (model order).
        rank: LoRA rank ``r``.
        alpha: alpha with ``weights.scaling == alpha / rank`` (rsLoRA folded in).
        base_model_name_or_path: as the config wrote it (informational only; never opened).
        peft_target_modules: the config's own ``target_modules`` (names/suffixes, or one regex).
        warnings: non-fatal findings (dropped keys, ignored code references, ignored pickles ...).
    """

    weights: LoraWeights
    target_modules: list[str]
    rank: int
    alpha: float
    base_model_name_or_path: str | None
    peft_target_modules: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# -- the pure core: bytes in, adapter or problems out -----------------------------------------------------------
def _map_keys(header: SafetensorsHeader, profile: BaseProfile, problems: list[str]) -> dict[str, dict[str, str]]:
    """``{profile module: {"A": key, "B": key}}`` from tensor keys; odd keys and unknown modules are problems."""
    pairs: dict[str, dict[str, str]] = {}
    adapter_names: set[str] = set()
    odd: list[str] = []
    for t in header.tensors:
        m = _KEY_RE.match(t.name)
        if m is None:
            odd.append(t.name)
            continue
        module, ab = m.group("module"), m.group("ab")
        adapter_names.add(m.group("adapter") or "")
        if module not in profile:
            problems.append(f"tensor {t.name[:160]!r}: module {module[:120]!r} is not a linear module of profile {profile.name!r}")
            continue
        slot = pairs.setdefault(module, {})
        if ab in slot:
            problems.append(f"module {module!r} has two lora_{ab} tensors ({slot[ab]!r} and {t.name!r})")
        slot[ab] = t.name
    for key in odd[:_MAX_LISTED]:
        problems.append(f"tensor {key[:160]!r} is not a LoRA factor (expected base_model.model.<module>.lora_A/B.weight)")
    if len(odd) > _MAX_LISTED:
        problems.append(f"... and {len(odd) - _MAX_LISTED} more tensors that are not LoRA factors")
    if len(adapter_names) > 1:
        names = sorted(n or "<none>" for n in adapter_names)
        problems.append(f"tensors name {len(names)} different adapters {names[:5]}: one adapter per directory")
    for module, slot in pairs.items():
        for ab in "AB":
            if ab not in slot:
                problems.append(f"module {module!r} has lora_{'B' if ab == 'A' else 'A'} but no lora_{ab}")
    return pairs


def _check_shapes(
    pairs: dict[str, dict[str, str]], header: SafetensorsHeader, profile: BaseProfile, rank: int | None, problems: list[str]
) -> None:
    """Each A is ``[r, d_in]`` and each B ``[d_out, r]`` for the profile's shapes and the config's rank."""
    entries = {t.name: t for t in header.tensors}
    for module, slot in pairs.items():
        if set(slot) != {"A", "B"}:
            continue
        d_in, d_out = profile.shape(module)
        a, b = entries[slot["A"]], entries[slot["B"]]
        r = rank if rank is not None else (a.shape[0] if len(a.shape) == 2 else None)
        if a.shape != (r, d_in):
            problems.append(f"module {module!r}: lora_A has shape {list(a.shape)}, expected [{r}, {d_in}] (rank `r`={r})")
        if b.shape != (d_out, r):
            problems.append(f"module {module!r}: lora_B has shape {list(b.shape)}, expected [{d_out}, {r}] (rank `r`={r})")
        if a.dtype != b.dtype:
            problems.append(f"module {module!r}: lora_A is {a.dtype} but lora_B is {b.dtype}")


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if not bad:
        return []
    shown = ", ".join(repr(k) for k in bad[:_MAX_LISTED]) + (f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")
    return [f"NaN or Inf in {len(bad)} tensor(s): {shown}"]


class _Refused:
    """Marks a file that the directory scan already refused (its problem is listed; do not parse it)."""


_REFUSED = _Refused()


def read_peft_bytes(
    config_bytes: bytes | None,
    weights_bytes: bytes | None,
    profile: BaseProfile,
    *,
    name: str = "PEFT adapter",
    max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> ImportedAdapter:
    """Check and convert the two files of a PEFT LoRA directory, given as bytes (no file system).

    Args:
        config_bytes: ``adapter_config.json`` content (``None``: missing).
        weights_bytes: ``adapter_model.safetensors`` content (``None``: missing).
        profile: the base model's profile; modules and shapes are checked against it.
        name: what to call the adapter in the error.
        max_config_bytes: cap on the config's size.
        max_header_bytes: cap on the safetensors JSON header.

    Raises:
        UnsafeAdapterFileError: listing every problem of both files.
    """
    config = None if config_bytes is None else bytes(config_bytes)
    weights = None if weights_bytes is None else bytes(weights_bytes)
    return _import(config, weights, profile, name, max_config_bytes, max_header_bytes, [], [])


def _config_stage(config_bytes: bytes | None | _Refused, max_config_bytes: int, problems: list[str]) -> PeftLoraSettings | None:
    if config_bytes is None:
        problems.append(f"`{CONFIG_NAME}` is missing")
    elif isinstance(config_bytes, bytes):
        settings, config_problems = parse_peft_config(config_bytes, max_config_bytes=max_config_bytes)
        problems += config_problems
        return settings
    return None


def _header_stage(weights_bytes: bytes | None | _Refused, max_header_bytes: int, problems: list[str]) -> SafetensorsHeader | None:
    if weights_bytes is None:
        problems.append(f"`{WEIGHTS_NAME}` is missing")
    elif isinstance(weights_bytes, bytes):
        header, header_problems = inspect_safetensors_bytes(weights_bytes, max_header_bytes=max_header_bytes)
        problems += [f"{WEIGHTS_NAME}: {p}" for p in header_problems]
        return header
    return None


def _tensor_stage(
    header: SafetensorsHeader, settings: PeftLoraSettings | None, profile: BaseProfile, problems: list[str]
) -> dict[str, dict[str, str]]:
    """Keys -> profile modules, shapes against the profile and the config's rank, config's target list."""
    if not header.tensors:
        problems.append(f"{WEIGHTS_NAME} holds no tensors")
    pairs = _map_keys(header, profile, problems)
    _check_shapes(pairs, header, profile, settings.rank if settings else None, problems)
    if settings is not None and not settings.target_is_regex:
        for module in pairs:
            if not matches_target(module, settings):
                problems.append(f"module {module!r} has tensors but is not in the config's `target_modules`")
    return pairs


def _import(
    config_bytes: bytes | None | _Refused,
    weights_bytes: bytes | None | _Refused,
    profile: BaseProfile,
    name: str,
    max_config_bytes: int,
    max_header_bytes: int,
    problems: list[str],
    warnings: list[str],
) -> ImportedAdapter:
    """Both files through every stage; tensors are materialised only once every header-level check passed."""
    settings = _config_stage(config_bytes, max_config_bytes, problems)
    header = _header_stage(weights_bytes, max_header_bytes, problems)
    pairs = _tensor_stage(header, settings, profile, problems) if header is not None else {}
    if problems or settings is None or header is None or not isinstance(weights_bytes, bytes):
        raise refuse(name, problems, stored=False)
    tensors = _load_tensors(weights_bytes, name)
    problems += _non_finite(tensors)
    if problems:
        raise refuse(name, problems, stored=False)
    order = [m for m in profile.module_names if m in pairs]
    weights = LoraWeights({m: (tensors[pairs[m]["A"]], tensors[pairs[m]["B"]]) for m in order}, settings.alpha, settings.rank)
    try:
        weights.validate(profile, name=name)  # internal invariant: every check above already holds
    except InvalidAdapterError as exc:  # pragma: no cover - defensive
        raise refuse(name, [str(exc)], stored=False) from None
    return ImportedAdapter(
        weights=weights,
        target_modules=order,
        rank=settings.rank,
        alpha=settings.alpha,
        base_model_name_or_path=settings.base_model_name_or_path,
        peft_target_modules=list(settings.target_modules),
        warnings=warnings + settings.warnings,
    )


def _load_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except Exception as exc:  # noqa: BLE001 - the library disagreeing with the pre-check is still a refusal
        raise refuse(name, [f"safetensors refused the file: {type(exc).__name__}: {str(exc)[:200]}"], stored=False) from None


# -- the I/O shell: a directory on disk --------------------------------------------------------------------------
def _read_inside(root: Path, filename: str, max_bytes: int, problems: list[str]) -> bytes | None | _Refused:
    """Read ``root/filename`` if it is a regular file inside ``root`` of at most ``max_bytes``; else a problem."""
    path = root / filename
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"`{filename}` cannot be inspected: {exc.strerror}")
        return _REFUSED
    real = Path(os.path.realpath(path))
    if real.parent != root and root not in real.parents:
        problems.append(f"`{filename}` is a symlink that escapes the adapter directory (to {str(real)[:200]!r})")
        return _REFUSED
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        problems.append(f"`{filename}` cannot be opened: {exc.strerror}")
        return _REFUSED
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"`{filename}` is not a regular file")
            return _REFUSED
        if st.st_size > max_bytes:
            problems.append(f"`{filename}` is {st.st_size} bytes, over the cap of {max_bytes}")
            return _REFUSED
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew while we read
            problems.append(f"`{filename}` is over the cap of {max_bytes} bytes")
            return _REFUSED
        return data
    finally:
        os.close(fd)


def _scan_directory(root: Path, problems: list[str], warnings: list[str]) -> None:
    """Pickled weight files are never opened: refused when they are all there is, else ignored."""
    names = sorted(os.listdir(root))
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if not pickles:
        return
    listed = ", ".join(repr(n[:80]) for n in pickles[:5])
    if WEIGHTS_NAME in names:
        warnings.append(f"pickle-format file(s) {listed} ignored (never opened); weights read from {WEIGHTS_NAME}")
    else:
        problems.append(
            f"pickle-format weights {listed} refused: they could run code when loaded and are never opened "
            f"(convert the adapter to `{WEIGHTS_NAME}`)"
        )


def read_peft_dir(
    path: str | os.PathLike[str],
    profile: BaseProfile,
    *,
    max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> ImportedAdapter:
    """Import an untrusted PEFT LoRA directory.

    Args:
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        profile: base-model profile; modules and shapes must fit it.
        max_config_bytes: cap on ``adapter_config.json``.
        max_file_bytes: cap on ``adapter_model.safetensors``.
        max_header_bytes: cap on the safetensors JSON header.

    Returns:
        The checked adapter; ``warnings`` lists what was dropped or ignored.

    Raises:
        UnsafeAdapterFileError: listing every problem found (nothing is executed, nothing unpickled).
    """
    label = os.fspath(path)
    try:
        root = Path(os.path.realpath(path))
        is_dir = root.is_dir()
    except (OSError, ValueError) as exc:  # ValueError: NUL byte in the path
        raise UnsafeAdapterFileError(label, [f"`path` cannot be resolved: {exc}"]) from None
    if not is_dir:
        raise UnsafeAdapterFileError(label, [f"`path` is not a directory: {label[:200]!r}"])
    problems: list[str] = []
    warnings: list[str] = []
    try:
        _scan_directory(root, problems, warnings)
    except OSError as exc:
        raise UnsafeAdapterFileError(label, [f"directory cannot be listed: {exc.strerror}"]) from None
    config = _read_inside(root, CONFIG_NAME, max_config_bytes, problems)
    weights = _read_inside(root, WEIGHTS_NAME, max_file_bytes, problems)
    return _import(config, weights, profile, label, max_config_bytes, max_header_bytes, problems, warnings)


# -- export ------------------------------------------------------------------------------------------------------
def _export_problems(weights: LoraWeights) -> list[str]:
    """Internal consistency of weights without a profile: rank, alpha, 2-D float finite factors, names."""
    problems: list[str] = []
    r = weights.rank
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"`rank` must be a positive int, got {r!r}")
    a = weights.alpha
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or a <= 0:
        problems.append(f"`alpha` must be a positive finite number, got {a!r}")
    if not weights.factors:
        problems.append("no target modules (empty `factors`)")
    for module, (fa, fb) in weights.factors.items():
        reason = check_module_name(module)
        if reason is not None:
            problems.append(f"module name {module!r}: {reason}")
        if fa.dim() != 2 or fb.dim() != 2 or fa.shape[0] != r or fb.shape[1] != r:
            problems.append(f"module {module!r}: A {list(fa.shape)} / B {list(fb.shape)} are not [r, d_in] / [d_out, r] with r={r}")
        for label, t in (("A", fa), ("B", fb)):
            if not t.is_floating_point():
                problems.append(f"module {module!r}: {label} has dtype {t.dtype}, expected a float dtype")
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"module {module!r}: NaN or Inf in {label}")
    return problems


def peft_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """PEFT's saved keys: ``base_model.model.<module>.lora_A.weight`` -> ``A [r, d_in]``, B likewise."""
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in weights.factors.items():
        out[f"base_model.model.{module}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        out[f"base_model.model.{module}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    return out


def peft_config_dict(
    weights: LoraWeights,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    fan_in_fan_out: bool = False,
) -> dict[str, object]:
    """The ``adapter_config.json`` content for ``weights``: exact module names, one rank, one alpha."""
    alpha = float(weights.alpha)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(weights.rank),
        "lora_alpha": int(alpha) if alpha.is_integer() and abs(alpha) < 2**53 else alpha,
        "target_modules": list(weights.factors),  # full names: PEFT matches `key == target` exactly
        "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_destination(dest: Path, overwrite: bool) -> bool:
    """Whether ``dest`` exists (as a directory); refuses a file, a symlink or a non-empty directory."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise InvalidInputError(f"`path`={str(dest)!r} exists and is not a directory")
    if not dest.exists():
        return False
    if any(dest.iterdir()) and not overwrite:
        raise InvalidInputError(f"`path`={str(dest)!r} is a non-empty directory; pass overwrite=True to replace it")
    return True


def write_peft_dir(
    weights: LoraWeights,
    path: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    fan_in_fan_out: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``weights`` as a PEFT LoRA directory that ``PeftModel.from_pretrained(base, path)`` loads.

    Both files are written and fsync-ed in a temporary sibling directory which is then renamed to ``path``,
    so readers see the old directory or the complete new one. With ``overwrite=True`` a non-empty ``path``
    is first renamed aside and removed after the new one is in place.

    Args:
        weights: the adapter (any float dtype; saved as is, so the round trip is bit-exact).
        path: destination directory (must not exist, be empty, or ``overwrite=True``).
        base_model_name_or_path: recorded in the config for PEFT (e.g. ``"HuggingFaceTB/SmolLM2-135M"``).
        task_type: PEFT task type (``"CAUSAL_LM"``; ``None`` for a bare model).
        fan_in_fan_out: set for GPT-2 style ``Conv1D`` bases (PEFT also detects it itself).
        overwrite: replace a non-empty directory.

    Returns:
        The directory written.

    Raises:
        InvalidAdapterError: the weights are not a consistent finite LoRA adapter.
        InvalidInputError: ``path`` is a file or a non-empty directory without ``overwrite``.
        StorageError: the files could not be written (nothing is left at ``path`` in that case).
    """
    from safetensors.torch import save

    problems = _export_problems(weights)
    if problems:
        raise InvalidAdapterError("cannot export adapter: " + "; ".join(problems[:_MAX_LISTED]))
    dest = Path(path)
    existed = _check_destination(dest, overwrite)
    config = peft_config_dict(
        weights, base_model_name_or_path=base_model_name_or_path, task_type=task_type, fan_in_fan_out=fan_in_fan_out
    )
    payload = save(peft_state_dict(weights), metadata={"format": "pt"})
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        _fsync_write(tmp / WEIGHTS_NAME, payload)
        _fsync_write(tmp / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        _fsync_dir(tmp)
        if existed and any(dest.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.rename(dest, old / "adapter")
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)  # rename(2) replaces an empty directory atomically
        tmp = None
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise StorageError(f"cannot write PEFT directory {str(dest)!r}: {exc}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
