#!/usr/bin/env bash
# Create benchmarks/.peers-venv: the peer tools edgevl is compared with, in a venv of their own.
#
# optimum-intel and openvino-genai pin transformers <= 4.57 and pull torchvision, which breaks
# transformers' vision models beside torch 2.13 here (../../shared/MEASURED.md items 10, 11, 14),
# so they must never be installed into edgevl's own .venv. `edgevl bench --peers ...` runs
# benchmarks/peers_venv/peer_worker.py with this venv's python, as a worker process of its own.
#
# The llama-cpp-* and ort-genai-* peers do not use this venv (their converters need transformers 5):
# bash benchmarks/peers_venv/make_llama_cpp.sh, bash benchmarks/peers_venv/make_ort_genai.sh
#
# Usage: bash benchmarks/peers_venv/make_venv.sh [PYTHON]      (re-running it upgrades in place)
set -euo pipefail
start=$(date +%s)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/../.peers-venv"
python="${1:-python3}"
pip_() { nice -n 19 "$venv/bin/python" -m pip "$@"; }

[ -x "$venv/bin/python" ] || nice -n 19 "$python" -m venv "$venv"
pip_ install -q --upgrade pip
# CPU torch first (the wheel edgevl pins; a plain `torch` requirement would pull a CUDA build)
pip_ install -q "torch==2.13.0"
pip_ install -q "optimum-intel[openvino]" openvino-genai openvino-tokenizers "optimum-onnx[onnxruntime]" \
    pillow psutil "torch==2.13.0"
# optimum-intel declares torchvision, but PyPI's torchvision does not import beside torch 2.13
# and then breaks transformers' VLM classes (MEASURED.md 11, 14): images go through Pillow.
pip_ uninstall -y -q torchvision || true
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
for name in ("transformers", "optimum", "optimum-intel", "optimum-onnx", "openvino", "openvino-genai", "onnxruntime", "torch"):
    try:
        print(f"{name:16s} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name:16s} (not installed)")
PY
echo "peers venv ready: $venv (took $(( $(date +%s) - start )) s)"
