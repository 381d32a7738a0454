#!/usr/bin/env bash
# Install the Debian packages the tests use, when they are missing:
#   busybox-static  the static helper that the Dockerfile ships, checked by the tests
#   prometheus      for promtool, which checks the alerting rules
set -euo pipefail
missing=()
[[ -x /bin/busybox ]] || missing+=(busybox-static)
command -v promtool >/dev/null || missing+=(prometheus)
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "missing packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
