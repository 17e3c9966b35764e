#!/usr/bin/env bash
# Install onnxruntime-genai for the `ort-genai-*` peers of `edgevl bench --peers` (benchmarks/peers.py).
#
# Not into benchmarks/.peers-venv: onnxruntime-genai's model builder imports transformers 5 classes
# (Qwen3_5ForConditionalGeneration, ...), and that venv pins transformers 4.57 for optimum-intel.
# Not into edgevl's .venv either: the package goes to a folder of its own in the bench cache,
#   BENCH_CACHE/peers/ort-genai/<version>/pylib
# and the peer's worker runs on edgevl's python with PYTHONPATH=pylib, which already has what the
# builder imports (torch 2.13, transformers 5, onnx, onnx-ir) and the onnxruntime (>= 1.31) it needs;
# --no-deps so nothing of edgevl's venv is shadowed.
#
# Idempotent: a second run finds READY and only prints it.
# Usage: bash benchmarks/peers_venv/make_ort_genai.sh [--force] [--cache-dir BENCH_CACHE]
#   BENCH_CACHE: `edgevl bench --cache-dir` (default ${EDGEVL_CACHE:-~/.cache/edgevl}/bench)
set -euo pipefail
version="${ORT_GENAI_VERSION:-0.18.0}"            # = ORT_GENAI_VERSION in benchmarks/peers.py
source "$(dirname "${BASH_SOURCE[0]}")/peer_tool_args.sh"
dir="$bench_cache/peers/ort-genai/$version"

if [ "$force" = 1 ]; then rm -rf "$dir"; fi
if [ -f "$dir/READY" ]; then
    echo "onnxruntime-genai already installed: $dir"; cat "$dir/READY"; echo "(took 0 s; --force reinstalls)"; exit 0
fi
rm -rf "$dir/pylib.tmp"
mkdir -p "$dir"
nice -n 19 "$python" -m pip install -q --target "$dir/pylib.tmp" --no-deps "onnxruntime-genai==$version"
rm -rf "$dir/pylib" && mv "$dir/pylib.tmp" "$dir/pylib"
PYTHONPATH="$dir/pylib" "$python" - <<'PY'
import importlib.metadata as m

import onnxruntime_genai as og
import onnx_ir, torch, transformers  # noqa: F401  (what the model builder imports)

print(f"onnxruntime-genai {og.__version__} beside onnxruntime {m.version('onnxruntime')}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
PY
took=$(( $(date +%s) - start ))
cat > "$dir/READY" <<EOF
{"onnxruntime_genai": "$version", "python": "$python", "install_s": $took, "installed": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
EOF
echo "onnxruntime-genai ready: $dir/pylib (took $took s)"
