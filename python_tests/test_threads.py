"""fwpkm_ext.threads: one intra-op thread while other processes keep the cores busy, all of them
again when they stop (the /proc/stat reading is replaced by a scripted one)."""
import pytest
import torch

from fwpkm_ext import threads


@pytest.fixture
def clock(monkeypatch):
    """Scripted machine: `busy` (all processes' busy CPU seconds), `own` and `now` advance by hand."""
    st = dict(now=100.0, busy=0.0, own=0.0)
    monkeypatch.setattr(threads, "_busy_seconds", lambda: st["busy"])
    monkeypatch.setattr(threads.time, "monotonic", lambda: st["now"])
    monkeypatch.setattr(threads.time, "process_time", lambda: st["own"])
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    old = torch.get_num_threads()
    yield st
    threads.disable()
    torch.set_num_threads(old)


def test_drops_to_one_thread_under_load_and_comes_back(clock):
    torch.set_num_threads(2)
    gov = threads.AdaptiveThreads(max_threads=2, interval=0.5)
    assert gov.tick() == 2
    clock["now"] += 1.0
    clock["busy"] += 1.9  # we used 0.9 s, someone else 1.0 s: one core is taken
    clock["own"] += 0.9
    assert gov.tick() == 1 and torch.get_num_threads() == 1
    assert gov.others == pytest.approx(1.0)
    clock["now"] += 0.2  # inside the interval: no new look
    clock["busy"] += 0.2
    assert gov.tick() == 1
    clock["now"] += 1.0
    clock["busy"] += 1.0  # only us again
    clock["own"] += 1.0
    assert gov.tick() == 2 and torch.get_num_threads() == 2


def test_enable_disable_and_memory_step_ticks(clock):
    torch.set_num_threads(2)
    threads.enable(max_threads=2, interval=0.5)
    clock["now"] += 1.0
    clock["busy"] += 1.5
    clock["own"] += 0.4  # 1.1 cores of others
    from fwpkm_ext import FwPKM

    layer = FwPKM(8, n_subkeys=4, mem_k_dim=4, mem_v_dim=4, topk=2, chunk_size=4).eval()
    with torch.no_grad():
        layer(torch.randn(1, 5, 8), layer.init_state(1))
    assert torch.get_num_threads() == 1
    threads.disable()
    assert torch.get_num_threads() == 2


def test_bad_max_threads():
    with pytest.raises(ValueError, match="^max_threads"):
        threads.AdaptiveThreads(max_threads=0)
