"""Training CLI: loss falls, exact resume, torchrun (gloo) data parallel, clear errors."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sentencepiece")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

import fwpkm_ext  # noqa: E402
from fwpkm_ext.cli.train import add_subcommand as add_train_subcommands, main  # noqa: E402
from fwpkm_ext.train import lr_lambda  # noqa: E402
from test_data import write_corpus  # noqa: E402


SMALL = {"dim": 64, "n_layers": 2, "n_heads": 2, "window": 32, "vocab_size": 512,
         "fwpkm_layers": []}
COMMON = ["--seq-len", "64", "--batch-size", "4", "--val-fraction", "0.25", "--val-batches", "2",
          "--no-progress", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run_main(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ppl_values(out):
    return [float(x) for x in re.findall(r"val_ppl=([0-9.]+|nan)", out)]


def train_args(corpus, out, steps, config=SMALL, *extra):
    return ["train", "--corpus", corpus, "--out", out, "--steps", steps,
            "--config", json.dumps(config), *COMMON, *extra]


def test_lr_schedule():
    vals = [lr_lambda(s, 10, 100, 0.1) for s in range(100)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[9:], vals[10:]))
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_subcommands_register():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    add_train_subcommands(sub)
    a = parser.parse_args(["train", "--out", "x", "--steps", "3", "--preset", "tiny"])
    assert a.steps == 3 and a.seq_len is None and callable(a.func)
    b = parser.parse_args(["tokenizer", "train", "--out", "t.model", "--vocab-size", "500"])
    assert b.vocab_size == 500 and callable(b.func)


def test_training_args_are_written_with_relative_paths(tmp_path, monkeypatch):
    from fwpkm_ext.run_args import copy_training_args, training_args, write_training_args

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    write_training_args(str(run), {"corpus": str(tmp_path / "books"), "out": "runs/a",
                                   "config": '{"dim": 64}', "steps": 3, "func": print})
    assert training_args(str(run)) == {"corpus": "books", "out": "runs/a",
                                       "config": '{"dim": 64}', "steps": 3}
    # an export copies them, absolute paths made relative too
    (run / "train_args.json").write_text(json.dumps({"out": str(run), "seed": 1}))
    assert copy_training_args(str(run), str(tmp_path))
    assert training_args(str(tmp_path)) == {"out": os.path.join("runs", "a"), "seed": 1}
    assert not copy_training_args(str(tmp_path / "none"), str(tmp_path))


def test_loss_falls_and_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run_main(capsys, *train_args(corpus, out, 40, SMALL, "--val-every", "20"))
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert "val_ppl=" in lines[-1]
    ppl = ppl_values(stdout)
    assert ppl[0] > 100 and ppl[-1] < ppl[0] / 4, stdout
    for f in ("config.json", "model.safetensors", "tokenizer.model", "train_state.pt",
              "metrics.jsonl"):
        assert (out / f).is_file(), f
    from fwpkm_ext.model import LM

    model = LM.from_pretrained(str(out))
    assert model.cfg.dim == 64


def test_resume_is_exact(corpus, tmp_path, capsys):
    extra = ["--val-every", "4", "--grad-accum", "2", "--needle-rate", "0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    rc, out_full, err = run_main(capsys, *train_args(corpus, full, 10, SMALL, *extra))
    assert rc == 0, err
    rc, out_a, err = run_main(capsys, *train_args(corpus, part, 10, SMALL, *extra, "--stop-at", 6))
    assert rc == 0, err
    assert "stopped" in out_a.strip().splitlines()[-1]
    rc, out_b, err = run_main(capsys, *train_args(corpus, part, 10, SMALL, *extra, "--resume"))
    assert rc == 0, err
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last = lambda s: re.search(r"train_loss=(\S+).*val_ppl=(\S+)", s.strip().splitlines()[-1]).groups()
    assert last(out_full) == last(out_b)


def test_resume_with_other_config(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_main(capsys, *train_args(corpus, out, 2, SMALL, "--val-every", "0"))
    assert rc == 0, err
    other = dict(SMALL, dim=32)
    rc, _, err = run_main(capsys, *train_args(corpus, out, 4, other, "--resume"))
    assert rc == 2
    assert "another model config" in err and "dim" in err
    rc, _, err = run_main(capsys, *train_args(corpus, tmp_path / "none", 4, SMALL, "--resume"))
    assert rc == 2 and "no checkpoint" in err
    rc, _, err = run_main(capsys, *train_args(corpus, out, 4, SMALL))  # would overwrite
    assert rc == 2 and "--resume" in err


def test_cli_corpus_errors(tmp_path, capsys):
    rc, _, err = run_main(capsys, *train_args(str(tmp_path / "missing"), tmp_path / "o", 2))
    assert rc == 2 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_main(capsys, *train_args(str(empty), tmp_path / "o", 2))
    assert rc == 2 and "empty" in err
    bad = tmp_path / "bad"
    write_corpus(str(bad), n_docs=2, lines=40)
    (bad / "latin.txt").write_bytes(b"Caf\xe9\n" * 50)
    rc, _, err = run_main(capsys, *train_args(str(bad), tmp_path / "o2", 1, SMALL,
                                              "--encoding-errors", "strict"))
    assert rc == 2 and "latin.txt" in err and "UTF-8" in err


def test_tokenizer_command(corpus, tmp_path, capsys):
    path = tmp_path / "tok.model"
    rc, out, err = run_main(capsys, "tokenizer", "train", "--corpus", corpus, "--vocab-size", 350,
                            "--out", path)
    assert rc == 0, err
    from fwpkm_ext.tokenizer import Tokenizer

    assert Tokenizer.load(str(path)).vocab_size <= 350
    assert "vocab_size=" in out


def test_torchrun_gloo_two_processes(corpus, tmp_path, capsys):
    """2 CPU processes (gloo), batch 2 each == 1 process, batch 2, 2 accumulated micro-batches
    (the same samples; each micro-batch of 2 shares one fast-weight memory in both runs)."""
    cfg = MEM if _has_layers() else SMALL
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fwpkm_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    ddp_out = tmp_path / "ddp"
    args = train_args(corpus, ddp_out, 6, cfg, "--val-every", "3")
    args[args.index("--batch-size") + 1] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fwpkm_ext.train", *map(str, args)]
    p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[:6000]
    last = p.stdout.strip().splitlines()[-1]
    assert "val_ppl=" in last and "procs=2" in p.stdout
    single = tmp_path / "single"
    args = train_args(corpus, single, 6, cfg, "--val-every", "3", "--grad-accum", "2")
    args[args.index("--batch-size") + 1] = "2"
    rc, out1, err = run_main(capsys, *args)
    assert rc == 0, err
    a = load_file(str(ddp_out / "model.safetensors"))
    b = load_file(str(single / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _has_layers():
    try:
        from fwpkm_ext.layers import FwPKM  # noqa: F401
    except Exception:
        return False
    return True


MEM = dict(SMALL, fwpkm_layers=[1], fwpkm_n_subkeys=16, fwpkm_k_dim=16, fwpkm_v_dim=32,
           fwpkm_topk=4, fwpkm_chunk_size=16)


@pytest.mark.skipif(not _has_layers(), reason="fwpkm_ext.layers not available")
def test_fwpkm_model_trains_and_resumes_exactly(corpus, tmp_path, capsys):
    extra = ["--val-every", "0", "--needle-rate", "0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    rc, out_full, err = run_main(capsys, *train_args(corpus, full, 12, MEM, *extra))
    assert rc == 0, err
    ppl = ppl_values(out_full)
    assert ppl[-1] < ppl[0] / 2, out_full
    rc, _, err = run_main(capsys, *train_args(corpus, part, 12, MEM, *extra, "--stop-at", 5))
    assert rc == 0, err
    rc, out_b, err = run_main(capsys, *train_args(corpus, part, 12, MEM, *extra, "--resume"))
    assert rc == 0, err
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    # the memory's initial tables are the seeded ones: regenerated on load, not stored
    assert not any(k.endswith("init_values") for k in a)
    assert any(k.endswith("to_q.weight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_init_from_loads_matching_tensors_and_zeroes_new_sublayers(corpus, tmp_path, capsys):
    """--init-from: a model without memory grows a FwPKM sublayer; everything it shares with
    the loaded model starts equal, and the new sublayer starts as a no-op."""
    base = str(tmp_path / "base")
    rc, _, _ = run_main(capsys, *train_args(corpus, base, 2, SMALL, "--val-every", "0"))
    assert rc == 0
    grown_cfg = {**SMALL, "fwpkm_layers": [0], "fwpkm_n_subkeys": 4, "fwpkm_k_dim": 8,
                 "fwpkm_v_dim": 16, "fwpkm_topk": 2, "fwpkm_chunk_size": 16,
                 "fwpkm_query_norm": "batch", "fwpkm_init_values": "zero"}
    grown = str(tmp_path / "grown")
    rc, out, _ = run_main(capsys, *train_args(corpus, grown, 1, grown_cfg, "--val-every", "0",
                                              "--init-from", base, "--tokenizer",
                                              os.path.join(base, "tokenizer.model"),
                                              "--stop-at", "0"))
    assert rc == 0
    assert "init-from" in out and "start with a zero output projection" in out
    a, b = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(grown, "model.safetensors"))
    for k, v in a.items():
        assert torch.equal(b[k], v), k
    assert float(b["blocks.0.fwpkm.to_out.weight"].abs().sum()) == 0
    rc, _, err = run_main(capsys, *train_args(corpus, str(tmp_path / "x"), 1, SMALL, "--init-from",
                                              str(tmp_path / "none")))
    assert rc == 2 and "--init-from" in err
    other = {**SMALL, "dim": 32}
    rc, _, err = run_main(capsys, *train_args(corpus, str(tmp_path / "y"), 1, other, "--init-from", base,
                                              "--tokenizer", os.path.join(base, "tokenizer.model")))
    assert rc == 2 and "--init-from" in err and "shapes" in err


def test_needle_loss_weight_and_wordings(corpus, tmp_path, capsys):
    cfg = {**SMALL, "fwpkm_layers": [0], "fwpkm_n_subkeys": 4, "fwpkm_k_dim": 8,
           "fwpkm_v_dim": 16, "fwpkm_topk": 2, "fwpkm_chunk_size": 16}
    extra = ["--val-every", "0", "--needle-rate", "1.0", "--needles-per-seq", "1",
             "--needle-wordings", "varied", "--needle-loss-weight", "2.0", "--seq-len", "256",
             "--batch-size", "1"]
    rc, out, _ = run_main(capsys, *train_args(corpus, str(tmp_path / "n"), 2, cfg, *extra))
    assert rc == 0
    recs = [json.loads(x) for x in open(os.path.join(tmp_path / "n", "metrics.jsonl"))]
    assert any("needle_acc" in r for r in recs)
    rc, _, err = run_main(capsys, *train_args(corpus, str(tmp_path / "m"), 1, cfg,
                                              "--needle-loss-weight", "-1"))
    assert rc == 2 and "--needle-loss-weight" in err
