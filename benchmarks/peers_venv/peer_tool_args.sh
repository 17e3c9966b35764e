# Shared by make_llama_cpp.sh and make_ort_genai.sh (sourced): their flags, and where tools go.
#   [--force] [--cache-dir BENCH_CACHE]   BENCH_CACHE: `edgevl bench --cache-dir`
#   (default ${EDGEVL_CACHE:-~/.cache/edgevl}/bench). Sets bench_cache, force, here, python, start.
bench_cache="${EDGEVL_CACHE:-$HOME/.cache/edgevl}/bench"
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --cache-dir) bench_cache="$2"; shift ;;
        *) echo "usage: $0 [--force] [--cache-dir BENCH_CACHE]" >&2; exit 2 ;;
    esac
    shift
done
here="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
python="${PYTHON:-$here/../../.venv/bin/python}"
start=$(date +%s)
