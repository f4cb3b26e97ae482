"""The main job (`fwpkm demo`) and the command line, end to end on small settings; path arguments
checked before a model is loaded, non-text input refused, a source tree without the extension."""
import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

import fwpkm_ext
from fwpkm_ext import cli
from fwpkm_ext.demo import run_demo
from fwpkm_ext.input_checks import check_document, non_text_fraction


def test_demo_recalls_associations_and_reports():
    lines = []
    res = run_demo(dim=64, n_subkeys=64, key_dim=64, value_dim=64, topk=4, chunk_size=128, pairs=32,
                   distractors=2048, segment=700, progress=False, out=lines.append)
    recall = res["recall"]
    assert set(recall) == {0, 512, 1024, 2048}
    # before writing the memory knows nothing; right after writing it recalls (chance 1/32)
    assert res["recall_before"] < 0.25
    assert recall[0] >= 0.9
    assert res["tokens_per_s"] > 0
    text = "\n".join(lines)
    assert "recall" in text and "tokens/s" in text and "coverage" in text


def test_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pairs"):
        run_demo(dim=32, n_subkeys=16, key_dim=16, value_dim=16, chunk_size=64, pairs=40,
                 distractors=0, progress=False, out=lambda s: None)
    with pytest.raises(ValueError, match="distractors"):
        run_demo(dim=32, n_subkeys=16, key_dim=16, value_dim=16, chunk_size=64, pairs=4,
                 distractors=-1, progress=False, out=lambda s: None)


def test_cli_demo_and_info(capsys):
    assert cli.main(["demo", "--synthetic", "--distractors", "512", "--pairs", "16", "--n-subkeys", "32",
                     "--key-dim", "32", "--value-dim", "32", "--dim", "32", "--chunk-size", "64",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "recall" in out and "tokens/s" in out
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"cuda", "cuda_archs", "openmp", "version", "torch"} <= set(info)


def test_console_script_entry_point(tmp_path):
    # `python -m fwpkm_ext` is the console script's module; run it in a fresh process, outside the
    # source tree so the installed package is the one imported
    r = subprocess.run([sys.executable, "-m", "fwpkm_ext", "info"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"]


# ------------------------------------------------------------------------------------------
# path arguments are checked before any model is loaded; non-text input is refused
# ------------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fwpkm_ext.__file__)))
GUTENBERG = os.path.join(REPO, "..", "shared", "data", "gutenberg")
SMALL = dict(vocab_size=300, dim=32, n_layers=2, n_heads=2, window=16, fwpkm_layers=[1],
             fwpkm_n_subkeys=8, fwpkm_k_dim=8, fwpkm_v_dim=16, fwpkm_topk=4, fwpkm_chunk_size=24)
TINY = ["--preset", "tiny", "--random-init", "--config", json.dumps(SMALL)]


def _env():
    # the package under test, whatever directory the command runs in
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def binary(tmp_path):
    p = tmp_path / "random.txt"
    p.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))
    return p


def test_missing_document_fails_fast_without_traceback(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fwpkm_ext", "stream", "/nonexistent.txt"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_env())
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert "no such file" in r.stderr and "/nonexistent.txt" in r.stderr
    assert "Traceback" not in r.stderr and "warm-up" not in r.stdout and "model:" not in r.stdout
    assert took < 5, f"{took:.1f} s"  # no model is loaded: the time is Python and torch starting


def _fails(capsys, argv, *words):
    """The command exits with 2 and an error naming the problem, before any model is loaded
    (the commands' output would show it: "model: ...", "warm-up: ...")."""
    t0 = time.monotonic()
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err
    for w in words:
        assert w in err, err
    assert "model:" not in out and "warm-up" not in out and time.monotonic() - t0 < 5
    return err


def test_path_arguments_checked_before_the_model(tmp_path, capsys, binary):
    doc = tmp_path / "doc.txt"
    doc.write_text("a short text\n", encoding="utf-8")
    missing = str(tmp_path / "missing.txt")
    as_file = tmp_path / "afile"
    as_file.write_text("x")
    nomodel = ["--model", str(tmp_path / "no-such-checkpoint")]
    _fails(capsys, ["stream", missing] + nomodel, "path: no such file", missing)
    _fails(capsys, ["stream", str(tmp_path)], "is a directory")
    _fails(capsys, ["stream", str(doc), "--resume", missing] + TINY, "--resume: no such file")
    _fails(capsys, ["stream", str(doc), "--json", str(as_file / "out.json")] + TINY,
           "--json", "not a directory")
    _fails(capsys, ["stream", str(doc), "--tokenizer", missing] + TINY, "--tokenizer: no such file")
    _fails(capsys, ["stream", str(doc)] + nomodel, "--model: checkpoint directory not found")
    _fails(capsys, ["eval", "memory", missing] + nomodel, "path: no such file")
    _fails(capsys, ["eval", "ppl", "--files", str(doc), missing] + nomodel, "--files: no such file")
    _fails(capsys, ["eval", "ppl", "--corpus", missing] + nomodel, "--corpus", "not found")
    _fails(capsys, ["niah", "--haystack", missing] + nomodel, "--haystack: no such file")
    _fails(capsys, ["demo", "--haystack", missing] + nomodel, "--haystack: no such file")
    _fails(capsys, ["train", "--out", str(tmp_path / "run"), "--corpus", missing], "--corpus",
           "not found")
    _fails(capsys, ["train", "--out", str(as_file), "--corpus", str(doc)], "--out",
           "not a directory")
    _fails(capsys, ["tokenizer", "train", "--out", str(tmp_path / "t.model"), "--corpus", missing],
           "--corpus", "not found")


def test_damaged_snapshot_refused_before_the_model(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("a short text\n", encoding="utf-8")
    bad = tmp_path / "snap.pt"
    bad.write_bytes(b"PK\x03\x04 not really a snapshot")
    err = _fails(capsys, ["stream", str(doc), "--resume", str(bad)] + TINY, "--resume:",
                 "not a readable")
    assert "path:" not in err  # named after the option the user typed


def test_non_text_input_refused_unless_forced(tmp_path, capsys, binary):
    nomodel = ["--model", str(tmp_path / "no-such-checkpoint")]
    for argv in (["stream", str(binary)], ["eval", "memory", str(binary)],
                 ["eval", "ppl", "--files", str(binary)], ["niah", "--haystack", str(binary)],
                 ["demo", "--haystack", str(binary)]):
        err = _fails(capsys, argv + nomodel, "does not look like text", "--force-binary")
        assert str(binary) in err
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(binary, corpus / "a.txt")
    _fails(capsys, ["train", "--out", str(tmp_path / "run"), "--corpus", str(corpus)],
           "--corpus", "does not look like text")
    _fails(capsys, ["tokenizer", "train", "--out", str(tmp_path / "t.model"), "--corpus",
                    str(corpus)], "--corpus", "does not look like text")
    # gzip-compressed random bytes: judged by what they decompress to
    gz = tmp_path / "random.txt.gz"
    gz.write_bytes(gzip.compress(binary.read_bytes()))
    _fails(capsys, ["stream", str(gz)] + nomodel, "does not look like text", "(decompressed)")
    # with the flag the check is skipped: the document is read (decoded as Latin-1)
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        assert cli.main(["stream", str(binary), "--force-binary", "--no-progress", "--no-warmup",
                         "--max-tokens", "300", "--segment-tokens", "100"] + TINY) == 0
    assert "300 tokens in" in capsys.readouterr().out


def test_force_binary_is_documented():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("stream", "niah", "demo", "train"):
        text = sub.choices[name].format_help()
        assert "--force-binary" in text and "64 KiB" in " ".join(text.split()), name


def test_text_check(tmp_path):
    assert non_text_fraction(b"") == 0.0
    assert non_text_fraction("plain text\twith tabs\r\nand a form feed\f".encode()) == 0.0
    assert non_text_fraction("Übung macht den Meister – ça va? 東京".encode()) == 0.0
    # Latin-1 text (read with --encoding-errors latin1) passes: a few undecodable bytes
    latin = ("Les élèves étaient très fâchés contre le maître d'école. " * 50).encode("latin-1")
    assert 0 < non_text_fraction(latin) < 0.3
    (tmp_path / "latin.txt").write_bytes(latin)
    check_document(tmp_path / "latin.txt")
    # a multi-byte character cut at the end of the sniffed prefix is not counted
    assert non_text_fraction("aé".encode()[:-1], final=False) == 0.0
    assert non_text_fraction(bytes(range(32)) * 10) > 0.8
    assert non_text_fraction("text".encode("utf-16")) > 0.3
    # a text bigger than the sniffed prefix, plain and gzipped
    text = ("It was the best of times, it was the worst of times.\n" * 3000).encode()
    (tmp_path / "big.txt").write_bytes(text)
    with gzip.open(tmp_path / "big.txt.gz", "wb") as f:
        f.write(text)
    check_document(tmp_path / "big.txt")
    check_document(str(tmp_path / "big.txt.gz"))
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="^path: cannot read"):
        check_document(tmp_path / "broken.txt.gz")
    with pytest.raises(FileNotFoundError, match="^doc: no such file"):
        check_document(tmp_path / "nope.txt", "doc")


@pytest.mark.skipif(not os.path.isdir(GUTENBERG), reason="no ../shared/data/gutenberg corpus")
def test_gutenberg_gz_documents_are_text():
    files = sorted(f for f in os.listdir(GUTENBERG) if f.endswith(".txt.gz"))
    assert files
    for f in files:
        check_document(os.path.join(GUTENBERG, f))


# ------------------------------------------------------------------------------------------
# a source tree without the compiled extension
# ------------------------------------------------------------------------------------------
def test_source_tree_without_extension_says_what_to_do(tmp_path):
    pkg = os.path.dirname(os.path.abspath(fwpkm_ext.__file__))
    shutil.copytree(pkg, tmp_path / "fwpkm_ext",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__", "default_model"))
    (tmp_path / "setup.py").write_text("# a source checkout\n")
    # an editable install's import hook would find fwpkm_ext._C in the real checkout: take it
    # out, so the copy is imported alone, as a checkout without a build would be
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if not getattr(f, '__module__', '').startswith('__editable__')]; "
            f"sys.path.insert(0, {str(tmp_path)!r}); import fwpkm_ext")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0
    msg = r.stderr.strip().splitlines()[-1]
    assert msg.startswith("ImportError: fwpkm_ext was imported from"), r.stderr
    assert str(tmp_path / "fwpkm_ext") in msg and "no compiled extension" in msg
    assert "pip install -e ." in msg and "python setup.py build_ext --inplace" in msg
    assert "another directory" in msg
