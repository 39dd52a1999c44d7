"""Reward functions for the RL tests: trivially learnable, broken on purpose, or unbounded."""


def brevity(prompts, completions, **columns):
    """1 for an empty completion, 0 at 40 characters or more: learnable from a random model."""
    return [1.0 - min(len(c), 40) / 40.0 for c in completions]


def raises_on_long(prompts, completions, **columns):
    """Fails for completions over 20 characters (a reward with a bug)."""
    out = []
    for c in completions:
        if len(c) > 20:
            raise ValueError("completion too long for this reward")
        out.append(1.0)
    return out


def infinite(prompts, completions, **columns):
    """An unbounded reward: every value is +inf, so advantages (inf - inf) are NaN."""
    return [float("inf")] * len(completions)
