#!/usr/bin/env bash
# Build llama.cpp for the `llama-cpp-*` peers of `edgevl bench --peers` (benchmarks/peers.py).
#
# llama.cpp comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp in vendor/llama.cpp;
# no other source is reachable here), built with cmake Release, GGML_NATIVE=ON, static, for the
# three tools the peers run: llama-bench (decode speed at positions), llama-mtmd-cli (end to end
# with an image) and llama-quantize (F16 GGUF -> Q8_0 / Q4_0). ../../shared/MEASURED.md item 15.
#
# Everything lands in one folder of the bench cache (nothing in edgevl's venv):
#   BENCH_CACHE/peers/llama.cpp/<llama-cpp-python version>/
#     sdist/vendor/llama.cpp   llama.cpp (convert_hf_to_gguf.py and its gguf-py live here)
#     build/bin llama-bench, llama-mtmd-cli, llama-quantize
#     pylib/    sentencepiece (the converter imports it; edgevl's venv does not have it)
#     READY     what was built, from which commit, in how many seconds
# The converter runs with edgevl's own venv python (torch 2.13 + transformers 5, which reads a
# tokenizer saved by transformers 5; MEASURED.md 15) and PYTHONPATH=sdist/vendor/llama.cpp/gguf-py:pylib,
# so its gguf matches it exactly; the peer does that at first load, on a copy of the checkpoint.
#
# Idempotent: a second run finds READY and only prints it. 10-20 min of 2 cores the first time.
# Usage: bash benchmarks/peers_venv/make_llama_cpp.sh [--force] [--cache-dir BENCH_CACHE]
#   BENCH_CACHE: `edgevl bench --cache-dir` (default ${EDGEVL_CACHE:-~/.cache/edgevl}/bench)
set -euo pipefail
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"      # = LLAMA_CPP_VERSION in benchmarks/peers.py
source "$(dirname "${BASH_SOURCE[0]}")/peer_tool_args.sh"
dir="$bench_cache/peers/llama.cpp/$version"
jobs="${JOBS:-2}"

if [ "$force" = 1 ]; then rm -rf "$dir/build" "$dir/READY"; fi
if [ -f "$dir/READY" ]; then
    echo "llama.cpp already built: $dir"; cat "$dir/READY"; echo "(took 0 s; --force rebuilds)"; exit 0
fi
mkdir -p "$dir"
src="$dir/sdist/vendor/llama.cpp"

if [ ! -f "$src/CMakeLists.txt" ]; then
    # the whole sdist is kept: vendor/llama.cpp's .git points into it, and the build records the commit
    dl="$dir/dl"
    rm -rf "$dl" "$dir/sdist" && mkdir -p "$dl/x"
    nice -n 19 "$python" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$dl"
    tar -xzf "$dl/llama_cpp_python-$version.tar.gz" -C "$dl/x"
    mv "$dl/x/llama_cpp_python-$version" "$dir/sdist"
    rm -rf "$dl"
fi

nice -n 19 cmake -S "$src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF > "$dir/cmake-configure.log"
nice -n 19 cmake --build "$dir/build" --config Release -j "$jobs" \
    --target llama-bench llama-mtmd-cli llama-quantize > "$dir/cmake-build.log"

for tool in llama-bench llama-mtmd-cli llama-quantize; do
    [ -x "$dir/build/bin/$tool" ] || { echo "build did not produce $dir/build/bin/$tool (see $dir/cmake-build.log)" >&2; exit 1; }
done
# the converter's one import edgevl's venv lacks (its Llama vocabulary probe imports sentencepiece
# before it falls back to tokenizer.json), in a folder of its own, not in edgevl's venv
[ -d "$dir/pylib/sentencepiece" ] || nice -n 19 "$python" -m pip install -q --target "$dir/pylib" --no-deps sentencepiece
PYTHONPATH="$src/gguf-py:$dir/pylib" "$python" -c "import gguf, sentencepiece, torch, transformers, yaml" \
    || { echo "warning: $python cannot import the converter's needs (torch, transformers >= 5, pyyaml)" >&2; }

took=$(( $(date +%s) - start ))
commit="$(cd "$src" && git rev-parse HEAD 2>/dev/null || echo unknown)"
cat > "$dir/READY" <<EOF
{"llama_cpp_python": "$version", "llama_cpp_commit": "$commit", "build_s": $took, "jobs": $jobs, "cmake": "Release GGML_NATIVE=ON static", "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
EOF
echo "llama.cpp ready: $dir/build/bin (took $took s)"
