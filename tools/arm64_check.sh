#!/usr/bin/env bash
# ARM64 under emulation: does the on-device runtime give the x86 answers on aarch64?
#
#   tools/arm64_check.sh [--scenes N] [--profiles a57,a76] [--fp32-bundle DIR] [--int8-bundle DIR]
#                        [--results DIR] [--work DIR] [--backends onnxruntime,openvino] [--threads N]
#                        [--emu-threads N]
# Cost (measured on a shared 2-core Xeon): ~11 CPU s per scene per profile emulated (all four
# bundle/backend runs), a rootfs from scratch ~6 CPU min (debootstrap), venv ~1 min.
#
# 1. x86 (natively): export edgevl-tiny to an FP32 bundle (and INT8 where the tree can build one),
#    run tools/arm64_check.py `reference`: scene images, questions, answers, preprocessed pixels.
# 2. A cached arm64 Debian rootfs (debootstrap + qemu-user-static through binfmt_misc) with a venv
#    holding only the runtime's dependencies, pinned to the x86 venv's versions (wheels fetched
#    from PyPI for aarch64), and edgevl installed from this tree as a wheel with --no-deps.
# 3. For each emulated CPU profile, the same script's `check` inside the rootfs: preprocessing
#    parity and the same questions on the same bundles, compared with the x86 answers.
# 4. `report`: benchmarks/results/arm64/report.json and summary.md.
#
# Exit status: 0 all checks passed; 1 a correctness check failed (answers or pixels differ, a
# crash inside the emulated run); 77 skipped because this machine cannot emulate aarch64 (not
# root, no binfmt_misc, qemu-user-static not installable, no route to the Debian mirror or
# PyPI): then the last line printed starts with "arm64: SKIPPED".
#
# Environment: EDGEVL_ARM64_CACHE (rootfs + wheel cache, default ~/.cache/edgevl-arm64),
# EDGEVL_ARM64_MIRROR (Debian mirror), EDGEVL_PYTHON (the x86 venv's python, default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

SCENES=50
PROFILES="a57,a76"
INT8_BUNDLE=""
FP32_BUNDLE=""
RESULTS="$REPO/benchmarks/results/arm64"
WORK="$REPO/out/arm64"
BACKENDS="onnxruntime,openvino"
THREADS=$(nproc)
EMU_THREADS=1   # under qemu, ORT's spinning worker threads cost emulated CPU: 1 thread used 30-60% less CPU
while [ $# -gt 0 ]; do
    case "$1" in
        --scenes) SCENES=$2; shift 2 ;;
        --profiles) PROFILES=$2; shift 2 ;;
        --int8-bundle) INT8_BUNDLE=$(realpath "$2"); shift 2 ;;
        --fp32-bundle) FP32_BUNDLE=$(realpath "$2"); shift 2 ;;
        --results) RESULTS=$(realpath -m "$2"); shift 2 ;;
        --work) WORK=$(realpath -m "$2"); shift 2 ;;
        --backends) BACKENDS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --emu-threads) EMU_THREADS=$2; shift 2 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "arm64_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

CACHE=${EDGEVL_ARM64_CACHE:-$HOME/.cache/edgevl-arm64}
MIRROR=${EDGEVL_ARM64_MIRROR:-http://deb.debian.org/debian}
PY=${EDGEVL_PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm                       # Python 3.11, glibc 2.36 (OpenVINO's aarch64 wheel needs 2.35)
DEBS="python3,python3-venv"
RUNTIME_PACKAGES="numpy onnxruntime tokenizers pillow opencv-python-headless openvino"
ROOTFS_FORMAT=1                      # bump when the way the rootfs is built changes
NICE="nice -n 19"
T0=$(date +%s)

skip() { echo "arm64: SKIPPED: $*"; exit 77; }
say() { echo "arm64: $*"; }
elapsed() { echo $(( $(date +%s) - $1 )); }
cpu_s_file() {  # CPU seconds of all finished children so far (steadier than wall time when shared)
    times >"$1.raw"   # not in $(...): a subshell's `times` knows nothing of our children
    tail -1 "$1.raw" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); s += a[1] * 60 + a[2] }; printf "%.0f", s }' >"$1"
}

# -- 1. can this machine emulate aarch64? ----------------------------------------------------
preflight() {
    [ "$(uname -m)" = x86_64 ] || skip "host is $(uname -m), not x86_64; on an aarch64 box run tools/arm64_check.py natively"
    [ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot, binfmt_misc); run as root or in a root container"
    [ -x "$PY" ] || skip "no x86 venv at $PY; run 'make setup' first (or set EDGEVL_PYTHON)"
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
            || skip "binfmt_misc is not mounted and cannot be mounted (unprivileged container?)"
    fi
    if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
        say "installing qemu-user-static, binfmt-support, debootstrap with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        { $NICE apt-get install -y -q qemu-user-static binfmt-support debootstrap >/dev/null 2>&1 \
          || { $NICE apt-get update -q >/dev/null 2>&1 \
               && $NICE apt-get install -y -q qemu-user-static binfmt-support debootstrap >/dev/null 2>&1; }; } \
            || skip "apt-get could not install qemu-user-static binfmt-support debootstrap (no route to the Debian mirror?)"
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
        || skip "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64 failed)"
    QEMU_VERSION=$(qemu-aarch64-static --version | sed -n 1p)
    QEMU_CPUS=$(qemu-aarch64-static -cpu help || true)  # it exits 1 after listing; not piped (pipefail)
    grep -qw cortex-a57 <<<"$QEMU_CPUS" || skip "$QEMU_VERSION has no cortex-a57 model"
}

# -- 2. x86 side: bundles and the reference run ------------------------------------------------
x86_reference() {
    local t=$(date +%s) edgevl_cli="$(dirname "$PY")/edgevl"
    mkdir -p "$WORK/bundles"
    if [ -n "$FP32_BUNDLE" ]; then
        rm -rf "$WORK/bundles/fp32"; cp -r "$FP32_BUNDLE" "$WORK/bundles/fp32"
    else
        say "exporting edgevl-tiny FP32 on x86"
        $NICE "$edgevl_cli" export --model edgevl-tiny --out "$WORK/bundles/fp32" --force >"$WORK/export-fp32.log" 2>&1 \
            || { tail -20 "$WORK/export-fp32.log"; echo "arm64: FAILED: edgevl export (FP32) failed on x86"; exit 1; }
    fi
    BUNDLE_ARGS=(--bundle "fp32=$WORK/bundles/fp32")
    local commands; commands=$("$edgevl_cli" --help 2>/dev/null || true)
    if [ -z "$INT8_BUNDLE" ] && grep -qE '^ +build ' <<<"$commands"; then
        # Parity, not accuracy, is checked here: --accept-loss, and a small budget evaluation.
        say "building edgevl-tiny INT8 on x86 (edgevl build --target onnxruntime --precision int8)"
        if $NICE "$edgevl_cli" build --model edgevl-tiny --target onnxruntime --precision int8 --accept-loss \
                --eval-scenes 20 --out "$WORK/bundles/int8" --force >"$WORK/build-int8.log" 2>&1; then
            INT8_BUNDLE="$WORK/bundles/int8"
        else
            tail -20 "$WORK/build-int8.log"; echo "arm64: FAILED: edgevl build --precision int8 failed on x86"; exit 1
        fi
    fi
    if [ -n "$INT8_BUNDLE" ]; then
        BUNDLE_ARGS+=(--bundle "int8=$INT8_BUNDLE")
    else
        say "INT8: not checked: this tree has no 'edgevl build' command; pass --int8-bundle DIR"
    fi
    # Bundles given from outside are copied under WORK so the rootfs sees them at one mount.
    if [ -n "$INT8_BUNDLE" ] && [ "$INT8_BUNDLE" != "$WORK/bundles/int8" ]; then
        rm -rf "$WORK/bundles/int8"; cp -r "$INT8_BUNDLE" "$WORK/bundles/int8"
        BUNDLE_ARGS=(--bundle "fp32=$WORK/bundles/fp32" --bundle "int8=$WORK/bundles/int8")
    fi
    say "x86 reference run ($SCENES scenes)"
    $NICE "$PY" tools/arm64_check.py reference "${BUNDLE_ARGS[@]}" --scenes "$SCENES" --backends "$BACKENDS" \
        --threads "$THREADS" --out "$WORK/x86" || { echo "arm64: FAILED: the x86 reference run failed"; exit 1; }
    X86_S=$(elapsed $t)
}

# -- 3. the arm64 rootfs (cached) ---------------------------------------------------------------
requirements() {  # the x86 venv's versions of the runtime packages, so both sides run the same code
    "$PY" - $RUNTIME_PACKAGES <<'EOF'
import sys, importlib.metadata as md
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
}

fetch_wheels() {  # aarch64 wheels, downloaded by the host's pip (fast) into a cache keyed on the list
    local req key
    req=$(requirements)
    key=$(printf '%s\n' "$req" | sha256sum | cut -c1-12)
    WHEELS="$CACHE/wheels-$key"
    if [ -e "$WHEELS/.complete" ]; then return; fi
    rm -rf "$WHEELS.tmp"; mkdir -p "$WHEELS.tmp"
    printf '%s\n' "$req" >"$WHEELS.tmp/requirements.txt"
    say "downloading aarch64 wheels: $(echo $req)"
    # --isolated: ignore this machine's pip config (local x86-only indexes); PyPI only.
    if ! $NICE "$PY" -m pip download --isolated -q "${PLATFORM_ARGS[@]}" -d "$WHEELS.tmp" -r "$WHEELS.tmp/requirements.txt" >"$CACHE/pip-download.log" 2>&1; then
        tail -5 "$CACHE/pip-download.log"
        skip "pip could not download the aarch64 wheels (no route to PyPI, or a version without an aarch64 wheel; log: $CACHE/pip-download.log)"
    fi
    touch "$WHEELS.tmp/.complete"; mv "$WHEELS.tmp" "$WHEELS"
}

mounted_under() { local m; m=$(findmnt -rn -o TARGET); grep -q "^$1" <<<"$m"; }

safe_rm() {  # never delete through a mount point (a bind-mounted /proc or /dev would be followed)
    if mounted_under "$1"; then echo "arm64: FAILED: refusing to delete $1: something is mounted under it"; exit 1; fi
    rm -rf --one-file-system "$1"
}

build_rootfs() {
    local key
    key=$(printf '%s|%s|%s|%s' "$SUITE" "$DEBS" "$ROOTFS_FORMAT" arm64 | sha256sum | cut -c1-12)
    ROOTFS="$CACHE/rootfs-$key"
    ROOTFS_CACHED=1
    if [ -e "$ROOTFS/.edgevl-complete" ]; then return; fi
    ROOTFS_CACHED=0
    local t=$(date +%s)
    for old in "$CACHE"/rootfs-*; do [ -d "$old" ] && [ "$old" != "$ROOTFS" ] && safe_rm "$old"; done
    safe_rm "$ROOTFS.tmp"
    say "debootstrap $SUITE arm64 (minbase + $DEBS) into $ROOTFS (several minutes)"
    if ! $NICE debootstrap --arch=arm64 --variant=minbase --include="$DEBS" "$SUITE" "$ROOTFS.tmp" "$MIRROR" \
            >"$CACHE/debootstrap.log" 2>&1; then
        tail -5 "$CACHE/debootstrap.log"
        safe_rm "$ROOTFS.tmp"
        skip "debootstrap of $SUITE arm64 failed (no route to $MIRROR? log: $CACHE/debootstrap.log)"
    fi
    rm -rf "$ROOTFS.tmp"/var/cache/apt/archives/*.deb
    touch "$ROOTFS.tmp/.edgevl-complete"; mv "$ROOTFS.tmp" "$ROOTFS"
    say "rootfs built in $(elapsed $t) s ($(du -sh "$ROOTFS" | cut -f1))"
}

# Run a command inside the rootfs, in a private mount namespace (its mounts vanish with it):
# /proc, an ARM-format /proc/cpuinfo (qemu passes the host's x86 one through, and ONNX Runtime's
# cpuinfo crashes on it), /sys, and WORK at /edgevl. QEMU_CPU picks the emulated CPU model.
in_rootfs() {  # in_rootfs QEMU_CPU CPUINFO_FILE cmd...
    local cpu=$1 cpuinfo=$2; shift 2
    mkdir -p "$ROOTFS/edgevl" "$ROOTFS/wheels"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$cpu" \
        nice -n 19 unshare --mount --propagation private -- bash -c '
            set -e; R=$1; W=$2; WH=$3; CI=$4; shift 4
            mount -t proc proc "$R/proc"
            [ -n "$CI" ] && mount --bind "$CI" "$R/proc/cpuinfo"
            mount -t sysfs -o ro sysfs "$R/sys"
            mount --bind /dev "$R/dev"
            mount --bind "$W" "$R/edgevl"
            mount --bind -o ro "$WH" "$R/wheels"
            exec chroot "$R" "$@"' _ "$ROOTFS" "$WORK" "$WHEELS" "$cpuinfo" "$@"
}

# pip for a foreign platform: the host's pip installs aarch64 wheels (cp311, manylinux up to glibc
# 2.36) into the rootfs venv. pip itself under emulation took 20 minutes on a loaded 2-core box.
PLATFORM_ARGS=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
               --platform manylinux2014_aarch64)
for i in $(seq 17 36); do PLATFORM_ARGS+=(--platform "manylinux_2_${i}_aarch64"); done

build_venv() {  # the runtime dependencies only, from the wheel cache
    local key; key=$(basename "$WHEELS")
    SITE="$ROOTFS/opt/edgevl-venv/lib/python3.11/site-packages"
    if [ "$(cat "$ROOTFS/opt/edgevl-venv/.wheels" 2>/dev/null)" = "$key" ]; then VENV_CACHED=1; return; fi
    VENV_CACHED=0
    local t=$(date +%s)
    rm -rf "$ROOTFS/opt/edgevl-venv"
    say "creating the arm64 venv and installing $(basename "$WHEELS") into it"
    in_rootfs cortex-a57 "" /usr/bin/python3 -m venv --without-pip /opt/edgevl-venv
    $NICE "$PY" -m pip install --isolated -q --no-index --find-links "$WHEELS" "${PLATFORM_ARGS[@]}" \
        --target "$SITE" -r "$WHEELS/requirements.txt" >"$CACHE/pip-install.log" 2>&1 \
        || { tail -20 "$CACHE/pip-install.log"; echo "arm64: FAILED: installing the aarch64 wheels into the venv"; exit 1; }
    echo "$key" >"$ROOTFS/opt/edgevl-venv/.wheels"
    say "venv built in $(elapsed $t) s"
}

install_edgevl() {  # a wheel built from this working tree (tracked + untracked, not ignored), no extras
    local t=$(date +%s)
    safe_rm "$WORK/src"; mkdir -p "$WORK/src" "$WORK/dist"; rm -f "$WORK/dist"/*.whl
    git ls-files -z -co --exclude-standard | rsync -a --from0 --files-from=- ./ "$WORK/src/" 2>/dev/null \
        || git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$WORK/src/"
    $NICE "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" >"$WORK/wheel.log" 2>&1 \
        || { tail -20 "$WORK/wheel.log"; echo "arm64: FAILED: could not build the edgevl wheel"; exit 1; }
    rm -rf "$SITE"/edgevl "$SITE"/edgevl-*.dist-info
    $NICE "$PY" -m pip install --isolated -q --no-deps --no-index "${PLATFORM_ARGS[@]}" --target "$SITE" \
        "$WORK"/dist/edgevl-*.whl >"$WORK/install.log" 2>&1 \
        || { tail -20 "$WORK/install.log"; echo "arm64: FAILED: could not install the edgevl wheel"; exit 1; }
    in_rootfs cortex-a57 "" /opt/edgevl-venv/bin/python -c "import edgevl, edgevl.runtimes.engine, edgevl.api"
    say "edgevl installed (no deps, no extras) in $(elapsed $t) s"
}

# /proc/cpuinfo in the format an arm64 kernel writes, for one CPU profile: the MIDR fields of the
# real core, and the feature list qemu actually exposes for that model (read from AT_HWCAP).
cpuinfo_file() {
    local profile=$1 cpu part variant revision features
    case "$profile" in
        a57) cpu=cortex-a57; part=0xd07; variant=0x1; revision=1 ;;
        a76) cpu=$A76_CPU; part=0xd0b; variant=0x4; revision=1 ;;
        *) echo "arm64_check.sh: unknown profile $profile (a57, a76)" >&2; exit 2 ;;
    esac
    CPUINFO="$CACHE/cpuinfo-$profile"
    QEMU_CPU_NAME=$cpu
    features=$(in_rootfs "$cpu" "" /usr/bin/python3 /edgevl/src/tools/arm64_check.py hwcaps)
    for i in $(seq 0 $(( THREADS - 1 ))); do
        printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
        printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$variant" "$part" "$revision"
    done >"$CPUINFO"
}

# -- 4. the emulated runs -----------------------------------------------------------------------
run_profile() {  # run_profile PROFILE QEMU_CPU CPUINFO_FILE: one emulated check, its time and exit code
    local profile=$1 cpu=$2 cpuinfo=$3 tp=$(date +%s) rc=0
    rm -f "$WORK/arm64-$profile.run.json"
    in_rootfs "$cpu" "$cpuinfo" /opt/edgevl-venv/bin/python /edgevl/src/tools/arm64_check.py \
        check --reference /edgevl/x86 --out "/edgevl/arm64-$profile" --profile "$profile" \
        --qemu-cpu "$cpu" --threads "$EMU_THREADS" || rc=$?
    echo "{\"wall_s\": $(elapsed $tp), \"exit_code\": $rc}" >"$WORK/arm64-$profile.run.json"
}

main() {
    preflight
    mkdir -p "$CACHE" "$WORK"
    exec 9>"$CACHE/lock"
    flock -n 9 || { say "waiting for another arm64 check to release $CACHE/lock"; flock 9; }
    A76_CPU=cortex-a76
    grep -qw cortex-a76 <<<"$QEMU_CPUS" || A76_CPU=neoverse-n1
    grep -qw "$A76_CPU" <<<"$QEMU_CPUS" || A76_CPU=max
    # Everything that needs the network first, so an infrastructure skip comes before any work.
    local t=$(date +%s)
    fetch_wheels
    build_rootfs
    # The hwcap probe runs from WORK/src, so the tree is copied before the first in_rootfs.
    safe_rm "$WORK/src"; mkdir -p "$WORK/src/tools"; cp tools/arm64_check.py "$WORK/src/tools/"
    build_venv
    install_edgevl
    SETUP_S=$(elapsed $t)
    x86_reference
    local status=0 reports=() profiles=(${PROFILES//,/ }) pids=()
    # Each emulated run is single-threaded (EMU_THREADS), so with enough cores the profiles run
    # side by side, each logging to its own file (printed when it ends).
    local parallel=0
    [ "${#profiles[@]}" -gt 1 ] && [ $(( ${#profiles[@]} * EMU_THREADS )) -le "$(nproc)" ] && parallel=1
    for profile in "${profiles[@]}"; do
        cpuinfo_file "$profile"
        say "emulated run: profile $profile (QEMU_CPU=$QEMU_CPU_NAME), $SCENES scenes$([ $parallel = 1 ] && echo ', in parallel with the other profiles')"
        if [ $parallel = 1 ]; then
            run_profile "$profile" "$QEMU_CPU_NAME" "$CPUINFO" >"$WORK/arm64-$profile.log" 2>&1 &
            pids+=($!)
        else
            run_profile "$profile" "$QEMU_CPU_NAME" "$CPUINFO"
        fi
        reports+=(--arm "$WORK/arm64-$profile")
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done
    for profile in "${profiles[@]}"; do
        [ $parallel = 1 ] && { echo "arm64: --- output of profile $profile ---"; cat "$WORK/arm64-$profile.log"; }
        local rc; rc=$(sed -n 's/.*"exit_code": \([0-9]*\).*/\1/p' "$WORK/arm64-$profile.run.json" 2>/dev/null)
        [ "${rc:-1}" = 0 ] || { say "profile $profile: check failed (exit ${rc:-unknown})"; status=1; }
    done
    cpu_s_file "$WORK/cpu_s"
    "$PY" tools/arm64_check.py report --x86 "$WORK/x86" "${reports[@]}" --out "$RESULTS" \
        --meta "qemu=$QEMU_VERSION" --meta "suite=debian-$SUITE" --meta "rootfs_cached=$ROOTFS_CACHED" \
        --meta "venv_cached=$VENV_CACHED" --meta "setup_s=$SETUP_S" --meta "x86_s=$X86_S" \
        --meta "total_s=$(elapsed $T0)" --meta "total_cpu_s=$(cat "$WORK/cpu_s")" || status=1
    if [ $status = 0 ]; then say "PASSED in $(elapsed $T0) s (report: $RESULTS/summary.md)"
    else echo "arm64: FAILED after $(elapsed $T0) s (report: $RESULTS/summary.md)"; fi
    exit $status
}

main
