#!/usr/bin/env bash
# Runs the console's page benchmark (bench.mjs, or the script given first) in headless Chromium
# against a running deployd; `cargo xtask bench console` calls it:
#
#   tests/console/run-bench.sh tests/console/bench.mjs --base http://127.0.0.1:PORT \
#       --deployment NAME --task ID --session ID [--loads 5]
#
# Prints the timings as JSON on stdout; everything else goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/bench.mjs"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
  script="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
  shift
fi

# shellcheck source=setup.sh
source "$here/setup.sh"

cd "$here"
exec node "$script" "$@"
