"""The main job (`fwpkm demo`) and the command line, end to end on small settings."""
import json
import subprocess
import sys

import pytest

from fwpkm_ext import cli
from fwpkm_ext.demo import run_demo


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
