#!/usr/bin/env bash
# make test's system packages: `tools/need-apt-package.sh CHECK PACKAGE WHAT [OR]`.
# CHECK (a shell condition) true: nothing to do. Else, as root with apt: install PACKAGE.
# Else stop with a message saying what to install (OR: another way out). Never skips.
set -euo pipefail
check=$1 package=$2 what=$3 alternative=${4:-}
if bash -c "$check" >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing $what (apt-get install $package)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" \
    >/dev/null
  exit 0
fi
echo "make test needs $what: install Debian's $package package" \
     "(sudo apt-get install $package)${alternative:+, or $alternative}" >&2
exit 1
