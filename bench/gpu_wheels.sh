#!/usr/bin/env bash
# Downloads the wheels bench/gpu.sh needs on a GPU host (no internet there) into bench/wheels/
# (git-ignored; the device tool carries it): pure-Python wheels plus CPython 3.12 manylinux
# x86-64 builds. `--core` leaves out the optional NudeNet and PyAV wheels. `--rehearsal` also fetches the CPython 3.11 builds into bench/wheels-cp311/ for
# `bench/gpu_rehearse.sh` on a 3.11 machine. Prints the total against the 64 MiB travel limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done

core=0 rehearsal=0
for arg in "$@"; do
  case "$arg" in
    --core) core=1 ;;
    --rehearsal) rehearsal=1 ;;
    *) echo "usage: $0 [--core] [--rehearsal]" >&2; exit 2 ;;
  esac
done
download() {  # download <python version> <folder> <requirements file>
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$1" "${platforms[@]}" -r "$3" -d "$2"
}

download 3.12 bench/wheels bench/gpu-requirements.txt
[ "$core" = 1 ] || download 3.12 bench/wheels bench/gpu-requirements-extras.txt
if [ "$rehearsal" = 1 ]; then
  download 3.11 bench/wheels-cp311.tmp bench/gpu-requirements.txt
  mkdir -p bench/wheels-cp311
  # Keep only what differs from the 3.12 set (the compiled wheels): pure ones are shared.
  for whl in bench/wheels-cp311.tmp/*.whl; do
    [ -e "bench/wheels/$(basename "$whl")" ] || mv "$whl" bench/wheels-cp311/
  done
  rm -rf bench/wheels-cp311.tmp
fi

wheels_kib=$(du -sk bench/wheels | cut -f1)
tracked_kib=$(git ls-files -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
untracked_kib=$(git ls-files -z --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_kib=$((wheels_kib + tracked_kib + untracked_kib))
printf 'bench/wheels: %s wheels, %d KiB\n' "$(ls bench/wheels/*.whl | wc -l)" "$wheels_kib"
printf 'tracked files: %d KiB, untracked not ignored: %d KiB\n' "$tracked_kib" "$untracked_kib"
printf 'travels to the GPU host: %d KiB of 65536 KiB (64 MiB)\n' "$total_kib"
if [ "$total_kib" -gt 65536 ]; then
  echo "over the 64 MiB limit" >&2
  exit 1
fi
