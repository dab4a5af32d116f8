# Sourced by run-tests.sh and run-bench.sh: Chromium, Node and the test's npm packages. Prints
# only to stderr (run-bench.sh's stdout is its JSON).

console_fail() {
  echo "tests/console: $*" >&2
  exit 1
}

export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  if [ "$CHROMIUM" = /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests/console: installing Chromium (apt-get install chromium)" >&2
    apt-get update -qq >&2 || console_fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2 || console_fail "apt-get install chromium failed"
  fi
  [ -x "$CHROMIUM" ] || console_fail "no Chromium at $CHROMIUM: install it (as root: apt-get install -y chromium) or set CHROMIUM"
fi

command -v node >/dev/null || console_fail "node is missing (Node 20 or later)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || console_fail "Node $(node --version) is too old: Node 20 or later"

# npm ci only when node_modules is missing or was installed from another package-lock.json.
(
  cd "$(dirname "${BASH_SOURCE[0]}")"
  stamp=node_modules/.package-lock.sha256
  want="$(sha256sum package-lock.json | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    npm ci --no-audit --no-fund --loglevel=error >&2 || exit 1
    echo "$want" >"$stamp"
  fi
) || console_fail "npm ci failed"
