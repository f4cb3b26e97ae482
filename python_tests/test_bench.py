"""tools/bench.py --quick end to end: it runs, every row reports or says why it was skipped, and
the JSON it writes has the structure docs/BENCHMARKS.md and CI rely on."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tools" / "bench.py"

KINDS = {"op_infer", "stream", "op_train", "layer_stream", "layer_train", "pkm_fwd", "pkm_train",
         "lm_train", "lm_stream", "floor", "stream_busy"}
TARGETS = ("inference >= 10x reference", "inference >= 10x lucidrains", "training step >= 5x reference",
           "training peak memory <= 1/4 reference", "per-token time at T=",
           "LM training step with FwPKM >= 0.90x without", "streaming >= 0.50 of the machine floor",
           "static PKM forward >= 1.5x lucidrains", "busy core: streaming keeps >= 0.4x of quiet")


def _peer_installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bench.py forks and reads /proc")
def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    # bench.py itself picks the checkout (in-place build) or the installed package
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--quick", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    # machine info first, the targets summary last
    assert text.index("torch") < text.index("tokens/s") < text.index("Targets")
    assert "build_info" in text
    data = json.loads(out.read_text())
    assert data["quick"] is True
    meta = data["meta"]
    for key in ("date", "cpu", "cores", "torch", "build_info", "device", "peers", "command"):
        assert key in meta, key
    assert meta["device"] == "cpu"
    rows = data["rows"]
    assert {r["kind"] for r in rows} == KINDS
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    peers_ok = {"layer": _peer_installed("fast_weight_product_key_memory"),
                "pkm": _peer_installed("product_key_memory")}
    for r in rows:
        for key in ("id", "kind", "impl", "B", "T", "result"):
            assert key in r, (r.get("id"), key)
        assert r["impl"] in ("native", "reference", "lucidrains", "lm_fwpkm", "lm_nomem", "floor", "adaptive")
        res = r["result"]
        assert res["status"] in ("ok", "skipped"), r["id"]
        if res["status"] == "skipped":
            assert res["reason"], r["id"]
            # only peers may be missing in a quick run; our own rows must all run
            assert r["impl"] == "lucidrains", (r["id"], res["reason"])
            assert not peers_ok["layer" if r["kind"].startswith("layer") else "pkm"], res["reason"]
            continue
        assert res["tokens_per_s"] > 0 and res["ms"] > 0, r["id"]
        assert abs(res["ms_per_token"] * res["tokens_per_s"] - 1e3) < 1e-6 * 1e3
        assert res["peak_mib"] >= 0 and res["repeat"] >= 1 and len(res["times_ms"]) == res["repeat"]
        if r["impl"] == "reference":
            assert (res["warmup"], res["repeat"]) == (0, 1)
        if r["kind"] == "stream":
            assert len(res["segment_ms"]) == res["repeat"]
            assert all(len(s) == -(-r["T"] // res["segment"]) for s in res["segment_ms"])
    # the streaming rows cover several T at B=1 (per-token time vs T)
    assert len({r["T"] for r in rows if r["kind"] == "stream" and r["B"] == 1}) >= 2
    tg = data["targets"]
    names = [t["name"] for t in tg]
    for name in TARGETS:
        assert any(n.startswith(name) for n in names), name
    for t in tg:
        assert t["status"] in ("PASS", "MISS", "N/A", "INFO")
        assert t["quick"] is True
        if t["status"] != "N/A":
            assert t["value"] is not None and t["detail"]
    # the targets on our own rows are always computable in a quick run
    own = [t for t in tg if "lucidrains" not in t["name"]]
    assert all(t["status"] != "N/A" for t in own), [t["name"] for t in own if t["status"] == "N/A"]
    if peers_ok["layer"]:
        assert tg[1]["status"] != "N/A"
