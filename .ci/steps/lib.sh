# Sourced by .ci/run and each step in .ci/steps: strict mode, the repository as
# the working directory, the shared work directory and the helpers the steps
# share. Steps pass their results on in files below $LOOPDEV_CI_WORK: a step
# run alone (bash .ci/steps/NAME) makes its own and removes it at exit, and runs
# the steps before it whose results it lacks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ -z "${LOOPDEV_CI_WORK:-}" ]; then
  LOOPDEV_CI_WORK=$(mktemp -d /tmp/loopdev-ci.XXXXXX)
  export LOOPDEV_CI_WORK
  trap 'rm -rf "$LOOPDEV_CI_WORK"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  # The broker tests run clients as nobody with the venvs' python: let them in.
  chmod 755 "$LOOPDEV_CI_WORK"
fi
work=$LOOPDEV_CI_WORK

apt_updated=""
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "need the packages $* (Debian names) and there is no apt-get here" >&2
    return 1
  fi
  [ -n "$apt_updated" ] || { apt-get update -qq && apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Debian/Ubuntu split venv support and the C headers off their pythons.
prepare() {
  local py=$1 real=$2 pkg
  case "$real" in /usr/bin/*) ;; *) return 0 ;; esac
  pkg=$(basename "$real")
  case "$pkg" in pypy*) pkg=pypy3 ;; esac
  "$py" -c 'import ensurepip' 2>/dev/null || apt_install "$pkg-venv"
  "$py" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    apt_install "$pkg-dev"
}

fresh_venv() { # path venv
  prepare "$1" "$(readlink -f "$1")"
  "$1" -m venv "$2"
  "$2/bin/python" -m pip install -q --upgrade pip
}

# The interpreters to test, one "impl X.Y ft|path|label" a line, sorted: made by
# .ci/steps/interpreters where it is not there yet.
load_pythons() {
  [ -s "$work/pythons" ] || bash .ci/steps/interpreters
  mapfile -t pythons <"$work/pythons"
}

# The oldest and the newest CPython with the GIL.
oldest_cpython() {
  local entry
  for entry in "${pythons[@]}"; do
    case "$entry" in "cpython "*" 0|"*) cut -d'|' -f2 <<<"$entry" && return 0 ;; esac
  done
  return 1
}
newest_cpython() {
  local entry found=""
  for entry in "${pythons[@]}"; do
    case "$entry" in "cpython "*" 0|"*) found=$(cut -d'|' -f2 <<<"$entry") ;; esac
  done
  [ -n "$found" ] && echo "$found"
}
