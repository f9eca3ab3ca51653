"""A training step's forward + backward with three ways to take the vocabulary head's loss, same weights, same batch,
one process:

  glm5 (fused, at labels)    glm5.train.losses.head_ce_sum, what ForwardLoss does: the head only at labelled
                             positions, fused with the cross-entropy and its gradients in row chunks (linear_ce)
  at labels, unfused         the head at labelled positions, then F.cross_entropy (glm5's former head loss)
  everywhere (reference)     the head over every position, F.cross_entropy with ignore_index

    .venv/bin/python bench/sft_step.py [--data sft|pretrain] [--rows 8] [--seq 1152] [--steps 6] [--threads 2]

The batch: --data sft (default) the speedrun's SFT chats (glm5.speedrun.pipeline.sft_examples, the FULL recipe)
rendered with the shipped tokenizer and packed as the SFT packs them; --data pretrain: seeded random tokens, one
document per row, every position labelled (the pre-training step's shape with --rows 8 --seq 512). The model: the
shipped model's shape with seeded random weights (the cost does not depend on the values), dense attention, one
MTP depth, fp32. Sides rotate within each round, so load from other processes hits all alike; the table reports
medians and ratios. Every side's loss is printed so that a reader sees they compute the same thing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=("sft", "pretrain"), default="sft")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1152)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from glm5.loader import load_model
    from glm5.loader import SHIPPED_MODEL_DIR
    from glm5.speedrun.pipeline import sft_examples
    from glm5.speedrun.recipe import FULL
    from glm5.tokenizer import Tokenizer
    from glm5.train.data import Packer
    from glm5.train.loop import set_stage
    from glm5.train.losses import IGNORE, head_ce_sum, loss_denominators, shifted_labels
    from glm5.train.sft import ChatDocs

    tok = Tokenizer.from_dir(SHIPPED_MODEL_DIR)
    model = load_model(SHIPPED_MODEL_DIR / "config.json", dtype=torch.float32, seed=0)
    model.train()
    set_stage(model, "pretrain", 1)
    if args.data == "sft":
        docs = list(ChatDocs(sft_examples(FULL, tok, 3)[:4 * args.rows], tok))
        b = Packer(docs, args.rows, args.seq, model.config.vocab_size).next_batch()
        toks, doc, pos, loss = b.tokens_BT1, b.doc_BT1, b.pos_BT1, b.loss_BT1
    else:
        g = torch.Generator().manual_seed(0)
        toks = torch.randint(0, model.config.vocab_size, (args.rows, args.seq + 1), generator=g)
        doc, pos = torch.zeros_like(toks), torch.arange(args.seq + 1).expand(args.rows, -1)
        loss = torch.ones_like(toks, dtype=torch.bool)
    den = loss_denominators(toks, doc, 1, loss)
    T = args.seq

    def step(kind: str):
        h = model.hidden(toks[:, :-1], pos[:, :-1], None, doc[:, :-1])
        x = model.mtp_hidden(h[:, :T - 1], toks[:, 1:T], pos[:, :T - 1], 0, None, doc[:, :T - 1])
        total = 0.0
        for hh, lab, norm, d in ((h, shifted_labels(toks, doc, 1, T, loss), None, 0),
                                 (x, shifted_labels(toks, doc, 2, T - 1, loss), model.mtp[0].shared_head.norm, 1)):
            if kind == "fused":
                ce = head_ce_sum(model.lm_head, hh, lab, norm)
            else:
                if kind == "labels":
                    hh, lab = hh[lab != IGNORE], lab[lab != IGNORE]
                logits = model.lm_head(norm(hh) if norm is not None else hh)
                ce = F.cross_entropy(logits.flatten(0, -2), lab.flatten(), ignore_index=IGNORE, reduction="sum")
            total = total + (0.3 if d else 1.0) * ce / den[f"labels{d}"]
        total.backward()
        return total.item()

    sides = {"glm5 (fused, at labels)": lambda: step("fused"), "at labels, unfused": lambda: step("labels"),
             "everywhere (reference)": lambda: step("everywhere")}
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses = {}
    for rnd in range(args.steps + 1):  # round 0 warms up
        items = list(sides.items())
        for name, fn in items[rnd % len(items):] + items[:rnd % len(items)]:
            t0 = time.perf_counter()
            losses[name] = fn()
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if rnd:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["everywhere (reference)"]
    print(f"{args.data} batch {args.rows} x {T}, {100 * den['labels0'] / den['queries0']:.0f}% of positions labelled, "
          f"{torch.get_num_threads()} threads, median of {args.steps}")
    print("| side | s/step (median) | loss | vs reference |\n|---|---:|---:|---:|")
    for k in sides:
        print(f"| {k} | {med[k]:.3f} | {losses[k]:.5f} | {ref / med[k]:.2f}x |")


if __name__ == "__main__":
    main()
