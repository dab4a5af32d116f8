#!/usr/bin/env bash
# The web console's tests: the SSE parser in Node, then the console in headless Chromium against
# a real deployd (tests/console/console.test.js).
#
#   tests/console/run-tests.sh
#
# DEPLOYD_BIN    the deployd binary (default: target/debug/deployd; build it first)
# CHROMIUM       the browser (default: /usr/bin/chromium; installed with apt-get when missing
#                and running as root)
# DEPLOYD_GRAPH_SERVICE_BIN  the example graph service (default: target/debug/graph-service;
#                cargo build -p graph-service), deployed for the graph's diagram
# DEPLOYD_CONSOLE_DIR  when set, deployd serves the console's files from there (for working on
#                the console without rebuilding); unset, the test checks the embedded files are
#                the folder's.
# Screenshots go to docs/console/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

export DEPLOYD_BIN="${DEPLOYD_BIN:-$repo/target/debug/deployd}"
if [ ! -x "$DEPLOYD_BIN" ]; then
  echo "tests/console: no deployd binary at $DEPLOYD_BIN: build it (cargo build -p deployd) or set DEPLOYD_BIN" >&2
  exit 1
fi
export DEPLOYD_GRAPH_SERVICE_BIN="${DEPLOYD_GRAPH_SERVICE_BIN:-$repo/target/debug/graph-service}"
if [ ! -x "$DEPLOYD_GRAPH_SERVICE_BIN" ]; then
  echo "tests/console: no graph-service binary at $DEPLOYD_GRAPH_SERVICE_BIN: build it (cargo build -p graph-service) or set DEPLOYD_GRAPH_SERVICE_BIN" >&2
  exit 1
fi
command -v python3 >/dev/null || {
  echo "tests/console: python3 is missing (the examples' services need it)" >&2
  exit 1
}

# shellcheck source=setup.sh
source "$here/setup.sh"

cd "$here"
exec node --test --test-concurrency=1 sse.test.js console.test.js
