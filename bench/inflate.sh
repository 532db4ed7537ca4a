#!/usr/bin/env bash
# Which inflater is fastest on this machine for a `.tar.gz` like the one nix writes (gzip -6,
# one member): flate2 over zlib-rs (what nixctr uses), over miniz_oxide and over C zlib, each
# reading the file as a stream, and libdeflate decompressing the whole file in memory (it
# cannot stream). Same file, ROUNDS runs each, interleaved; prints the median of each. Then
# one core's gzip level 1 (nixctr's level, 2 MiB members) with libdeflate and with flate2.
# usage: bench/inflate.sh [WORKDIR]   (BENCH_MB=900: the size of the uncompressed input)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench-inflate}
ROUNDS=${ROUNDS:-3}
mkdir -p "$work"
for f in zlib-rs miniz zlib; do
  cargo build -q --release --locked --manifest-path "$here/inflaters/Cargo.toml" --features "$f" \
    --target-dir "$work/target-$f"
done
if [ ! -f "$work/in.tar.gz" ] || [ ! -f "$work/in.tar" ]; then
  python3 "$here/gen-image.py" "$work/in" --layers 8 --size-mb "${BENCH_MB:-900}" >&2
  gzip -6 -n -c "$work/in.tar" > "$work/in.tar.gz"
fi
echo "machine: $(nproc) cores; input $(du -m "$work/in.tar.gz" | cut -f1) MB gzip -6 (one member)"
for r in $(seq "$ROUNDS"); do
  for f in zlib-rs miniz zlib; do "$work/target-$f/release/inflaters" "$work/in.tar.gz"; done
  "$work/target-zlib-rs/release/inflaters" "$work/in.tar.gz" libdeflate
done | tee "$work/runs.txt" >/dev/null
echo "median of $ROUNDS runs (MB/s of uncompressed output):"
for name in "flate2 zlib-rs" "flate2 miniz_oxide" "flate2 zlib (C)" "libdeflate (whole file)"; do
  m=$(grep -F "$name " "$work/runs.txt" | awk '{print $(NF-1)}' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '  %-24s %6s MB/s\n' "$name" "$m"
done
echo "compressing (level 1, 2 MiB members, one core, the first 400 MB of the .tar):"
"$work/target-zlib-rs/release/inflaters" "$work/in.tar" deflate | sed 's/^/  /'
"$work/target-zlib/release/inflaters" "$work/in.tar" deflate | grep -v '^libdeflate' | sed 's/^/  /'

