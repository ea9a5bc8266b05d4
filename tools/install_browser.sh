#!/usr/bin/env bash
# Installs the real browser the tests drive: Debian's Chromium (/usr/bin/chromium).
# Playwright itself is a Python test dependency (pyproject's test extra); it never downloads a
# browser of its own here (`playwright install` is not used): the tests launch this Chromium with
# executable_path. Elsewhere, point COURSE_CHROMIUM at any Chromium or Chrome binary instead.
set -euo pipefail
if [ -n "${COURSE_CHROMIUM:-}" ] && [ -x "${COURSE_CHROMIUM}" ]; then exit 0; fi
if [ -x /usr/bin/chromium ]; then exit 0; fi
if ! command -v apt-get >/dev/null; then
    echo "install_browser: no apt-get here; install Chromium and set COURSE_CHROMIUM=/path/to/chromium" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --headless --no-sandbox --disable-gpu --dump-dom about:blank >/dev/null 2>&1 \
    || { echo "install_browser: /usr/bin/chromium does not start headless" >&2; exit 1; }
