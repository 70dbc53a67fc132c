"""Test helpers of the server: a tiny Llama saved with the SmolLM2 tokenizer, libraries, a real uvicorn server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from smoa.adapter.profile import profile_from_model
from smoa.adapter.weights import LoraWeights

ROOT = Path(__file__).resolve().parents[2]
TOPICS = {
    "medicine": ("doctor", "patient symptoms and diagnosis of a disease"),
    "law": ("lawyer", "contracts, courts and legal advice"),
    "cooking": ("chef", "recipes, baking bread and kitchen tips"),
    "finance": ("banker", "stocks, loans and interest rates"),
    "sport": ("coach", "football matches and training plans"),
    "music": ("composer", "songs, chords and melodies"),
}


def smollm_tokenizer() -> Any:
    """The SmolLM2 tokenizer (from the converted default model; converted once if needed)."""
    from transformers import AutoTokenizer

    from smoa.models import default_model_dir, load_default_base_model

    d = default_model_dir()
    if not (d / "SMOA_COMPLETE").is_file():
        load_default_base_model()
    return AutoTokenizer.from_pretrained(d)


def save_tiny_model(target: Path, context: int = 512) -> Path:
    """A tiny random LlamaForCausalLM over the SmolLM2 vocabulary, saved with the tokenizer in ``target``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=context,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits: fewer near-ties, more varied text
        model.lm_head.weight.mul_(8.0)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval().to(dtype)
    return model, AutoTokenizer.from_pretrained(model_dir)


def random_lora(model: Any, seed: int, rank: int = 2, scale: float = 0.3, every: int = 1) -> LoraWeights:
    prof = profile_from_model(model)
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in prof.module_names[seed % every :: every]:
        d_in, d_out = prof.shape(m)
        factors[m] = (torch.randn(rank, d_in, generator=g) * scale, torch.randn(d_out, rank, generator=g) * scale)
    return LoraWeights(factors, float(2 * rank), rank)


def make_library(path: Path, model_dir: Path, n: int, encoder: str = "hash", **cfg: Any) -> list[tuple[str, LoraWeights]]:
    """A persistent library of ``n`` adapters (random non-zero factors, topic tags) on the tiny model."""
    from smoa import SMoAConfig, SparseAdapterMixture

    model, tok = load_model(model_dir)
    weights = [random_lora(model, seed=1000 + i) for i in range(n)]  # before attaching (plain module names)
    out = []
    topics = list(TOPICS.items())
    with SparseAdapterMixture(SMoAConfig(storage_path=path, encoder=encoder, **cfg), base_model=model,
                              tokenizer=tok) as smoa:  # fmt: skip
        for i in range(n):
            w = weights[i]
            topic, (skill, desc) = topics[i % len(topics)]
            ad = smoa.create_adapter_sync("domain", [topic], [skill], weights=w, description=f"{topic}: {desc}")
            out.append((ad.id, w))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadServer:
    """A real uvicorn server on 127.0.0.1 (free port) in a thread of the test process."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        from smoa.serve import build_app

        self.config = config
        self.app = build_app(config)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def serving(self) -> Any:
        return self.app.state.serving

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_healthy(self.url, timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            last = r.status_code
            if r.status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} not healthy after {timeout}s (last: {last})")


@contextlib.contextmanager
def process_server(args: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m smoa.cli serve ARGS --port P`` in a subprocess; killed at exit if still running."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "smoa.cli", "serve", *args, "--port", str(port),
                             "--log-level", "warning"], env=full_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
