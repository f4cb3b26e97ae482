"""Associative recall for memory layers (in the style of Zoology's MQAR), small enough for a CPU.

A sequence is random filler tokens with `n_pairs` facts planted in it: a key of `key_len` tokens
followed by its value token. Later each key comes back as a query, and the model must predict
the value token that followed it. Filler, keys and values use disjoint token ranges, and only the
value token after a query carries a target (-100 elsewhere), so the loss measures recall only.
When the distance from fact to query exceeds the attention window, recall can only come from a
memory: sliding-window attention alone scores chance (1 / n_values).

`RecallTask.batch` draws training batches (facts in the first half, queries in the second, each
query at least `min_gap` tokens after its fact); `RecallTask.at_distance` builds evaluation
sequences where every query sits exactly `distance` tokens after its fact. `train_recall` and
`recall_accuracy` are the small training loop and the metric that the tests and
`tools/recall_bench.py` share.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .layers import param_groups

IGNORE = -100


@dataclass(frozen=True)
class RecallTask:
    n_filler: int = 128
    n_keys: int = 32        # key alphabet; a key is `key_len` tokens from it
    n_values: int = 64
    key_len: int = 2
    n_pairs: int = 16

    def __post_init__(self) -> None:
        for name in ("n_filler", "n_keys", "n_values", "key_len", "n_pairs"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if self.n_keys ** self.key_len < self.n_pairs:
            raise ValueError(f"n_pairs: {self.n_pairs} distinct keys do not exist with n_keys="
                             f"{self.n_keys}, key_len={self.key_len}")

    @property
    def vocab_size(self) -> int:
        return self.n_filler + self.n_keys + self.n_values

    @property
    def fact_len(self) -> int:
        return self.key_len + 1

    def _facts(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Distinct keys (n_pairs, key_len) and their values (n_pairs,) as token ids."""
        seen, keys = set(), []
        while len(keys) < self.n_pairs:
            k = tuple(int(x) for x in rng.integers(0, self.n_keys, self.key_len))
            if k not in seen:
                seen.add(k)
                keys.append(k)
        keys_a = np.asarray(keys, dtype=np.int64) + self.n_filler
        values = rng.integers(0, self.n_values, self.n_pairs) + self.n_filler + self.n_keys
        return keys_a, values

    def _slots(self, rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
        """n_pairs non-overlapping fact positions in [lo, hi), sorted."""
        L = self.fact_len
        room = (hi - lo) - self.n_pairs * L
        if room < 0:
            raise ValueError(f"seq_len: too short for {self.n_pairs} facts of {L} tokens")
        gaps = np.sort(rng.integers(0, room + 1, self.n_pairs))
        return lo + gaps + np.arange(self.n_pairs) * L

    def _plant(self, seq: np.ndarray, tgt: np.ndarray, pos: int, key: np.ndarray, value: int,
               query: bool) -> None:
        L = self.key_len
        seq[pos:pos + L] = key
        seq[pos + L] = value
        if query:
            tgt[pos + L - 1] = value  # predicted from the last key token

    def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int, min_gap: int = 0):
        """Training batch: inputs (B, T), targets (B, T) (-100 except at query values).

        Facts lie in the first half and queries (in random order) in the second; a query comes at
        least `min_gap` tokens after its fact."""
        inputs = rng.integers(0, self.n_filler, (batch_size, seq_len))
        targets = np.full((batch_size, seq_len), IGNORE, dtype=np.int64)
        half = seq_len // 2
        for b in range(batch_size):
            keys, values = self._facts(rng)
            fpos = self._slots(rng, 0, max(half - min_gap, self.n_pairs * self.fact_len))
            qpos = self._slots(rng, half, seq_len)
            order = rng.permutation(self.n_pairs)
            for i in range(self.n_pairs):
                self._plant(inputs[b], targets[b], int(fpos[i]), keys[i], int(values[i]), False)
            for j, i in enumerate(order):
                self._plant(inputs[b], targets[b], int(qpos[j]), keys[i], int(values[i]), True)
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def at_distance(self, rng: np.random.Generator, batch_size: int, distance: int,
                    spread: Optional[int] = None):
        """Evaluation batch: each query exactly `distance` tokens after its fact (so the
        sequence is about distance + spread long; `spread` defaults to 4 x the facts' length)."""
        spread = spread or 4 * self.n_pairs * self.fact_len
        if distance < spread:
            raise ValueError(f"distance: must be >= {spread} (the span of the facts), got {distance}")
        seq_len = distance + spread
        inputs = rng.integers(0, self.n_filler, (batch_size, seq_len))
        targets = np.full((batch_size, seq_len), IGNORE, dtype=np.int64)
        for b in range(batch_size):
            keys, values = self._facts(rng)
            fpos = self._slots(rng, 0, spread)
            for i in range(self.n_pairs):
                self._plant(inputs[b], targets[b], int(fpos[i]), keys[i], int(values[i]), False)
                self._plant(inputs[b], targets[b], int(fpos[i]) + distance, keys[i], int(values[i]), True)
        return torch.from_numpy(inputs), torch.from_numpy(targets)


def recall_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(mean cross entropy over the query values, correct argmax count, query count) of a
    training forward."""
    logits, _ = model(inputs, use_cache=False)
    sel = targets != IGNORE
    lg, tg = logits[sel], targets[sel]
    loss = F.cross_entropy(lg, tg)
    return loss, int((lg.argmax(-1) == tg).sum()), int(tg.numel())


@torch.no_grad()
def recall_accuracy(model, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[int, int]:
    """(correct, total) argmax recall of the query values; the whole sequence is one read."""
    was = model.training
    model.eval()
    try:
        _, correct, total = recall_loss(model, inputs, targets)
    finally:
        model.train(was)
    return correct, total


def train_recall(model, task: RecallTask, *, steps: int, batch_size: int, seq_len: int,
                 min_gap: int = 0, lr: float = 3e-3, seed: int = 0, weight_decay: float = 0.0,
                 warmup: int = 20, log: Optional[Callable[[Dict], None]] = None,
                 log_every: int = 25) -> Dict[str, float]:
    """AdamW on the recall loss (cosine schedule, clip 1.0). Returns the last logged numbers."""
    gen = np.random.default_rng(seed)
    opt = torch.optim.AdamW(param_groups(model, weight_decay=weight_decay), lr=lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    acc = [0, 0, 0.0]
    rec: Dict[str, float] = {}
    for step in range(steps):
        x, y = task.batch(gen, batch_size, seq_len, min_gap)
        loss, c, n = recall_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        acc[0] += c
        acc[1] += n
        acc[2] += float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            k = log_every if (step + 1) % log_every == 0 else (step + 1) % log_every
            rec = {"step": step + 1, "loss": acc[2] / k, "train_acc": acc[0] / max(1, acc[1]),
                   "seconds": time.time() - t0}
            if log is not None:
                log(rec)
            acc = [0, 0, 0.0]
    return rec
