#!/usr/bin/env bash
# Sets up .venv with the test extra, then runs the test suite (a few minutes on 2 CPU cores). -rs lists every
# skipped test with its reason: a reference test that cannot run (no transformers, no C compiler) shows in the log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -rs tests "$@"
