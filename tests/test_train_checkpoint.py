"""Training checkpoints: exact resume, HF-loadable model, verification of truncated / corrupted / partial
checkpoints, atomic saves, retention."""

import json
import shutil

import pytest
import torch

import glm5
from glm5 import CheckpointError
from glm5.train import TrainConfig, train
from glm5.train import checkpoint as ckpt


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **kw):
    base = dict(model="tiny", out_dir=str(out), steps=8, seq_len=24, batch_size=4, micro_batch=2, lr=5e-3,
                warmup_steps=2, save_every=3, keep_last=5, mtp_depth=2, bias_speed=0.01, progress=False, plots=False,
                synthetic_max_len=30)
    return TrainConfig(**{**base, **kw})


def _losses(run):
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" not in r:
            out.setdefault(r["step"], []).append((r["loss"], r["lm"], r["mtp"], r["grad_norm"]))
    return out


def _sha(step_dir, name):
    return json.loads((step_dir / "manifest.json").read_text())["files"][name]["sha256"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, one_thread):
    """8 steps, Muon + AdamW, 2 MTP depths, gradient accumulation, MoE bias updates; checkpoints at 3, 6, 8."""
    run = tmp_path_factory.mktemp("full")
    train(_cfg(run, optimizer="muon"))
    return run


def test_resume_continues_exactly(full_run, tmp_path):
    """A run resumed from step 3 of another one logs bitwise the same losses and grad norms for steps 4..8 and ends
    with bitwise the same model and optimizer state (checked by the manifest hashes)."""
    run = tmp_path / "resumed"
    shutil.copytree(full_run / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000003")
    train(_cfg(run, optimizer="muon", resume="auto"))
    a, b = _losses(full_run), _losses(run)
    assert sorted(b) == [4, 5, 6, 7, 8]
    for s in b:
        assert b[s] == a[s], s
    fa, fb = full_run / "checkpoints" / "step_00000008", run / "checkpoints" / "step_00000008"
    for name in ("model/model.safetensors", "optimizer.safetensors"):
        assert _sha(fa, name) == _sha(fb, name), name
    state = json.loads((fb / "trainer_state.json").read_text())
    assert state["data"] == json.loads((fa / "trainer_state.json").read_text())["data"]


def test_checkpoint_model_is_hf_layout(full_run):
    """The model part opens with glm5.load_model (MTP layer included, MoE biases moved by training) and with
    transformers, which gives the same logits."""
    transformers = pytest.importorskip("transformers")
    d = full_run / "checkpoints" / "step_00000008" / "model"
    model = glm5.load_model(d)
    assert len(model.mtp) == 1
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0  # the aux-loss-free updates were saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_retention_keeps_the_last_n(full_run, tmp_path):
    run = tmp_path / "r"
    train(_cfg(run, steps=5, save_every=1, keep_last=2, mtp_depth=0))
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000004", "step_00000005"]
    assert [p.name for p in ckpt.list_checkpoints(full_run / "checkpoints")] == \
        ["step_00000003", "step_00000006", "step_00000008"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,file,match", [
    ("truncate", "model/model.safetensors", "truncated"),
    ("truncate", "optimizer.safetensors", "truncated"),
    ("flip", "model/model.safetensors", "corrupted"),
    ("flip", "trainer_state.json", "corrupted"),
    ("delete", "rng.safetensors", "missing"),
    ("delete", "manifest.json", "incomplete checkpoint"),
])
def test_damaged_checkpoint_is_refused(full_run, tmp_path, damage, file, match):
    """The newest checkpoint damaged on disk: resuming raises an error naming the file, and no training step runs
    (the metrics file is untouched): no silent fall-back to an older checkpoint either."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    target = run / "checkpoints" / "step_00000008" / file
    {"truncate": _truncate, "flip": _flip_byte, "delete": lambda p: p.unlink()}[damage](target)
    metrics_before = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=match) as e:
        train(_cfg(run, optimizer="muon", steps=10, resume="auto"))
    assert str(target) in str(e.value)
    assert (run / "metrics.jsonl").read_text() == metrics_before


def test_crash_during_save_leaves_no_checkpoint(full_run, tmp_path, monkeypatch):
    """An error while writing leaves neither a step directory nor its temporary directory; a temporary directory
    left by a SIGKILL mid-save is never read as a checkpoint and is removed by the next run."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    root = run / "checkpoints"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        train(_cfg(run, optimizer="muon", steps=9, resume="auto"))
    assert [p.name for p in root.iterdir()] and not any(p.name.startswith(".tmp") for p in root.iterdir())
    assert ckpt.list_checkpoints(root)[-1].name == "step_00000008"
    monkeypatch.undo()
    stale = root / ".tmp-step_00000009-99999"
    shutil.copytree(root / "step_00000008", stale)  # what a kill between write and rename leaves
    (stale / "manifest.json").unlink()
    train(_cfg(run, optimizer="muon", steps=9, resume="auto"))
    assert not stale.exists()
    assert ckpt.list_checkpoints(root)[-1].name == "step_00000009"


def test_fresh_start_refuses_a_run_with_checkpoints(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    with pytest.raises(ValueError, match="--resume auto"):
        train(_cfg(run))


def test_optimizer_state_round_trip():
    model = glm5.load_model("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt)
    tensors, structure = ckpt.flatten_optimizer_state(osd)
    json.dumps(structure)  # plain JSON: nothing to unpickle
    back = ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(structure)))
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][fqn][k], v)


def test_resume_with_another_stage_is_refused(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    with pytest.raises(ValueError, match="stage='pretrain'.*--model"):
        train(_cfg(run, optimizer="muon", stage="sparse", resume="auto"))
