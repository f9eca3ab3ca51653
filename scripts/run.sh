#!/usr/bin/env bash
# The main job. Sets up .venv on first use, then runs glm5 (default: the OpenAI-compatible server on 127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
if [ $# -eq 0 ]; then set -- serve; fi
exec .venv/bin/glm5 "$@"
