"""A short schema fuzz of the server (bench/fuzz_server.py, 15 s, fixed seed): schemathesis' requests from
/openapi.json, valid and invalid, get no 5xx, no hang, no answer outside the schema, and leave nothing held."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_schema_fuzz_finds_nothing(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "fuzz_server.py"), "--duration", "15", "--seed", "0",
           "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = r.stdout + r.stderr
    assert "server errors: 0 5xx answers, 0 tracebacks" in report, report
    assert "generation requests" in report and " 0 generation requests" not in report, report
    assert r.returncode == 0, report + "\n" + "\n".join(
        p.read_text()[-3000:] for p in sorted(tmp_path.glob("schemathesis-*.txt")))
