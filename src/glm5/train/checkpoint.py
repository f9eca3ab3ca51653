"""Training checkpoints: atomic, verified, safetensors only.

Layout of one checkpoint, `<run>/checkpoints/step_00000123/`:
    model/                  HF layout (config.json + safetensors) via glm5.save_checkpoint: glm5.load_model and
                            transformers open it directly
    optimizer.safetensors   every optimizer state tensor, keyed "<param name>::<state key>"
    rng.safetensors         torch (and CUDA) RNG state of every rank
    trainer_state.json      step, data position, optimizer structure (param groups, non-tensor state), Python RNG
                            state of every rank, the training config
    manifest.json           byte size and sha256 of every file above; written last

Atomicity: everything is written into a hidden temporary directory next to the final one, flushed to disk, and only
then renamed to `step_N` (a rename is atomic on POSIX filesystems). A crash mid-write leaves a `.tmp-*` directory
that is never read as a checkpoint and is removed by the next run. Verification: before anything is loaded, every
file of the manifest is checked (present, size, sha256); a truncated or corrupted file raises CheckpointError naming
it, and training does not start.

Nothing is unpickled: tensors go through safetensors, structure through JSON (the house rule: no file we load back
can run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import save_checkpoint
from ..weights import CheckpointError, checkpoint_files, load_into

FORMAT = "glm5-train-checkpoint/1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d{8})")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Completed checkpoint directories under root, oldest first (temporary directories are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)), key=lambda p: p.name)


def clean_stale(root: str | Path) -> list[str]:
    """Remove temporary directories left by a crash during a save; returns their names."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


# -- optimizer state <-> safetensors + JSON ---------------------------------------------------------------------------
def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An FQN-keyed optimizer state dict (torch.distributed.checkpoint.state_dict style) -> (tensors, structure)."""
    tensors, state = {}, {}
    for fqn, entry in osd["state"].items():
        state[fqn] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                key = f"{fqn}::{k}"
                tensors[key] = v.detach().cpu().contiguous()
                state[fqn][k] = {"tensor": key}
            else:
                state[fqn][k] = {"value": v}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"state": state, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state = {}
    for fqn, entry in structure["state"].items():
        state[fqn] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
    # JSON has no tuples: betas and ns_coefficients come back as lists; give them back their tuple form.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- RNG ---------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": _py_state_to_json(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_py_state_from_json(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _py_state_to_json(s):
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_json(j):
    version, internal, gauss = j
    return (version, tuple(internal), gauss)


# -- writing --------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str | Path, step: int, model, optim_state: dict, rng_states: list[dict], trainer_state: dict,
         keep_last: int = 3) -> Path:
    """Write checkpoint `step` under root atomically; keep the newest keep_last. `model` is a GLM5 or anything with
    `.config` and `.state_dict()` holding full (unsharded) tensors. Call on one process only."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_checkpoint(model, tmp / "model")
        tensors, structure = flatten_optimizer_state(optim_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": FORMAT})
        rng_t = {}
        for r, st in enumerate(rng_states):
            rng_t[f"torch.{r}"] = st["torch"]
            if "cuda" in st:
                rng_t[f"cuda.{r}"] = st["cuda"]
        save_file(rng_t, str(tmp / "rng.safetensors"), metadata={"format": FORMAT})
        state = dict(trainer_state, step=step, optimizer=structure, python_rng=[st["python"] for st in rng_states],
                     saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        files = {}
        for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
            _fsync(p)
            files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # re-saving a step (a resumed run): move the old one aside, then swap
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading --------------------------------------------------------------------------------------------------------
def verify(path: str | Path) -> dict:
    """Check every file the manifest lists (present, size, sha256). Returns the manifest; raises CheckpointError
    naming the first bad file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing; {path} is an incomplete checkpoint and will not be used")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e}); {path} will not be used") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing; {path} will not be used")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {want['bytes']} (truncated or overwritten); "
                                  f"{path} will not be used")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from the manifest (corrupted); {path} will not be used")
    return manifest


def resolve(resume: str, root: str | Path) -> Path | None:
    """`resume`: "" (fresh start), "auto" (the newest checkpoint under root, None if there is none) or a path.
    A newest checkpoint that fails verification is an error, never skipped for an older one: silently training from
    an older state would rewrite history."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume)
    found = list_checkpoints(root)
    return found[-1] if found else None


def load(path: str | Path) -> dict:
    """Verify, then read everything but the model weights: {"step", "optimizer", "rng", "trainer_state"}."""
    path = Path(path)
    verify(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        opt_t = load_file(str(path / "optimizer.safetensors"))
        rng_t = load_file(str(path / "rng.safetensors"))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({e})") from None
    rng = []
    for r, py in enumerate(state["python_rng"]):
        st = {"torch": rng_t[f"torch.{r}"], "python": py}
        if f"cuda.{r}" in rng_t:
            st["cuda"] = rng_t[f"cuda.{r}"]
        rng.append(st)
    return {"step": int(state["step"]), "optimizer": unflatten_optimizer_state(opt_t, state["optimizer"]),
            "rng": rng, "trainer_state": state}


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Fill a (full, unsharded) GLM5 from a checkpoint's model/ directory, every tensor checked."""
    load_into(model, checkpoint_files(Path(path) / "model"))
