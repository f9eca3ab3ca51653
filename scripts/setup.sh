#!/usr/bin/env bash
# Creates .venv and installs glm5 into it (with the test extra if $1 = test). Says what it installs the first time
# (minutes without a wheel cache); silent once done. torch is pinned to the CPU build that this project's machines
# carry; override with GLM5_TORCH="torch==X".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${GLM5_TORCH:-torch==2.13.0}
EXTRA=${1:-}
stamp=".venv/.glm5-setup-${EXTRA:-base}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0

say() { echo "glm5 setup: $*"; }
# pip's own lines for what it fetches and installs, without the "already satisfied" noise
pip_install() { .venv/bin/python -m pip install --progress-bar off "$@" 2>&1 \
  | sed -un -E 's/^(Processing|Collecting|Downloading|Successfully installed|ERROR:) ?/  \1 /p'; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1); the first set-up installs PyTorch and takes a few minutes"
  "$PY" -m venv .venv
else
  say "updating .venv (pyproject.toml, scripts/setup.sh or GLM5_TORCH changed)"
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
say "installing $TORCH_SPEC"
pip_install "$TORCH_SPEC"
if [ "$EXTRA" = test ]; then
  say "installing glm5 with its test extra (pytest, transformers, openai, httpx) and dependencies from pyproject.toml"
  pip_install -e ".[test]"
else
  say "installing glm5 and its dependencies from pyproject.toml"
  pip_install -e .
fi
echo "$want" > "$stamp"
say "done"
