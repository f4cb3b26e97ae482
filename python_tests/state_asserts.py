"""Test helper shared by the state and file tests: two memory states hold the same thing."""
import torch

from fwpkm_ext import MemoryState

TENSORS = ("keys", "values", "pending_q", "pending_v", "pending_g", "pending_mask",
           "pending_idx", "pending_half_idx", "slot_reads")


def assert_same_state(a: MemoryState, b: MemoryState) -> None:
    assert a.config == b.config and a.per_sequence == b.per_sequence
    assert a.tokens == b.tokens and a.gate_sum == b.gate_sum and a.extras == b.extras
    for name in TENSORS:
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
