#!/usr/bin/env bash
# Creates .venv and installs glm5 into it (with the test extra if $1 = test). Idempotent and quick when done.
# torch is pinned to the CPU build that this project's machines carry; override with GLM5_TORCH="torch==X".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${GLM5_TORCH:-torch==2.13.0}
EXTRA=${1:-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.glm5-setup-${EXTRA:-base}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
  if [ "$EXTRA" = test ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  echo "$want" > "$stamp"
fi
