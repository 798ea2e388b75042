#!/usr/bin/env bash
# Builds the statically linked `quiesce` (static glibc, static-pie): no libc, loader or libgcc_s needed at
# run time, so it runs in `FROM scratch`, distroless/static and Alpine images alike.
#
#   scripts/build-static.sh                      # -> target/x86_64-unknown-linux-gnu/release/quiesce
#   scripts/build-static.sh -p quiesce-testbin   # also the static test fixture (the empty-root test uses it)
#
# The explicit --target keeps the flag off build scripts and proc macros, which cannot be static.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"
exec cargo build --release --locked --target x86_64-unknown-linux-gnu -p quiesce "$@"
