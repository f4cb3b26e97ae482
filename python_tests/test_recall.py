"""fwpkm_ext.recall: the associative-recall task, and the fast check that a model learns to
recall through the memory (values written beyond any attention window, read back later)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from fwpkm_ext.model import LM, LMConfig
from fwpkm_ext.recall import IGNORE, RecallTask, recall_accuracy, train_recall


def _fact_of(x, t, key_len):
    """Position of the first occurrence of the key that ends at t (the fact)."""
    key = x[t - key_len + 1: t + 1].tolist()
    for f in range(key_len - 1, t):
        if x[f - key_len + 1: f + 1].tolist() == key:
            return f
    raise AssertionError("query without a fact")


@pytest.mark.parametrize("key_len", [1, 3])
def test_batch_layout(key_len):
    task = RecallTask(n_filler=20, n_keys=6, n_values=9, key_len=key_len, n_pairs=5)
    x, y = task.batch(np.random.default_rng(0), 3, 200, min_gap=40)
    assert x.shape == y.shape == (3, 200) and x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < task.vocab_size
    for b in range(3):
        q = (y[b] != IGNORE).nonzero().flatten().tolist()
        assert len(q) == task.n_pairs
        for t in q:
            v = int(y[b, t])
            assert task.n_filler + task.n_keys <= v < task.vocab_size
            assert int(x[b, t + 1]) == v  # the value follows the query's key
            f = _fact_of(x[b], t, key_len)
            assert int(x[b, f + 1]) == v and t - f >= 40


def test_at_distance_is_exact():
    task = RecallTask(n_filler=30, n_keys=8, n_values=10, key_len=2, n_pairs=6)
    x, y = task.at_distance(np.random.default_rng(1), 2, 500)
    for b in range(2):
        for t in (y[b] != IGNORE).nonzero().flatten().tolist():
            assert t - _fact_of(x[b], t, 2) == 500
    with pytest.raises(ValueError, match="distance"):
        task.at_distance(np.random.default_rng(1), 1, 10)


def test_task_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_pairs"):
        RecallTask(n_keys=2, key_len=1, n_pairs=3)
    with pytest.raises(ValueError, match="key_len"):
        RecallTask(key_len=0)
    with pytest.raises(ValueError, match="seq_len"):
        RecallTask(n_pairs=16).batch(np.random.default_rng(0), 1, 40)


def test_a_model_learns_to_recall_through_the_memory():
    """A 1-layer model whose attention sees only the current token (window 1) must learn to
    recall values written hundreds of tokens earlier: only the fast weights can carry them.
    Read again with the fast-weight step at 0 (nothing written), the same model is at chance."""
    torch.set_num_threads(2)
    task = RecallTask(n_filler=128, n_keys=32, n_values=64, key_len=2, n_pairs=8)
    cfg = LMConfig(vocab_size=task.vocab_size, dim=128, n_layers=1, n_heads=2, window=1,
                   fwpkm_layers=[0], fwpkm_n_subkeys=64, fwpkm_k_dim=64, fwpkm_v_dim=128,
                   fwpkm_topk=8, fwpkm_chunk_size=32, fwpkm_short_conv=2)
    torch.manual_seed(0)
    model = LM(cfg)
    train_recall(model, task, steps=100, batch_size=8, seq_len=256, min_gap=32, lr=3e-3, seed=0)
    x, y = task.at_distance(np.random.default_rng(7), 8, 1024)
    correct, total = recall_accuracy(model, x, y)
    chance = 1 / task.n_values
    assert total == 64
    assert correct / total >= 0.3, f"recall {correct}/{total} (chance {chance:.1%})"
    fw = model.blocks[0].fwpkm
    fw.config = replace(fw.config, lr=0.0)  # the memory keeps its initial tables
    c0, _ = recall_accuracy(model, x, y)
    assert c0 / total <= 4 * chance, f"recall without writing {c0}/{total}"


def test_recall_bench_smoke(tmp_path, capsys):
    """tools/recall_bench.py runs end to end and writes its table and JSON."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "recall_bench.py")
    spec = importlib.util.spec_from_file_location("recall_bench", path)
    rb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rb)
    out = tmp_path / "rb.json"
    assert rb.main(["--only", "swa,layer0", "--setting", "easy", "--steps", "2", "--threads", "1",
                    "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| config |" in text and "layer0" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["swa", "layer0"]
    assert rows[1]["recall"]["1024"]["total"] == 32 and "query_pr" in rows[1]
    with pytest.raises(SystemExit):
        rb.main(["--only", "nope"])
