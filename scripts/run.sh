#!/usr/bin/env bash
# The main job. Sets up .venv on first use, then runs glm5 (default: inspect the full GLM-5 architecture).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
if [ $# -eq 0 ]; then set -- inspect glm5; fi
exec .venv/bin/glm5 "$@"
