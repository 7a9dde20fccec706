#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-bench) into DIR from the
# llama-cpp-python source package on PyPI (it vendors llama.cpp), for benchmarks/gguf_vs_presets.py.
# About 10 minutes on 2 cores. Built for this processor's vector extensions, AMX left out (see install.sh).
#   benchmarks/build_llama_tools.sh DIR
set -euo pipefail
out="$(realpath -m "${1:?usage: $0 DIR}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download --no-deps --no-binary :all: -d "$work" "llama-cpp-python==0.3.36"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
cmake_args=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF)
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
            avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if [[ " $flags " == *" ${pair%%:*} "* ]]; then cmake_args+=("-DGGML_${pair##*:}=ON"); fi
done
cmake -S "$work"/llama_cpp_python-*/vendor/llama.cpp -B "$work/build" "${cmake_args[@]}"
cmake --build "$work/build" -j "$(nproc)" --target llama-quantize llama-imatrix llama-bench
mkdir -p "$out"
cp -a "$work"/build/bin/* "$out"/
echo "llama.cpp tools in $out"
