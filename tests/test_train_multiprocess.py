"""`glm5 train` as separate processes: SIGKILL mid-run then --resume, a truncated checkpoint through the CLI, and
torchrun with 2 gloo processes (DDP, FSDP2) against 1 process with the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: bitwise-reproducible CPU arithmetic, and two ranks fit the two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
COMMON = ["--threads", "1", "--no-progress", "--no-plots", "--seq-len", "24", "--synthetic-max-len", "30",
          "--bias-speed", "0.01", "--mtp-depth", "2"]


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "glm5.train.cli", *COMMON, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _torchrun(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "glm5.train.cli", *COMMON, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _records(run):
    out = []
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a SIGKILL can cut the last line short
            continue
        if "event" not in r:
            out.append(r)
    return out


def _sha(run, step, name="model/model.safetensors"):
    m = json.loads((Path(run) / "checkpoints" / f"step_{step:08d}" / "manifest.json").read_text())
    return m["files"][name]["sha256"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """Kill -9 a run mid-way (whatever it is doing: a step or a checkpoint write), resume it, and every logged step
    (those before the kill, and those redone after the last checkpoint) has bitwise the loss of an uninterrupted
    run; the final model and optimizer files are identical."""
    args = ["--steps", 30, "--batch-size", 4, "--save-every", 4, "--optimizer", "muon"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "glm5.train.cli", *COMMON, *map(str, args), "--out-dir",
                             str(killed)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and any(r["step"] >= 9 for r in _records(killed)):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "run ended before it could be killed:\n" + proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    steps_before = {r["step"] for r in _records(killed)}
    assert 9 <= max(steps_before) < 30

    res = _cli(*args, "--out-dir", killed, "--resume", "auto")
    assert res.returncode == 0, res.stderr
    events = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert events and 8 <= events[-1]["step"] <= max(steps_before) and events[-1]["step"] % 4 == 0

    full = tmp_path / "full"
    res = _cli(*args, "--out-dir", full)
    assert res.returncode == 0, res.stderr
    want = {r["step"]: (r["loss"], r["lm"], r["mtp"], r["grad_norm"]) for r in _records(full)}
    got = _records(killed)
    assert {r["step"] for r in got} == set(range(1, 31))
    for r in got:
        assert (r["loss"], r["lm"], r["mtp"], r["grad_norm"]) == want[r["step"]], r["step"]
    for name in ("model/model.safetensors", "optimizer.safetensors"):
        assert _sha(killed, 30, name) == _sha(full, 30, name)


def test_cli_refuses_a_truncated_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[train]\nsteps = 3\nbatch_size = 2\nsave_every = 3\nout_dir = "{run}"\n')
    res = _cli("--config", cfg)
    assert res.returncode == 0, res.stderr
    shard = run / "checkpoints" / "step_00000003" / "model" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    before = (run / "metrics.jsonl").read_text()
    res = _cli("--config", cfg, "--steps", 6, "--resume", "auto")
    assert res.returncode == 2
    assert str(shard) in res.stderr and "truncated" in res.stderr and "Traceback" not in res.stderr
    assert (run / "metrics.jsonl").read_text() == before  # no step ran


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 1 process, global batch 8 as 2 accumulated micro-batches of 4 rows."""
    run = tmp_path_factory.mktemp("one")
    res = _cli("--steps", 6, "--batch-size", 8, "--micro-batch", 4, "--out-dir", run)
    assert res.returncode == 0, res.stderr
    return _records(run)


def test_two_process_ddp_equals_one_process(one_process, tmp_path):
    """2 gloo ranks x 4 rows vs 1 process x 2 micro-batches of 4 rows: every forward has the same shapes, gradients
    are summed in the same order (x2 then /2 is exact), MoE loads are all-reduced: the loss curve is bitwise equal."""
    res = _torchrun("--steps", 6, "--batch-size", 8, "--out-dir", tmp_path / "ddp")
    assert res.returncode == 0, res.stderr[-3000:]
    two = _records(tmp_path / "ddp")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one_process, two):
        assert (a["loss"], a["grad_norm"], a["imbalance"]) == (b["loss"], b["grad_norm"], b["imbalance"]), a["step"]


def test_two_process_fsdp2_matches_one_process(one_process, tmp_path):
    """FSDP2 (fully_shard, gloo): step 1 agrees to rounding (1e-5 relative: all-gathered weights live in new
    buffers, so matmul rounding differs); later steps stay within 2e-3 relative; AdamW's first steps move tiny
    gradients by a sign-like lr-sized step, which turns rounding into visible but small loss differences."""
    res = _torchrun("--steps", 6, "--batch-size", 8, "--parallel", "fsdp", "--out-dir", tmp_path / "fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    two = _records(tmp_path / "fsdp")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    a, b = one_process[0], two[0]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for a, b in zip(one_process, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), a["step"]
    assert (tmp_path / "fsdp" / "checkpoints" / "step_00000006" / "manifest.json").exists()
