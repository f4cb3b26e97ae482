"""Needle generator and scorer, the n-iter protocol, and the `eval ppl`, `eval memory` and
`niah` commands end to end on a tiny random checkpoint."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")
pytest.importorskip("safetensors")

import fwpkm_ext  # noqa: E402
from fwpkm_ext.cli import niah  # noqa: E402
from fwpkm_ext.data import needle_query, needle_sentence, split_documents  # noqa: E402
from fwpkm_ext.cli.eval import main as eval_main  # noqa: E402
from fwpkm_ext.evaluate import GateStats, held_out_documents, memory_report  # noqa: E402
from fwpkm_ext.model import LM, LMCache, LMConfig  # noqa: E402
from fwpkm_ext.niah import (  # noqa: E402
    build_sample, evaluate_samples, extract_answer, haystack_tokens, make_needles, query_reserve,
    read_context, score_answer, summarize)
from fwpkm_ext.stream import FULL_READ_CHUNK, ByteTokenizer, StreamingReader, SyntheticTokens  # noqa: E402
from fwpkm_ext.tokenizer import train_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fwpkm_ext.__file__)))
WORDS = ("the a cat dog bird sat ran on under near mat tree hill red old and then while it was "
         "night day secret number for is ID one two").split()
SMALL = dict(dim=32, n_layers=2, n_heads=2, window=16, fwpkm_layers=[1], fwpkm_n_subkeys=8,
             fwpkm_k_dim=8, fwpkm_v_dim=16, fwpkm_topk=4, fwpkm_chunk_size=32)


def write_docs(root, n_docs=4, lines=60, seed=0):
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    for d in range(n_docs):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize()
                         + f" {rng.randrange(10 ** 6):06d}." for _ in range(lines))
        with open(os.path.join(root, f"book{d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return str(root)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_docs(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=320)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus, tok):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = LM(LMConfig.preset("tiny", vocab_size=tok.vocab_size, **SMALL))
    model.save_pretrained(str(d))
    tok.save(str(d / "tokenizer.model"))
    with open(d / "train_args.json", "w") as f:
        json.dump({"corpus": corpus, "val_fraction": 0.5, "seed": 3}, f)
    return str(d)


# ------------------------------------------------------------------------------------------
# needles and scoring
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spm", "bytes"])
def test_needle_generator(kind, tok, corpus):
    t = tok if kind == "spm" else ByteTokenizer()
    hay = haystack_tokens([("x", open(os.path.join(corpus, "book0.txt")).read())], t)
    for length in (700, 2048):
        s = build_sample(hay, t, length, random.Random(f"s{length}"))
        assert len(s.context) == length - query_reserve(t)
        assert len(s.needles) == 5 and len({n.key for n in s.needles}) == 5
        for n, q in zip(s.needles, s.queries):
            assert len(n.key) == 4 and all(c in "0123456789abcdef" for c in n.key)
            assert len(n.number) == 6 and n.number.isdigit()
            # the needle sentence is at the stated position and depth, on a line of its own
            assert t.decode(s.context[n.start: n.start + n.tokens].tolist()) == \
                needle_sentence(n.key, n.number)
            assert n.depth == n.start / len(s.context) and 0 <= n.depth < 1
            assert t.decode(s.context[n.start - 1: n.start].tolist()) == "\n"
            assert t.decode(q.tolist()) == "\n" + needle_query(n.key)
            assert len(q) <= query_reserve(t)
        # the text outside the needles is the haystack, in order (cyclic from an offset)
        keep = np.ones(len(s.context), bool)
        for n in s.needles:
            keep[n.start - 1: n.start + n.tokens + 1] = False
        filler = s.context[keep]
        assert any(np.array_equal(np.take(hay, np.arange(i, i + len(filler)), mode="wrap"), filler)
                   for i in np.nonzero(hay == filler[0])[0]), "filler is not a cyclic slice"
        # reproducible from the seed
        s2 = build_sample(hay, t, length, random.Random(f"s{length}"))
        assert np.array_equal(s.context, s2.context) and s.needles == s2.needles
    # depths are spread: over many samples every depth fifth gets needles
    depths = [n.depth for i in range(20)
              for n in build_sample(hay, t, 1024, random.Random(i)).needles]
    assert {int(d * 5) for d in depths} == {0, 1, 2, 3, 4}


def test_needle_keys_unique():
    pairs = make_needles(random.Random(0), 3000)  # birthday collisions are certain: all removed
    assert len({k for k, _ in pairs}) == 3000


def test_too_short_length(tok):
    with pytest.raises(ValueError, match="too short"):
        build_sample(np.arange(50), tok, 100, random.Random(0))


def test_score_answer():
    assert score_answer("123456", "123456")
    assert score_answer(" 123456.", "123456")
    assert score_answer("123456\nThe", "123456")
    for wrong in ("12345", "1234567", "123457", "023456", "", " ", "a123456", "123 456",
                  "12345.6", "\n\n\n"):
        assert not score_answer(wrong, "123456"), wrong
    assert extract_answer("  0042xyz") == "0042"


def test_summarize_counts_by_depth():
    recs = [{"length": 100, "iters": 1, "depth": d, "correct": c}
            for d, c in [(0.05, True), (0.15, False), (0.5, True), (0.99, True), (0.999, False)]]
    (r,) = summarize(recs, [100], [1], depth_buckets=5)
    assert (r["correct"], r["total"]) == (3, 5) and r["accuracy"] == 0.6
    assert [(b["correct"], b["total"]) for b in r["by_depth"]] == [(1, 2), (0, 0), (1, 1), (0, 0), (1, 2)]
    assert r["by_depth"][1]["accuracy"] is None


class _Counting:
    """Records the (position, length) of every forward call on a model."""

    def __init__(self, model):
        self.calls = []
        self.model = model
        self.orig = model.forward

    def __enter__(self):
        def fwd(tokens, cache=None, use_cache=True):
            self.calls.append((0 if cache is None else cache.pos, tokens.shape[1]))
            return self.orig(tokens, cache, use_cache)

        self.model.forward = fwd
        return self

    def __exit__(self, *a):
        del self.model.forward


def test_n_iter_protocol(ckpt, tok, corpus):
    model = LM.from_pretrained(ckpt).eval()
    hay = haystack_tokens([("x", open(os.path.join(corpus, "book1.txt")).read())], tok)
    samples = [build_sample(hay, tok, 512, random.Random(i)) for i in range(2)]
    L = len(samples[0].context)
    with _Counting(model) as c:
        recs = evaluate_samples(model, tok, samples, [1, 3], segment_tokens=128, max_new_tokens=3,
                                sample_ids=[4, 5])
    # context passes start at position 0 with fresh attention: 2 extra passes + 2 final ones
    ctx_passes = [p for p, n in c.calls if p == 0 and n == min(128, L)]
    assert len(ctx_passes) == 4
    assert len(recs) == 2 * 2 * 5
    assert {r["sample"] for r in recs} == {4, 5} and {r["iters"] for r in recs} == {1, 3}
    # batched evaluation equals one sample at a time
    one = evaluate_samples(model, tok, samples[1:], [1, 3], segment_tokens=128, max_new_tokens=3,
                           sample_ids=[5])
    assert [r["answer"] for r in recs if r["sample"] == 5] == [r["answer"] for r in one]


def test_extra_pass_writes_memory_final_pass_does_not(ckpt, tok, corpus):
    model = LM.from_pretrained(ckpt).eval()
    hay = haystack_tokens([("x", open(os.path.join(corpus, "book1.txt")).read())], tok)
    s = build_sample(hay, tok, 512, random.Random(0))
    x = torch.from_numpy(s.context)[None]
    layer = model.blocks[1].fwpkm
    # the final pass (update chunk = whole input) only reads: no pending kept, tables untouched
    st0 = layer.init_state(1, chunk_size=FULL_READ_CHUNK)
    _, cache = read_context(model, x, LMCache.empty(model, mem={1: st0}), 64, read_only=True)
    assert cache.mem[1].pending == 0 and torch.equal(cache.mem[1].values, st0.values)
    # an extra pass (chunk = context length) is one write at its end
    st1 = layer.init_state(1, chunk_size=x.shape[1])
    _, cache = read_context(model, x, LMCache.empty(model, mem={1: st1}), 64)
    assert cache.mem[1].pending == 0 and not torch.equal(cache.mem[1].values, st1.values)


# ------------------------------------------------------------------------------------------
# memory statistics
# ------------------------------------------------------------------------------------------
def test_gate_stats_match_telemetry(ckpt):
    model = LM.from_pretrained(ckpt).eval()
    rd = StreamingReader(model, segment_tokens=100, progress=False)
    rep, stats = memory_report(rd, SyntheticTokens(500, model.cfg.vocab_size, seed=1))
    s = stats[1]
    assert s["gate_mean"] == pytest.approx(rep.telemetry[1]["mean_gate"], rel=1e-5)
    assert 0 <= s["gate_min"] <= s["gate_p10"] <= s["gate_p50"] <= s["gate_p90"] <= s["gate_max"] <= 1
    assert s["slots_used"] == pytest.approx(s["coverage"] * 64)
    assert 1 <= s["effective_slots"] <= s["slots_used"]
    g = GateStats()
    g.hook(None, None, torch.zeros(1, 4, 1))
    assert g.summary()["gate_mean"] == 0.5 and g.quantile(0.5) == pytest.approx(0.5, abs=1e-3)


# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------
def test_held_out_split_follows_training_args(ckpt, corpus):
    got_corpus, docs, split = held_out_documents(None, ckpt)
    assert got_corpus == corpus and split["val_fraction"] == 0.5 and split["seed"] == 3
    files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
    assert [p for p, _ in docs] == split_documents(files, 0.5, 3)[1]


def test_eval_ppl_cli(ckpt, tmp_path, capsys):
    out, plot = tmp_path / "ppl.json", tmp_path / "ppl.png"
    rc = eval_main(["ppl", "--model", ckpt, "--segment-tokens", "100", "--bucket-tokens", "64",
                    "--no-progress", "--json", str(out), "--plot", str(plot)])
    text = capsys.readouterr().out
    assert rc == 0, text
    d = json.loads(out.read_text())
    assert len(d["documents"]) == 2 and d["split"]["seed"] == 3
    assert d["predicted"] == sum(x["predicted"] for x in d["documents"])
    assert "[0, 64)" in text and "tokens/s" in text
    from fwpkm_ext.plots import have_matplotlib

    if have_matplotlib():
        assert plot.stat().st_size > 1000 and "plot written" in text
    else:
        assert not plot.exists() and "needs matplotlib" in text
    # batched documents give the same numbers
    assert eval_main(["ppl", "--model", ckpt, "--segment-tokens", "100", "--bucket-tokens", "64",
                      "--no-progress", "--json", str(tmp_path / "b.json"), "--batch-size", "2",
                      "--no-plot"]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["nll_sum"] == pytest.approx(d["nll_sum"], rel=1e-5)


def test_eval_memory_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert eval_main(["memory", "--model", ckpt, "--max-tokens", "300", "--no-progress",
                      "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for k in ("coverage", "collision_rate", "kl_uniform", "gate_mean", "gate_p90"):
        assert k in text
    d = json.loads(out.read_text())
    assert d["tokens"] == 300 and 0 < d["layers"]["1"]["coverage"] <= 1
    # an explicit document, and synthetic tokens on an untrained preset
    doc = tmp_path / "d.txt"
    doc.write_text("the cat sat on the mat\n" * 20)
    assert eval_main(["memory", str(doc), "--model", ckpt, "--no-progress"]) == 0
    assert eval_main(["memory", "--preset", "tiny", "--random-init", "--config", json.dumps(SMALL),
                      "--synthetic-tokens", "200", "--no-progress"]) == 0
    assert "layer 1" in capsys.readouterr().out


def test_niah_cli_reproducible(ckpt, tmp_path, capsys):
    args = ["--model", ckpt, "--lengths", "512,768", "--iters", "1,2", "--samples", "2",
            "--segment-tokens", "128", "--max-new-tokens", "4", "--no-progress"]
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    assert niah.main(args + ["--json", str(out1)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "d0.0-0.2" in text
    assert niah.main(args + ["--json", str(out2), "--batch-size", "2", "--no-plot"]) == 0
    a, b = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert a["records"] == b["records"] and a["results"] == b["results"]
    assert len(a["results"]) == 4 and len(a["records"]) == 2 * 2 * 2 * 5
    for r in a["results"]:
        assert r["total"] == 10 and sum(x["total"] for x in r["by_depth"]) == 10
        assert 0 <= r["accuracy"] <= 1
    assert set(a["accuracy"]) == {"512", "768"} and set(a["accuracy"]["512"]) == {"1", "2"}
    # the held-out documents are the haystack
    assert a["documents"] == [p for p, _ in held_out_documents(None, ckpt)[1]]


def test_niah_cli_errors(ckpt, capsys):
    assert niah.main(["--model", ckpt, "--lengths", "40", "--samples", "1", "--no-progress"]) == 2
    assert "too short" in capsys.readouterr().err
    assert niah.main(["--model", ckpt, "--lengths", "x", "--no-progress"]) == 2
    assert niah.main(["--model", ckpt, "--wording", "no fields", "--no-progress"]) == 2
    assert "wording" in capsys.readouterr().err


def test_needles_in_another_wording(tok, corpus, ckpt, tmp_path, capsys):
    paths = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
    hay = haystack_tokens([(p, open(p, encoding="utf-8").read()) for p in paths], tok)
    w = "Box {key} opens with {number}."
    s = build_sample(hay, tok, 1024, random.Random(0), wording=w)
    text = tok.decode(s.context.tolist())
    for n in s.needles:
        assert f"Box {n.key} opens with {n.number}." in text
    assert all(tok.decode(q.tolist()).strip().startswith("Box ") for q in s.queries)
    out = tmp_path / "w.json"
    assert niah.main(["--model", ckpt, "--lengths", "512", "--iters", "2", "--samples", "1",
                      "--segment-tokens", "128", "--max-new-tokens", "4", "--no-progress",
                      "--wording", w, "--json", str(out), "--no-plot"]) == 0
    assert json.loads(out.read_text())["wording"] == w


def test_eval_module_subprocess(ckpt, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fwpkm_ext.niah", "--model", ckpt, "--lengths", "512",
                        "--iters", "2", "--samples", "1", "--no-progress", "--threads", "1",
                        "--json", "n.json"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "n.json").read_text())["iters"] == [2]
