"""An SFT step's forward + backward: the vocabulary head at labelled positions only (glm5.train.losses.head_ce_sum,
what ForwardLoss does) against the head over every position with ignore_index (the reference), same weights, same
batch, one process.

    .venv/bin/python bench/sft_step.py [--rows 8] [--seq 1152] [--steps 6] [--threads 2]

The batch: the speedrun's SFT chats (glm5.speedrun.pipeline.sft_examples, the FULL recipe) rendered with the shipped
tokenizer and packed as the SFT packs them; the model: the shipped model's shape with seeded random weights (the
cost does not depend on the values), dense attention, one MTP depth, fp32. Sides alternate within each round, so
load from other processes hits both alike; the table reports medians and the ratio. Both sides' losses are printed
so that a reader sees they compute the same thing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1152)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from glm5.api import load_model
    from glm5.server.launch import ASSET_MODEL_DIR
    from glm5.speedrun.pipeline import sft_examples
    from glm5.speedrun.recipe import FULL
    from glm5.tokenizer import Tokenizer
    from glm5.train.data import Packer
    from glm5.train.loop import set_stage
    from glm5.train.losses import IGNORE, ForwardLoss, loss_denominators, shifted_labels
    from glm5.train.sft import ChatDocs

    tok = Tokenizer.from_dir(ASSET_MODEL_DIR)
    model = load_model(ASSET_MODEL_DIR / "config.json", dtype=torch.float32, seed=0)
    model.train()
    set_stage(model, "pretrain", 1)
    net = ForwardLoss(model, "pretrain", mtp_depth=1, balance_weight=0.0)
    docs = list(ChatDocs(sft_examples(FULL, tok, 3)[:4 * args.rows], tok))
    b = Packer(docs, args.rows, args.seq, model.config.vocab_size).next_batch()
    toks, doc, pos, loss = b.tokens_BT1, b.doc_BT1, b.pos_BT1, b.loss_BT1
    den = loss_denominators(toks, doc, 1, loss)
    T = args.seq

    def labelled():
        total, _, _ = net(toks, doc, pos, den, loss)
        total.backward()
        return total.item()

    def every_position():
        h = model.hidden(toks[:, :-1], pos[:, :-1], None, doc[:, :-1])
        lm = F.cross_entropy(model.lm_head(h).flatten(0, 1), shifted_labels(toks, doc, 1, T, loss).flatten(),
                             ignore_index=IGNORE, reduction="sum")
        logits, _ = model.mtp_step(h[:, :T - 1], toks[:, 1:T], pos[:, :T - 1], 0, None, doc[:, :T - 1])
        mtp = F.cross_entropy(logits.flatten(0, 1), shifted_labels(toks, doc, 2, T - 1, loss).flatten(),
                              ignore_index=IGNORE, reduction="sum")
        total = lm / den["labels0"] + 0.3 * mtp / den["labels1"]
        total.backward()
        return total.item()

    sides = {"head at labels (glm5)": labelled, "head everywhere (reference)": every_position}
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses = {}
    for rnd in range(args.steps + 1):  # round 0 warms up
        for name, fn in (sides.items() if rnd % 2 else reversed(sides.items())):
            t0 = time.perf_counter()
            losses[name] = fn()
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if rnd:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["head everywhere (reference)"]
    print(f"batch {args.rows} x {T}, {100 * den['labels0'] / den['queries0']:.0f}% of positions labelled, "
          f"{torch.get_num_threads()} threads, median of {args.steps}")
    print("| side | s/step (median) | loss | vs reference |\n|---|---:|---:|---:|")
    for k in sides:
        print(f"| {k} | {med[k]:.3f} | {losses[k]:.5f} | {ref / med[k]:.2f}x |")


if __name__ == "__main__":
    main()
