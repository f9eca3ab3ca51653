#!/usr/bin/env bash
# Sets up .venv with the test extra, then runs the test suite (a few minutes on 2 CPU cores). -rs lists every
# skipped test with its reason: a reference test that cannot run (no transformers, no C compiler) shows in the log.
#
# The chat-page tests drive a real headless Chromium (Playwright). Playwright's own browser download comes from its
# CDN, which CI machines may not reach; Debian's chromium package comes from the distribution's mirror. So when no
# Chromium is found and we are root on a Debian-like system, it is installed with apt-get (one line says so).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test

have_chromium() {
  [ -n "${GLM5_CHROMIUM:-}" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
    || command -v google-chrome >/dev/null || command -v google-chrome-stable >/dev/null
}
apt_quiet() { DEBIAN_FRONTEND=noninteractive apt-get "$@" >/dev/null 2>&1; }
if ! have_chromium; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "glm5 test: installing Debian's chromium and fonts-liberation with apt-get (for the chat-page browser tests)"
    pkgs=(install -y -q --no-install-recommends chromium fonts-liberation)
    apt_quiet "${pkgs[@]}" || { apt_quiet update && apt_quiet "${pkgs[@]}"; } \
      || echo "glm5 test: apt-get install chromium failed; tests/test_chat_page.py will fail"
  else
    echo "glm5 test: no Chromium found (install Debian's chromium, or set GLM5_CHROMIUM=/path/to/chrome);" \
         "tests/test_chat_page.py will fail"
  fi
fi
exec .venv/bin/python -m pytest -rs tests "$@"
