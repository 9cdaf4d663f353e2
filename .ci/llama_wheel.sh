#!/usr/bin/env bash
# llama-cpp-python for the GGUF tests (tests/test_gguf.py), from a wheel cached in
# $HOME/.cache/microft-ci/wheels. It compiles llama.cpp from source (~16 min on 2 cores), so the wheel is
# built once, for the x86-64 AVX2 baseline every project machine has, and reused.
#   bash .ci/llama_wheel.sh PIP            install the cached wheel with PIP; build it first when missing (CI)
#   bash .ci/llama_wheel.sh PIP --cached   install the cached wheel if there is one, never build (make install)
set -euo pipefail
PIP=${1:?usage: llama_wheel.sh PIP [--cached]}
VERSION=0.3.36
CACHE="$HOME/.cache/microft-ci/wheels"
wheel() { ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | tail -n 1; }

if [ -z "$(wheel)" ]; then
    if [ "${2:-}" = "--cached" ]; then
        echo "llama-cpp-python: no cached wheel in $CACHE; the GGUF tests that run llama.cpp will skip" \
             "(bash .ci/llama_wheel.sh $PIP builds it, ~16 min)"
        exit 0
    fi
    mkdir -p "$CACHE"
    echo "llama-cpp-python: building the $VERSION wheel into $CACHE (once; ~16 min on 2 cores)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF" \
        "$PIP" wheel -q --no-deps "llama-cpp-python==$VERSION" -w "$CACHE" \
        || { echo "llama-cpp-python: the build failed; the GGUF tests that run llama.cpp will skip"; exit 0; }
fi
"$PIP" install -q --no-deps "$(wheel)"
"$PIP" install -q numpy diskcache jinja2 typing-extensions
