"""StreamingReader: streaming equals the one-shot forward, snapshot/resume equals an
uninterrupted read, constant memory, document types, and the `stream` command."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fwpkm_ext
from fwpkm_ext.model import LM, LMConfig
from fwpkm_ext.cli.stream import main
from fwpkm_ext.stream import (
    ByteTokenizer, StreamingReader, SyntheticTokens, TokenSource, load_snapshot, position_buckets)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fwpkm_ext.__file__)))

SMALL = dict(vocab_size=300, dim=32, n_layers=2, n_heads=2, window=16, fwpkm_layers=[1],
             fwpkm_n_subkeys=8, fwpkm_k_dim=8, fwpkm_v_dim=16, fwpkm_topk=4, fwpkm_chunk_size=24)


def small_model(seed=0, **over):
    torch.manual_seed(seed)
    return LM(LMConfig.preset("tiny", **{**SMALL, **over})).eval()


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SMALL["vocab_size"], (230,), generator=g)


def reader(model, **kw):
    kw.setdefault("segment_tokens", 40)
    kw.setdefault("bucket_tokens", 32)
    kw.setdefault("progress", False)
    return StreamingReader(model, **kw)


def one_shot_nll(model, x):
    with torch.no_grad():
        logits, _ = model(x[None], use_cache=False)
    lp = torch.log_softmax(logits[0, :-1].double(), -1)
    return logits[0], -lp.gather(-1, x[1:, None]).squeeze(-1)


def streamed_logits(rd, doc, **kw):
    parts = []
    rep = rd.read(doc, on_segment=lambda pos, x, lg: parts.append((pos, lg[0].clone())), **kw)
    assert [p for p, _ in parts] == sorted(p for p, _ in parts)
    return rep, torch.cat([lg for _, lg in parts])


# ------------------------------------------------------------------------------------------
# equality with the one-shot forward
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("segment", [40, 17, 230])
def test_streaming_equals_one_shot(model, tokens, segment):
    ref_logits, ref_nll = one_shot_nll(model, tokens)
    rd = reader(model, segment_tokens=segment, keep_token_nll=True)
    rep, logits = streamed_logits(rd, tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rep.token_nll, ref_nll.numpy(), rtol=1e-4, atol=1e-4)
    assert rep.tokens == 230 and rep.predicted == 229 and rep.complete
    assert rep.nll == pytest.approx(float(ref_nll.mean()), rel=1e-5)
    assert rep.ppl == pytest.approx(float(torch.exp(ref_nll.mean())), rel=1e-4)
    # buckets [0,32) [32,64) [64,128) [128,256): counts and sums add up
    assert [(b.lo, b.hi, b.tokens) for b in rep.buckets] == [
        (0, 32, 31), (32, 64, 32), (64, 128, 64), (128, 256, 102)]
    assert sum(b.nll_sum for b in rep.buckets) == pytest.approx(float(ref_nll.sum()), rel=1e-5)
    assert rep.buckets[2].nll == pytest.approx(float(ref_nll[63:127].mean()), rel=1e-4)
    assert rep.segments == -(-230 // segment)
    assert set(rep.telemetry) == {1}
    t = rep.telemetry[1]
    assert t["tokens"] == 230 and 0 < t["coverage"] <= 1 and 0 <= t["collision_rate"] < 1


def test_streaming_equals_one_shot_float64(tokens):
    m = small_model().double()
    assert m.blocks[1].fwpkm.init_values.dtype == torch.float64
    ref_logits, ref_nll = one_shot_nll(m, tokens)
    rep, logits = streamed_logits(reader(m, segment_tokens=23, keep_token_nll=True), tokens)
    torch.testing.assert_close(logits.double(), ref_logits.double(), rtol=1e-5, atol=1e-5)
    assert abs(rep.nll - float(ref_nll.mean())) < 1e-6


def test_full_read_mode_equals_one_update_per_document(model, tokens):
    """update_chunk=None: no window completes while reading = a model whose chunk is larger
    than the document; the final flush writes every token once."""
    big = LM(model.cfg.replace(fwpkm_chunk_size=10_000)).eval()
    big.load_state_dict(model.state_dict())
    ref_logits, _ = one_shot_nll(big, tokens)
    rd = reader(model, update_chunk=None)
    rep, logits = streamed_logits(rd, tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert rep.update_chunk is None
    st = rd.cache.mem[1]
    assert st.pending == 0  # flushed at the end
    # the flush wrote the memory: tables differ from the initial ones
    assert not torch.equal(st.values[0], model.blocks[1].fwpkm.init_values)
    # and the flushed state equals the one-shot update of the big-chunk layer over the document
    with torch.no_grad():
        h = model.embed(tokens[None])
        blk0 = model.blocks[0]
        h, _, _, _ = blk0(h, 0, None, None, False)
        _, ref_state = big.blocks[1].fwpkm(h, state=big.blocks[1].fwpkm.init_state(1))
    torch.testing.assert_close(st.values, ref_state.values, rtol=1e-4, atol=1e-5)


def test_update_chunk_override(model, tokens):
    rd = reader(model, update_chunk=7)
    rep = rd.read(tokens)
    assert rd.cache.mem[1].config.chunk_size == 7 and rep.update_chunk == 7
    m7 = LM(model.cfg.replace(fwpkm_chunk_size=7)).eval()
    m7.load_state_dict(model.state_dict())
    _, ref_nll = one_shot_nll(m7, tokens)
    assert rep.nll == pytest.approx(float(ref_nll.mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------
# snapshot / resume
# ------------------------------------------------------------------------------------------
def test_snapshot_resume_identical(model, tokens, tmp_path):
    _check_snapshot_resume(model, tokens, tmp_path)


def test_snapshot_resume_identical_with_short_conv(tokens, tmp_path):
    m = small_model(fwpkm_short_conv=3)
    _check_snapshot_resume(m, tokens, tmp_path)
    # and streamed equals one shot
    rep, lg = streamed_logits(reader(m), tokens)
    ref, nll = one_shot_nll(m, tokens)
    torch.testing.assert_close(lg, ref, rtol=1e-4, atol=1e-4)


def _check_snapshot_resume(model, tokens, tmp_path):
    full_rd = reader(model, keep_token_nll=True)
    full = full_rd.read(tokens)

    rd = reader(model, keep_token_nll=True)
    part = rd.read(tokens, stop_at=90)  # pauses at the segment boundary 120
    assert not part.complete and part.tokens == 120 and rd.paused
    path = tmp_path / "snap.pt"
    rd.snapshot(path)
    payload = torch.load(path, weights_only=True)  # weights_only-safe contents
    assert payload["version"] == 1 and payload["pos"] == 120

    rd2 = reader(model, keep_token_nll=True).resume(path)
    rest = rd2.read(tokens)
    assert rest.complete and not rd2.paused
    assert rest.nll_sum == full.nll_sum and rest.predicted == full.predicted
    assert [(b.lo, b.tokens, b.nll_sum) for b in rest.buckets] == \
        [(b.lo, b.tokens, b.nll_sum) for b in full.buckets]
    np.testing.assert_array_equal(rest.token_nll, full.token_nll)
    assert rest.telemetry == full.telemetry
    a, b = rd2.cache.mem[1], full_rd.cache.mem[1]
    assert torch.equal(a.values, b.values) and torch.equal(a.keys, b.keys)
    for (k1, v1), (k2, v2) in zip(rd2.cache.kv, full_rd.cache.kv):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert rest.tokens_timed == 230 - 120  # only its own part is timed

    # continuing in-process (same reader, same document again) is identical too
    rd3 = reader(model)
    rd3.read(tokens, stop_at=40)
    assert rd3.read(tokens).nll_sum == full.nll_sum


def test_snapshot_written_before_checksums_still_loads(model, tokens, tmp_path):
    """A version 1 snapshot as written before checksums and convolution tails: no checksum, no
    "conv" entry, memory states of state version 1 (which still carried extras)."""
    full = reader(model).read(tokens)
    rd = reader(model)
    rd.read(tokens, stop_at=80)
    rd.snapshot(tmp_path / "new.pt")
    old = torch.load(tmp_path / "new.pt", weights_only=True)
    del old["sha256"], old["conv"]
    for st in old["mem"].values():
        st["version"] = 1
    torch.save(old, tmp_path / "old.pt")
    rest = reader(model).resume(tmp_path / "old.pt").read(tokens)
    assert rest.complete and rest.nll_sum == full.nll_sum


def test_snapshot_every(model, tokens, tmp_path):
    path = tmp_path / "s.pt"
    full = reader(model).read(tokens)
    reader(model).read(tokens, snapshot_every=100, snapshot_path=path)
    assert load_snapshot(path)["pos"] == 200  # the last boundary crossed before the end
    rest = reader(model).resume(path).read(tokens)
    assert rest.nll_sum == full.nll_sum


def test_resume_rejects_mismatches(model, tokens, tmp_path):
    path = tmp_path / "snap.pt"
    rd = reader(model)
    rd.read(tokens, stop_at=80)
    rd.snapshot(path)
    with pytest.raises(ValueError, match="model config.*dim"):
        reader(small_model(dim=64)).resume(path)
    with pytest.raises(ValueError, match="other model weights"):
        reader(small_model(seed=5)).resume(path)
    with pytest.raises(ValueError, match="reader settings.*segment_tokens"):
        reader(model, segment_tokens=41).resume(path)
    with pytest.raises(ValueError, match="reader settings.*update_chunk"):
        reader(model, update_chunk=None).resume(path)
    other = tokens.clone()
    other[5] = (other[5] + 1) % 300
    with pytest.raises(ValueError, match="not the document"):
        reader(model).resume(path).read(other)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match="not a readable"):
        reader(model).resume(bad)
    p = torch.load(path, weights_only=True)
    p["version"] = 99
    torch.save(p, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="version"):
        reader(model).resume(tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="no read in progress"):
        reader(model).snapshot(tmp_path / "x.pt")


# ------------------------------------------------------------------------------------------
# constant memory, documents, batches
# ------------------------------------------------------------------------------------------
def test_warmup_changes_nothing(model, tokens):
    rd = reader(model)
    ref = rd.read(tokens)
    assert rd.warmup() > 0
    torch.manual_seed(123)
    before = torch.rand(1)
    rep = reader(model).read(tokens)
    assert rep.nll_sum == ref.nll_sum and rep.cpu_seconds > 0 and rep.tokens_timed == 230
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the global RNG is not used


def test_cache_size_does_not_grow(model):
    """What is carried between segments has the same size after 4x more tokens."""
    sizes = []
    for n in (240, 960):  # multiples of the update chunk (24): no pending tokens at the end
        rd = reader(model, flush_at_end=False)
        rep = rd.read(SyntheticTokens(n, 300, seed=3))
        sizes.append((rep.kv_bytes, rep.state_bytes))
    assert sizes[0] == sizes[1]


def test_document_types_agree(model, tokens, tmp_path):
    ref = reader(model).read(tokens).nll_sum
    assert reader(model).read(tokens.tolist()).nll_sum == ref
    assert reader(model).read(tokens.numpy()).nll_sum == ref
    assert reader(model).read(iter(tokens.tolist())).nll_sum == ref
    assert reader(model).read(int(t) for t in tokens).nll_sum == ref
    # synthetic tokens: lazy, any split gives the same ids
    syn = SyntheticTokens(500, 300, seed=7, block=64)
    ids = np.concatenate([syn.slice(0, 130), syn.slice(130, 500)])
    assert np.array_equal(ids, np.fromiter(iter(syn), dtype=np.int64))
    assert reader(model).read(syn).nll_sum == reader(model).read(ids).nll_sum
    # text and files through a tokenizer (UTF-8 bytes here)
    text = "Call me Ishmael. Some years ago\nnever mind how long precisely. " * 4
    ids = torch.tensor(list(text.encode()))
    r_ids = reader(model).read(ids).nll_sum
    assert reader(model, tokenizer=ByteTokenizer()).read(text).nll_sum == r_ids
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    for p in (tmp_path / "a.txt", str(tmp_path / "b.txt.gz")):
        assert reader(model, tokenizer=ByteTokenizer()).read(p).nll_sum == r_ids
    with pytest.raises(ValueError, match="needs a tokenizer"):
        reader(model).read(text)
    with pytest.raises(FileNotFoundError):
        reader(model, tokenizer=ByteTokenizer()).read(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        reader(model).read([1, 2, 300])
    assert reader(model).read(TokenSource(tokens).limit(100)).tokens == 100


def test_read_many_matches_single_reads(model, tokens):
    docs = [tokens, tokens[:150], tokens[:61]]
    singles = [reader(model).read(d) for d in docs]
    rep = reader(model, batch_size=2).read_many(docs)
    assert [d["tokens"] for d in rep.documents] == [230, 150, 61]
    for d, s in zip(rep.documents, singles):
        assert d["nll_sum"] == pytest.approx(s.nll_sum, rel=1e-5)
    assert rep.predicted == sum(s.predicted for s in singles)
    assert rep.nll_sum == pytest.approx(sum(s.nll_sum for s in singles), rel=1e-5)


def test_position_buckets():
    assert position_buckets(1, 1024) == [(0, 1024)]
    assert position_buckets(5000, 1024) == [(0, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
    assert position_buckets(4096, 1024)[-1] == (2048, 4096)
    assert position_buckets(0) == []


def test_bad_arguments(model):
    for kw in ({"segment_tokens": 0}, {"update_chunk": 0}, {"update_chunk": "x"}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            StreamingReader(model, **kw)
    with pytest.raises(TypeError, match="iterable of token ids"):
        reader(model).read(3.5)


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------
CLI_MODEL = ["--preset", "tiny", "--random-init", "--config", json.dumps(SMALL)]


def test_stream_cli_synthetic(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(CLI_MODEL + ["--synthetic-tokens", "300", "--segment-tokens", "64",
                           "--bucket-tokens", "64", "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "tokens/s" in text and "ms/token" in text and "[64, 128)" in text
    assert "memory layer 1: tokens=300" in text
    d = json.loads(out.read_text())
    assert d["tokens"] == 300 and d["buckets"][0]["label"] == "[0, 64)" and d["complete"]


def test_stream_cli_text_snapshot_resume(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("It was the best of times, it was the worst of times.\n" * 8, encoding="utf-8")
    common = CLI_MODEL + [str(doc), "--segment-tokens", "50", "--no-progress"]
    assert main(common + ["--json", str(tmp_path / "full.json")]) == 0
    snap = tmp_path / "snap.pt"
    assert main(common + ["--stop-at", "120", "--snapshot", str(snap)]) == 0
    assert "paused at token 150" in capsys.readouterr().out
    assert main(CLI_MODEL + [str(doc), "--no-progress", "--resume", str(snap),
                             "--json", str(tmp_path / "rest.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    rest = json.loads((tmp_path / "rest.json").read_text())
    assert rest["nll_sum"] == full["nll_sum"] and rest["tokens"] == full["tokens"] == 424


def test_stream_cli_errors(tmp_path, capsys):
    # no model arguments: the bundled default model; half a random-init spec is an error
    assert main(["--preset", "tiny", "--synthetic-tokens", "10", "--no-progress"]) == 2
    assert "--model CKPT" in capsys.readouterr().err
    assert main(CLI_MODEL + ["--no-progress"]) == 2
    assert "PATH or --synthetic-tokens" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nope"), "--synthetic-tokens", "5"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(CLI_MODEL + ["--synthetic-tokens", "10", "--resume", str(tmp_path / "x.pt")]) == 2


def test_stream_module_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fwpkm_ext.stream"] + CLI_MODEL +
                       ["--synthetic-tokens", "200", "--segment-tokens", "64", "--no-progress",
                        "--threads", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and "peak RSS" in r.stdout
