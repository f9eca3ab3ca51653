"""Asynchronous RL in the slime style, as pure pieces a loop composes: `loss` (GRPO advantages, the IcePop / TIS
off-policy correction of each generated token, and the PPO clip-higher surrogate with token-level normalisation,
computed from the final hidden states through the fused vocabulary-head loss so the [N, V] logits never exist),
`buffer` (groups of samples admitted under a bound on policy staleness, oldest first, dynamic sampling, counters and a
staleness histogram that survive a checkpoint), and `rewards` (the honesty reward built on the eval's own scoring,
a `module:function` hook for user reward functions, and a call wrapper that turns their failures into a logged skip).
Nothing here samples, trains or talks to another process: the loop does.

Letters: N loss tokens (generated tokens with loss mask 1, flattened over a batch), G samples of one prompt (a
group), T tokens of one sample, V vocabulary, D model dim.
"""
