"""Timing several trainers on the same batches: a warm-up, then round-robin rounds, median of rounds.

Warm-up: every contender trains on the same first ``warmup_steps`` batches, off the clock, so the timed steps
see the state training really has after that many tokens (the dead-latent window is 20,000 tokens: a
latent can only be dead, and auxK only run, once that many have passed). Timing: ``rounds`` rounds; in each,
every contender runs ``steps_per_round`` steps on the same batches, in an order that rotates from round to
round, so a burst of load from other processes on the machine hits each contender alike; the median of a
contender's rounds is its time.

Clock: ``"cpu"`` (the default) times a contender by the CPU time of this process (``time.process_time``),
``"wall"`` by the wall clock. With one torch thread the CPU time is the time the step computed, without the
time the scheduler gave the core to other processes: on a shared machine it is the stabler measure of the
same work (both are recorded; the ratios use the chosen one).

auxK's share: for a contender with auxK and dead latents at the end of the warm-up, a copy of it taken then
with auxK off races too; the share is 1 - (its time without auxK / its time with). Without dead latents
auxK does no work (the step only counts them), so the share is 0 without measuring it.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .contenders import Contender


@dataclass
class Result:
    label: str
    kind: str
    batch_size: int
    seconds: list[float] = field(default_factory=list)
    """Per round, for ``steps_per_round`` steps, by the race's clock."""
    wall_seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    steps_per_round: int = 1
    dead_after_warmup: int = 0
    timed_steps_with_dead: int = 0
    auxk_share: Optional[float] = None
    """Fraction of the step time that is auxK's (None: not measured; 0.0 when no latent was dead)."""
    warmup_seconds: float = 0.0

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.seconds) / self.steps_per_round

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size / self.median_step_s

    @property
    def wall_tokens_per_s(self) -> float:
        return self.batch_size * self.steps_per_round / statistics.median(self.wall_seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the rounds: how noisy this contender's measurement was."""
        return (max(self.seconds) - min(self.seconds)) / statistics.median(self.seconds)


def race(contenders: list[Contender], batch: Callable[[int], torch.Tensor], batch_size: int, warmup_steps: int,
         rounds: int, steps_per_round: int, auxk_twins: bool = True, log: Callable[[str], None] = lambda s: None,
         clock: str = "cpu") -> dict[str, Result]:
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock={clock!r} must be 'cpu' or 'wall'")
    results = {c.label: Result(c.label, c.kind, batch_size, steps_per_round=steps_per_round) for c in contenders}
    for c in contenders:  # warm-up, contender after contender (each keeps its own state)
        begin = time.perf_counter()
        for i in range(warmup_steps):
            c.step(batch(i))
        results[c.label].warmup_seconds = time.perf_counter() - begin
        results[c.label].dead_after_warmup = c.dead_latents()
    racing = list(contenders)
    twins: dict[str, str] = {}
    if auxk_twins:
        for c in contenders:
            if results[c.label].dead_after_warmup > 0:
                twin = c.without_auxk()
                if twin is not None:
                    racing.append(twin)
                    twins[c.label] = twin.label
                    results[twin.label] = Result(twin.label, c.kind, batch_size, steps_per_round=steps_per_round)
    for r in range(rounds):
        order = racing[r % len(racing):] + racing[: r % len(racing)]
        first = warmup_steps + r * steps_per_round
        for c in order:
            res = results[c.label]
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(steps_per_round):
                c.step(batch(first + i))
            res.wall_seconds.append(time.perf_counter() - wall)
            res.cpu_seconds.append(time.process_time() - cpu)
            res.seconds.append(res.cpu_seconds[-1] if clock == "cpu" else res.wall_seconds[-1])
            res.timed_steps_with_dead += steps_per_round if c.dead_latents() > 0 else 0
        log(f"round {r + 1}/{rounds} (load {os.getloadavg()[0]:.1f})")
    for label, res in list(results.items()):
        if label in twins.values():
            continue
        if label in twins:
            res.auxk_share = 1.0 - results[twins[label]].median_step_s / res.median_step_s
        elif res.dead_after_warmup == 0 and res.timed_steps_with_dead == 0:
            res.auxk_share = 0.0
    return results
