"""Pure schedule functions (step -> coefficient), in dictionary_learning's style."""

from typing import Callable


def linear_warmup(final_value: float, warmup_frac: float, total_steps: int) -> Callable[[int], float]:
    """Coefficient rising linearly from 0 to ``final_value`` over the first ``warmup_frac`` of steps.

    ``warmup_frac=0`` means the full value from step 0 (no warm-up).
    """
    if not 0.0 <= warmup_frac <= 1.0:
        raise ValueError(f"warmup_frac={warmup_frac} must lie in [0, 1]")
    warmup_steps = warmup_frac * total_steps

    def schedule(step: int) -> float:
        if warmup_steps <= 0 or step >= warmup_steps:
            return final_value
        return final_value * step / warmup_steps

    return schedule
