"""Shared pytest setup for the python_tests suite."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test with a single intra-op thread (torch and the native kernels share libgomp);
    a test that needs more sets them itself.

    The tests use tiny shapes: on a small, busy machine OpenMP spin-waiting costs far more than
    the parallel work saves.  The previous thread count is restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def window_step_calls(monkeypatch):
    """Counts the calls of fwpkm_ext._native.window_step (the fused in-place window) during the
    test: {"n": count}. The real kernel still runs."""
    from fwpkm_ext import _native
    calls = {"n": 0}
    real = _native.window_step

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(_native, "window_step", counting)
    return calls
