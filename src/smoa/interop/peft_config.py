"""Parse an untrusted PEFT ``adapter_config.json`` into the few numbers smoa needs.

The config is data, never code: it is size-capped, parsed as strict JSON (no duplicate keys, no ``NaN``),
and read field by field against a table of the LoRA options PEFT writes. Each known key is either *used*
(``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``, ...), *ignored* because it only matters for
training or initialisation (``lora_dropout``, ``inference_mode``, ...), or *refused* when it changes the
forward pass in a way a plain ``x + s * B (A x)`` cannot express (DoRA, biases, ``modules_to_save``,
per-module ranks, base-model-modifying inits such as PiSSA/LoftQ ...). Unknown keys are dropped with a
warning; ``auto_map`` / ``auto_mapping`` and every other code reference are ignored with a warning and never
imported. Every problem is collected; the caller raises them all at once (vllm ``peft_helper.py`` style).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from smoa.adapter.safetensors_io import strict_json_loads

DEFAULT_MAX_CONFIG_BYTES = 64 * 1024
MAX_RANK = 4096
MAX_ALPHA = 1e6
MAX_TARGET_ENTRIES = 4096
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 1024
PEFT_DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha default, used when the key is absent

_MODULE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_CODE_KEYS = frozenset({"auto_map", "auto_mapping", "trust_remote_code", "custom_code", "code_revision"})
_CODE_HINT_RE = re.compile(r"(auto_?map|remote_code|custom_code|_class$|module_path|entry_point|import)", re.I)
# Keys that only affect training, initialisation or bookkeeping: dropped silently.
_IGNORED_KEYS = frozenset(
    {
        "peft_version", "revision", "inference_mode", "lora_dropout", "layers_to_transform", "layers_pattern",
        "exclude_modules", "runtime_config", "ensure_weight_tying", "qalora_group_size", "megatron_core",
        "eva_config", "corda_config", "lora_ga_config", "loftq_config", "velora_config", "astra_config",
    }
)  # fmt: skip
# Keys that change the forward pass: refused when set (truthy).
_REFUSED_WHEN_SET = {
    "use_dora": "DoRA (weight-decomposed LoRA) needs a magnitude vector",
    "modules_to_save": "fully trained modules are not LoRA factors",
    "lora_bias": "LoRA B biases are not supported",
    "layer_replication": "it changes the base model's layer structure",
    "megatron_config": "Megatron parallel layers are not supported",
    "trainable_token_indices": "trained embedding rows are not LoRA factors",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not supported",
    "use_qalora": "QA-LoRA pools the layer input before A",
    "alora_invocation_tokens": "activated LoRA applies only after invocation tokens",
    "arrow_config": "Arrow routing is a different forward pass",
    "kasa_config": "KaSA modifies the base weights and adds a diagonal",
    "monteclora_config": "MonteCLoRA samples the factors",
    "use_bdlora": "block-diagonal LoRA factors are not supported",
}
_USED_KEYS = frozenset(
    {
        "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "bias", "fan_in_fan_out",
        "rank_pattern", "alpha_pattern", "init_lora_weights", "base_model_name_or_path",
    }
)  # fmt: skip
# "mica" (B from the base weight's minor singular vectors, A zero, B frozen) and "nora" (A's columns unit norm)
# change only the initial factors: the forward is plain LoRA (PEFT 0.22's MiCALinearVariant adds B(A(x)) * scaling)
_SAFE_INITS = (True, False, "gaussian", "orthogonal", "default", "mica", "nora")
_BASE_MODIFYING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga", "eva", "astra")  # prefixes; astra: W - BA


@dataclass
class PeftLoraSettings:
    """What smoa takes from a checked ``adapter_config.json``.

    Attributes:
        rank: ``r``.
        alpha: effective alpha for ``scaling = alpha / rank`` (``lora_alpha * sqrt(r)`` under rsLoRA).
        lora_alpha: ``lora_alpha`` as written.
        use_rslora: whether the config asked for rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        target_modules: the config's list of names/suffixes, or ``[regex]`` when it is one regex string.
        target_is_regex: whether ``target_modules`` was one regex string (never evaluated by smoa).
        fan_in_fan_out: PEFT's base-weight layout flag (does not change the factors' layout).
        base_model_name_or_path: as written (informational; never used as a path).
        task_type: as written, or ``None``.
        warnings: non-fatal findings (dropped keys, ignored code references ...).
    """

    rank: int
    alpha: float
    lora_alpha: float
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    target_is_regex: bool = False
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    warnings: list[str] = field(default_factory=list)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_float(v: Any) -> float | None:
    """A JSON number as a finite float, or ``None`` (bools, strings, huge ints, inf all give ``None``)."""
    if not _is_number(v):
        return None
    try:
        f = float(v)  # an int with 400 digits raises OverflowError
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _short(v: Any, n: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_text(key: str, v: Any, problems: list[str], limit: int = MAX_TEXT_CHARS) -> str | None:
    """An optional, printable, size-capped string (``None`` allowed)."""
    if v is None:
        return None
    if not isinstance(v, str):
        problems.append(f"`{key}` must be a string or null, got {type(v).__name__}")
        return None
    if len(v) > limit:
        problems.append(f"`{key}` is {len(v)} characters long (at most {limit})")
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        problems.append(f"`{key}`={_short(v)} contains control characters")
        return None
    return v


def check_module_name(item: Any) -> str | None:
    """Why one ``target_modules`` list entry is refused, or ``None`` when it is a plain module name."""
    if not isinstance(item, str):
        return f"entry {_short(item)} is not a string"
    if not item or len(item) > MAX_NAME_CHARS:
        return f"entry of length {len(item)} (1..{MAX_NAME_CHARS} characters)"
    if ".." in item or "/" in item or "\\" in item or not _MODULE_NAME_RE.match(item):
        return f"entry {_short(item)} is not a module name (path separators, '..' or odd characters)"
    return None


def _parse_target_modules(v: Any, problems: list[str]) -> tuple[list[str], bool]:
    if v is None:
        problems.append("`target_modules` is missing or null")
        return [], False
    if isinstance(v, str):  # one regex, as PEFT; kept as text, never compiled (no ReDoS)
        if len(v) > MAX_NAME_CHARS or "\x00" in v or "../" in v or "..\\" in v:
            problems.append(f"`target_modules`={_short(v)} is not an acceptable regex (length, NUL or path traversal)")
            return [], True
        return [v], True
    if not isinstance(v, list):
        problems.append(f"`target_modules` must be a list of names or one regex string, got {type(v).__name__}")
        return [], False
    if len(v) > MAX_TARGET_ENTRIES:
        problems.append(f"`target_modules` has {len(v)} entries (at most {MAX_TARGET_ENTRIES})")
        return [], False
    bad = [reason for reason in map(check_module_name, v) if reason is not None]
    for reason in bad[:5]:
        problems.append(f"`target_modules`: {reason}")
    if len(bad) > 5:
        problems.append(f"`target_modules`: ... and {len(bad) - 5} more bad entries")
    return ([str(x) for x in v] if not bad else []), False


def _parse_rank(cfg: dict[str, Any], problems: list[str]) -> int | None:
    r = cfg.get("r")
    if "r" not in cfg:
        problems.append("`r` (the LoRA rank) is missing")
    elif not _is_int(r) or not 1 <= r <= MAX_RANK:
        problems.append(f"`r` must be an integer in 1..{MAX_RANK}, got {_short(r)}")
    else:
        return int(r)
    return None


def _parse_alpha(cfg: dict[str, Any], problems: list[str], warnings: list[str]) -> float | None:
    if "lora_alpha" not in cfg:
        warnings.append(f"`lora_alpha` is missing: PEFT's default {PEFT_DEFAULT_ALPHA} is used")
        return float(PEFT_DEFAULT_ALPHA)
    a = _as_float(cfg["lora_alpha"])
    if a is None or not 0 < a <= MAX_ALPHA:
        problems.append(f"`lora_alpha` must be a finite number in (0, {MAX_ALPHA:g}], got {_short(cfg['lora_alpha'])}")
        return None
    return a


def _check_flag(cfg: dict[str, Any], key: str, problems: list[str]) -> bool:
    v = cfg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        problems.append(f"`{key}` must be true or false, got {_short(v)}")
        return False
    return v


def _check_patterns(cfg: dict[str, Any], key: str, expected: float | None, problems: list[str]) -> None:
    """``rank_pattern`` / ``alpha_pattern``: accepted only when empty or equal to the global value."""
    v = cfg.get(key)
    if v is None or v == {}:
        return
    if not isinstance(v, dict):
        problems.append(f"`{key}` must be an object, got {type(v).__name__}")
        return
    values = list(v.values())
    if expected is None or not all(_as_float(x) == expected for x in values):
        problems.append(
            f"`{key}` sets per-module values {_short(dict(list(v.items())[:3]))}: smoa adapters have one rank "
            "and one alpha for every module (re-save the adapter without per-module patterns)"
        )


def _check_init(cfg: dict[str, Any], problems: list[str], warnings: list[str]) -> None:
    v = cfg.get("init_lora_weights", True)
    if any(v is s or (isinstance(v, str) and v == s) for s in _SAFE_INITS):
        return
    if isinstance(v, str) and v.lower().startswith(_BASE_MODIFYING_INITS):
        problems.append(
            f"`init_lora_weights`={_short(v)} modifies the base model's weights at initialisation: the saved "
            "factors only make sense with that modified base (convert the adapter to plain LoRA first)"
        )
        return
    warnings.append(f"`init_lora_weights`={_short(v)} is unknown; it affects initialisation only and is ignored")


def _check_refused_and_unknown(cfg: dict[str, Any], problems: list[str], warnings: list[str]) -> None:
    unknown: list[str] = []
    for key, v in cfg.items():
        if key in _USED_KEYS or key in _IGNORED_KEYS:
            continue
        if key in _REFUSED_WHEN_SET:
            if v not in (None, False, [], {}, ""):
                problems.append(f"`{key}`={_short(v, 40)} is not supported: {_REFUSED_WHEN_SET[key]}")
        elif key in _CODE_KEYS or _CODE_HINT_RE.search(key):
            if v not in (None, {}, [], ""):
                warnings.append(f"code reference `{key[:60]}` ignored (never imported or executed)")
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(f"`{k[:40]}`" for k in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        warnings.append(f"unknown config key(s) dropped: {shown}{more}")


def parse_peft_config(raw: bytes, *, max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> tuple[PeftLoraSettings | None, list[str]]:
    """Validate the bytes of an ``adapter_config.json``.

    Args:
        raw: the file's bytes (the caller reads at most ``max_config_bytes + 1``).
        max_config_bytes: refuse a larger config.

    Returns:
        ``(settings, [])`` when usable, else ``(None, problems)`` listing every problem found.
    """
    if len(raw) > max_config_bytes:
        return None, [f"adapter_config.json is larger than the cap of {max_config_bytes} bytes"]
    cfg, problem = strict_json_loads(raw)
    if problem is not None:
        return None, [f"adapter_config.json {problem}"]
    if not isinstance(cfg, dict):
        return None, [f"adapter_config.json must hold a JSON object, got {type(cfg).__name__}"]
    problems: list[str] = []
    warnings: list[str] = []
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"`peft_type` must be 'LORA', got {_short(peft_type)}")
    rank = _parse_rank(cfg, problems)
    lora_alpha = _parse_alpha(cfg, problems, warnings)
    use_rslora = _check_flag(cfg, "use_rslora", problems)
    fan_in_fan_out = _check_flag(cfg, "fan_in_fan_out", problems)
    targets, is_regex = _parse_target_modules(cfg.get("target_modules"), problems)
    bias = cfg.get("bias", "none")
    if bias != "none":
        problems.append(f"`bias`={_short(bias)} is not supported: only 'none' (biases are not LoRA factors)")
    _check_patterns(cfg, "rank_pattern", None if rank is None else float(rank), problems)
    _check_patterns(cfg, "alpha_pattern", lora_alpha, problems)
    _check_init(cfg, problems, warnings)
    _check_refused_and_unknown(cfg, problems, warnings)
    base = _check_text("base_model_name_or_path", cfg.get("base_model_name_or_path"), problems)
    task = _check_text("task_type", cfg.get("task_type"), problems, limit=64)
    if problems or rank is None or lora_alpha is None:
        return None, problems
    alpha = lora_alpha * math.sqrt(rank) if use_rslora else lora_alpha
    if use_rslora:
        warnings.append(f"rsLoRA scaling `lora_alpha`/sqrt(r) stored as alpha={alpha!r} (scaling alpha/r unchanged)")
    settings = PeftLoraSettings(
        rank=rank,
        alpha=alpha,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        target_modules=targets,
        target_is_regex=is_regex,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base,
        task_type=task,
        warnings=warnings,
    )
    return settings, []


def matches_target(module: str, settings: PeftLoraSettings) -> bool:
    """PEFT's list rule: ``module == t`` or ``module.endswith("." + t)``; a regex is never evaluated (True)."""
    if settings.target_is_regex:
        return True
    return any(module == t or module.endswith("." + t) for t in settings.target_modules)
