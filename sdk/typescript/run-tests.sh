#!/usr/bin/env bash
# Runs the TypeScript client's tests (`npm test`: tsc, then `node --test`) against a real deployd.
#
#   bash sdk/typescript/run-tests.sh
#
# DEPLOYD_BIN  the deployd binary the tests start (default: <repo>/target/debug/deployd; build it
#              first, e.g. `cargo build -p deployd`: this script does not build it)
#
# Dependencies are installed with `npm ci` only when node_modules is missing or package-lock.json
# changed since the last install (a hash of it is kept in node_modules/), from npm's cache when
# it has them. Needs node >= 20 and npm, and python3 (the test deployment's service).
set -euo pipefail

SDK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SDK/../.." && pwd)"
export DEPLOYD_BIN="${DEPLOYD_BIN:-$REPO/target/debug/deployd}"

fail() { echo "sdk/typescript: $*" >&2; exit 1; }

command -v node >/dev/null 2>&1 || fail "node is missing (Node.js 20 or later is needed)"
command -v npm >/dev/null 2>&1 || fail "npm is missing"
command -v python3 >/dev/null 2>&1 || fail "python3 is missing (the test deployment's service is a Python script)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || fail "node $(node --version) is too old: Node.js 20 or later is needed"
[ -x "$DEPLOYD_BIN" ] || fail "DEPLOYD_BIN=$DEPLOYD_BIN is not an executable: build deployd first (cargo build -p deployd)"

cd "$SDK"

# One install at a time (two runs sharing node_modules).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$SDK/.install.lock"
  flock 9
fi
stamp="node_modules/.deployd-lock-sha256"
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ ! -d node_modules ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "sdk/typescript: npm ci"
  npm ci --prefer-offline --no-audit --no-fund
  echo "$want" >"$stamp"
fi
if command -v flock >/dev/null 2>&1; then
  exec 9>&-
fi

echo "sdk/typescript: npm test with DEPLOYD_BIN=$DEPLOYD_BIN"
npm test
