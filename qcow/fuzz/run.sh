#!/usr/bin/env bash
# Fuzz qcow's open / read / map / check / write paths on hostile images.
#
#   qcow/fuzz/run.sh [SECONDS]        (default 60; `make fuzz` calls this)
#
# Engine: libFuzzer (coverage-guided, AddressSanitizer) when it builds on this toolchain — stable
# rustc with RUSTC_BOOTSTRAP=1 for -Zsanitizer, no cargo-fuzz needed — otherwise the stable
# mutation fuzzer `qcow_fuzz`. QCOW_FUZZ_ENGINE=stable|libfuzzer forces one. Seeds: images made by
# qemu-img (when installed) plus the fuzzer's built-in ones. Findings land in qcow/fuzz/out/.
set -euo pipefail

seconds=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
corpus=$out/corpus
target_dir=${CARGO_TARGET_DIR:-$here/target}
engine=${QCOW_FUZZ_ENGINE:-auto}
mkdir -p "$out" "$corpus"

make_qemu_seeds() {
    command -v qemu-img >/dev/null || { echo "run.sh: qemu-img not installed; built-in seeds only"; return; }
    local dir=$1 raw=$1/.source.raw
    rm -f "$dir"/qemu-*.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$dir/qemu-4k.qcow2" 1M
    qemu-io -f qcow2 -c "write -P 1 0 64k" -c "write -z 128k 8k" -c "write -P 2 900k 5000" "$dir/qemu-4k.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 "$dir/qemu-512-r1.qcow2" 256k
    qemu-io -f qcow2 -c "write -P 3 0 4k" -c "write -P 4 100k 700" "$dir/qemu-512-r1.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -o cluster_size=4096,compat=0.10 "$dir/qemu-v2.qcow2" 1M
    qemu-io -f qcow2 -c "write -P 5 4k 12k" "$dir/qemu-v2.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$dir/qemu-lazy.qcow2" 1M
    qemu-io -f qcow2 -c "write -P 6 0 8k" "$dir/qemu-lazy.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$dir/qemu-snap.qcow2" 512k
    qemu-io -f qcow2 -c "write -P 7 0 16k" "$dir/qemu-snap.qcow2" >/dev/null
    qemu-img snapshot -c one "$dir/qemu-snap.qcow2"
    qemu-io -f qcow2 -c "write -P 8 4k 4k" "$dir/qemu-snap.qcow2" >/dev/null
    qemu-img snapshot -c two "$dir/qemu-snap.qcow2"
    head -c 262144 /dev/zero | tr '\0' 'q' > "$raw"
    qemu-img convert -c -O qcow2 -o cluster_size=4096 -f raw "$raw" "$dir/qemu-deflate.qcow2"
    qemu-img convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd -f raw "$raw" "$dir/qemu-zstd.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=4096 -b qemu-4k.qcow2 -F qcow2 "$dir/qemu-overlay.qcow2"
    rm -f "$raw"
}

run_stable() {
    echo "run.sh: stable mutation fuzzer, ${seconds} s"
    cargo build --release --quiet --manifest-path "$here/Cargo.toml" --target-dir "$target_dir" --bin qcow_fuzz
    local status=0
    # An allocation the target should never make fails (and aborts) instead of swapping.
    (ulimit -v 8388608; "$target_dir/release/qcow_fuzz" --seconds "$seconds" --corpus "$corpus" --out "$out") || status=$?
    if [ -f "$out/last-input.qcow2" ]; then
        mv "$out/last-input.qcow2" "$out/abort-$(date +%s).qcow2"
        echo "run.sh: the fuzzer died (status $status); the input it was running is in $out/abort-*.qcow2"
        status=${status/#0/1}
    fi
    return "$status"
}

libfuzzer_flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address -Cdebug-assertions"
host=$(rustc -vV | sed -n 's/^host: //p')

build_libfuzzer() {
    RUSTC_BOOTSTRAP=1 RUSTFLAGS="$libfuzzer_flags" cargo build --release --quiet \
        --manifest-path "$here/Cargo.toml" --target-dir "$target_dir/libfuzzer" --target "$host" \
        --features libfuzzer --bin fuzz_image
}

run_libfuzzer() {
    echo "run.sh: libFuzzer (coverage-guided, AddressSanitizer), ${seconds} s"
    local binary=$target_dir/libfuzzer/$host/release/fuzz_image
    local live=$out/libfuzzer-corpus
    mkdir -p "$live"
    cp -n "$corpus"/*.qcow2 "$live"/ 2>/dev/null || true
    "$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=1048576 \
        -artifact_prefix="$out/" -print_final_stats=1 "$live"
}

make_qemu_seeds "$corpus"
cargo build --release --quiet --manifest-path "$here/Cargo.toml" --target-dir "$target_dir" --bin qcow_fuzz
"$target_dir/release/qcow_fuzz" --write-seeds "$corpus"

case $engine in
    stable) run_stable ;;
    libfuzzer) build_libfuzzer && run_libfuzzer ;;
    auto)
        if build_libfuzzer; then
            run_libfuzzer
        else
            echo "run.sh: libFuzzer does not build here; falling back to the stable fuzzer"
            run_stable
        fi
        ;;
    *) echo "run.sh: QCOW_FUZZ_ENGINE must be stable, libfuzzer or auto"; exit 2 ;;
esac
