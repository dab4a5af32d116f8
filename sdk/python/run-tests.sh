#!/usr/bin/env bash
# Runs the adapter's tests against each workflow library it supports, each in its own virtualenv.
#
#   bash sdk/python/run-tests.sh [pytest arguments...]
#
# Virtualenvs are made once and kept under ${DEPLOYD_PY_CACHE:-<repo>/target/python}; a virtualenv
# is made again only when its requirements change. uv is used to make them (installed into the
# user site with pip when it is missing). Exits non-zero when any test fails.
#
# DEPLOYD_PY_ENVS   names of the environments to run (default: all, see ENVS below)
# DEPLOYD_PY_PYTHON the interpreter the virtualenvs are made from (default: python3)
set -euo pipefail

SDK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SDK/../.." && pwd)"
CACHE="${DEPLOYD_PY_CACHE:-$REPO/target/python}"
PYTHON="${DEPLOYD_PY_PYTHON:-python3}"

# name | flavor the test workflows import (`workflows` or `core`) | requirements
#
# llama-deploy 0.9.2 requires llama-index-workflows>=0.2.1 and llama-index-core>=0.11.17,<0.14;
# resolved together they give llama-index-core 0.13.6 and llama-index-workflows 1.3.0 (core
# 0.13 caps workflows below 2). From llama-index-core 0.12.4x on, `llama_index.core.workflow`
# re-exports llama-index-workflows; core 0.12.40 (inside llama-deploy 0.8's range) still has its
# own implementation, and llama-index-workflows 2.x is what a workflow written today gets.
# core-0.13.6 also has uvloop, as the environments deployd makes do: the adapter runs on it
# there and on asyncio's own loop in the others.
ENVS=(
  "workflows-1.3.0|workflows|llama-index-workflows==1.3.0"
  "core-0.13.6|core|llama-index-core==0.13.6 llama-index-workflows==1.3.0 uvloop==0.23.0"
  "core-0.12.40|core|llama-index-core==0.12.40"
  "workflows-2.26.1|workflows|llama-index-workflows==2.26.1"
)
TEST_REQUIREMENTS="pytest"

say() { printf '\n== %s\n' "$*"; }

find_uv() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
  local user_bin
  user_bin="$("$PYTHON" -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))')"
  if [ -x "$user_bin/uv" ]; then echo "$user_bin/uv"; return; fi
  echo "uv is missing: installing it into the user site with pip" >&2
  "$PYTHON" -m pip install --user --quiet uv >&2 \
    || "$PYTHON" -m pip install --user --quiet --break-system-packages uv >&2
  echo "$user_bin/uv"
}

UV="$(find_uv)"
export UV_PYTHON_DOWNLOADS=never
INTERPRETER="$("$PYTHON" -c 'import sys; print(sys.executable)')"
PY_VERSION="$("$INTERPRETER" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
mkdir -p "$CACHE"

# One run at a time per cache (the virtualenvs are shared).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.lock"
  flock 9
fi

make_env() {  # name requirements → path of the virtualenv, made or reused
  local name="$1" requirements="$2"
  local venv="$CACHE/venv-$name"
  local spec="python $PY_VERSION | $requirements | $TEST_REQUIREMENTS"
  if [ -f "$venv/.deployd-spec" ] && [ "$(cat "$venv/.deployd-spec")" = "$spec" ] \
    && "$venv/bin/python" -c 'import pytest' >/dev/null 2>&1; then
    echo "$venv"
    return
  fi
  echo "making $venv ($requirements)" >&2
  rm -rf "$venv"
  "$UV" venv --quiet --python "$INTERPRETER" "$venv" >&2
  # shellcheck disable=SC2086
  "$UV" pip install --quiet --python "$venv/bin/python" $requirements $TEST_REQUIREMENTS >&2
  echo "$spec" >"$venv/.deployd-spec"
  echo "$venv"
}

selected() {
  [ -z "${DEPLOYD_PY_ENVS:-}" ] && return 0
  local want
  for want in ${DEPLOYD_PY_ENVS//,/ }; do [ "$want" = "$1" ] && return 0; done
  return 1
}

passed=0 failed=0 ran=0 bad=0
results=()
for entry in "${ENVS[@]}"; do
  IFS='|' read -r name flavor requirements <<<"$entry"
  selected "$name" || continue
  ran=$((ran + 1))
  say "$name: $requirements (tests import ${flavor/core/llama_index.core.workflow})"
  venv="$(make_env "$name" "$requirements")"
  "$venv/bin/python" -c 'import importlib.metadata as m
for d in ("llama-index-workflows", "llama-index-core", "pydantic", "pytest"):
    try: print("  %s %s" % (d, m.version(d)))
    except m.PackageNotFoundError: pass'
  log="$CACHE/pytest-$name.log"
  set +e
  (cd "$SDK" && DEPLOYD_TEST_FLAVOR="$flavor" PYTHONDONTWRITEBYTECODE=1 \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@") \
    2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$log" \
    | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"
  n_passed="$(echo "$summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)"
  n_failed=0
  for n in $(echo "$summary" | grep -oE '[0-9]+ (failed|errors?)' | grep -oE '^[0-9]+' || true); do
    n_failed=$((n_failed + n))
  done
  passed=$((passed + ${n_passed:-0}))
  if [ "$status" -eq 0 ]; then
    results+=("ok      $name: $summary")
  else
    bad=1
    # A run that failed without counting a failure (a crash, no tests) still counts as one.
    failed=$((failed + (n_failed > 0 ? n_failed : 1)))
    results+=("FAILED  $name: ${summary:-pytest exited with $status}")
  fi
done

if [ "$ran" -eq 0 ]; then
  echo "no environment selected (DEPLOYD_PY_ENVS=${DEPLOYD_PY_ENVS:-})" >&2
  exit 2
fi

say "deployd_adapter tests"
printf '%s\n' "${results[@]}"
echo "$passed passed, $failed failed"
exit "$bad"
