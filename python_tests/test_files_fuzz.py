"""Damaged, truncated and foreign files given to MemoryState.load and StreamingReader.resume: always
a ValueError whose message starts with "path" (or, when the damage missed everything that is read,
the file loads as it was written); any other exception is a failure. And a writer SIGKILLed in the
middle of a save leaves a file that loads."""
import os
import random
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fwpkm_ext
from fwpkm_ext import FwPKM, MemoryState
from fwpkm_ext.model import LM, LMConfig
from fwpkm_ext.state import STATE_VERSION
from fwpkm_ext.stream import SNAPSHOT_VERSION, StreamingReader, load_snapshot
from state_asserts import assert_same_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fwpkm_ext.__file__)))

SMALL = dict(vocab_size=300, dim=32, n_layers=2, n_heads=2, window=16, fwpkm_layers=[1],
             fwpkm_n_subkeys=8, fwpkm_k_dim=8, fwpkm_v_dim=16, fwpkm_topk=4, fwpkm_chunk_size=24)


def _fuzz(n):
    # no example database: nothing is written into the checkout
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _reader(model):
    return StreamingReader(model, segment_tokens=20, bucket_tokens=16, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A state file with pending tokens and extras, a paused-read snapshot, their bytes, and what
    a correct load gives (saved once per module)."""
    d = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    layer = FwPKM(16, n_subkeys=8, mem_k_dim=8, mem_v_dim=8, topk=2, chunk_size=4)
    with torch.no_grad():
        _, state = layer(torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1)),
                         layer.init_state(None), flush=False)
    state = state.with_(extras={"nonfinite_skipped": 3.0})
    assert state.pending == 3
    state.save(d / "state.pt")

    torch.manual_seed(0)
    model = LM(LMConfig.preset("tiny", **SMALL)).eval()
    tokens = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(2))
    full = _reader(model).read(tokens).nll_sum
    rd = _reader(model)
    rd.read(tokens, stop_at=50)
    rd.snapshot(d / "snap.pt")
    return types.SimpleNamespace(
        dir=d, state=state, state_path=d / "state.pt", state_bytes=(d / "state.pt").read_bytes(),
        model=model, tokens=tokens, full_nll=full, reader=_reader(model),
        snap_path=d / "snap.pt", snap_bytes=(d / "snap.pt").read_bytes())




def _path_error(exc: ValueError):
    assert str(exc).startswith("path"), str(exc)


def _load_state(f, path) -> bool:
    """MemoryState.load: a ValueError naming path, or exactly the saved state. True if loaded."""
    try:
        loaded = MemoryState.load(path)
    except ValueError as exc:
        _path_error(exc)
        return False
    assert_same_state(loaded, f.state)
    return True


def _load_snapshot(f, path) -> bool:
    """resume: a ValueError naming path, or a paused read that finishes like an uninterrupted one."""
    try:
        f.reader.resume(path)
    except ValueError as exc:
        _path_error(exc)
        return False
    rest = f.reader.read(f.tokens)
    assert rest.complete and rest.nll_sum == f.full_nll
    return True


def _write(f, name, data: bytes):
    p = f.dir / name
    p.write_bytes(data)
    return p


KINDS = {"state": ("state_bytes", _load_state), "snapshot": ("snap_bytes", _load_snapshot)}


def test_valid_files_load(files):
    assert _load_state(files, files.state_path)
    assert _load_snapshot(files, files.snap_path)
    # the state file keeps the extras counters (they used to be dropped)
    assert MemoryState.load(files.state_path).extras == {"nonfinite_skipped": 3.0}


# ------------------------------------------------------------------------------------------
# damaged files (hypothesis: about 400 examples in all)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
@_fuzz(45)
@given(data=st.data())
def test_truncated(files, kind, data):
    attr, load = KINDS[kind]
    raw = getattr(files, attr)
    n = data.draw(st.integers(0, len(raw) - 1), label="length")
    assert not load(files, _write(files, f"trunc-{kind}.pt", raw[:n]))


@pytest.mark.parametrize("kind", sorted(KINDS))
@_fuzz(70)
@given(data=st.data())
def test_flipped_bit(files, kind, data):
    attr, load = KINDS[kind]
    raw = bytearray(getattr(files, attr))
    off = data.draw(st.integers(0, len(raw) - 1), label="offset")
    raw[off] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    # loads only when the bit is one nothing reads (zip padding, an unchecked header field)
    load(files, _write(files, f"bit-{kind}.pt", bytes(raw)))


@pytest.mark.parametrize("kind", sorted(KINDS))
@_fuzz(40)
@given(data=st.data())
def test_replaced_byte(files, kind, data):
    attr, load = KINDS[kind]
    raw = bytearray(getattr(files, attr))
    off = data.draw(st.integers(0, len(raw) - 1), label="offset")
    raw[off] ^= data.draw(st.integers(1, 255), label="xor")
    load(files, _write(files, f"byte-{kind}.pt", bytes(raw)))


@pytest.mark.parametrize("kind", sorted(KINDS))
@_fuzz(25)
@given(blob=st.binary(max_size=4096))
def test_random_bytes(files, kind, blob):
    _, load = KINDS[kind]
    assert not load(files, _write(files, f"random-{kind}.pt", blob))


VERSIONS = st.one_of(st.integers(-3, 2 ** 40), st.none(), st.booleans(), st.floats(allow_nan=False),
                     st.text(max_size=4))


@pytest.mark.parametrize("kind", sorted(KINDS))
@_fuzz(20)
@given(version=VERSIONS)
def test_version_changed(files, kind, version):
    """The version entry rewritten (the file otherwise intact): only the current one loads."""
    attr, load = KINDS[kind]
    payload = torch.load(getattr(files, {"state": "state_path", "snapshot": "snap_path"}[kind]),
                         weights_only=True)
    payload["version"] = version
    p = files.dir / f"version-{kind}.pt"
    torch.save(payload, p)
    current = STATE_VERSION if kind == "state" else SNAPSHOT_VERSION
    assert load(files, p) == (type(version) is int and version == current)


def test_empty_files_and_other_kinds(files):
    for kind, (_, load) in KINDS.items():
        assert not load(files, _write(files, f"empty-{kind}.pt", b""))
    # a snapshot is not a state file, a state file is not a snapshot
    assert not _load_state(files, files.snap_path)
    assert not _load_snapshot(files, files.state_path)
    for obj in ({"a": torch.ones(2)}, [1, 2], torch.zeros(3)):
        p = files.dir / "foreign.pt"
        torch.save(obj, p)
        assert not _load_state(files, p) and not _load_snapshot(files, p)


def test_version_1_state_files_still_load(files):
    """Files written before checksums (version 1: no checksum, no extras) load; a version 1 file
    holding a checksum (a damaged version entry) does not."""
    payload = torch.load(files.state_path, weights_only=True)
    v1 = {k: v for k, v in payload.items() if k not in ("sha256", "extras")}
    v1["version"] = 1
    torch.save(v1, files.dir / "v1.pt")
    loaded = MemoryState.load(files.dir / "v1.pt")
    assert loaded.extras == {} and torch.equal(loaded.values, files.state.values)
    payload["version"] = 1
    torch.save(payload, files.dir / "v1-bad.pt")
    assert not _load_state(files, files.dir / "v1-bad.pt")


def test_edited_file_fails_its_checksum(files):
    """A change that leaves a valid-looking state (one float of the table) is caught by the
    checksum, in the state file and in the snapshot."""
    payload = torch.load(files.state_path, weights_only=True)
    payload["tensors"]["values"] = payload["tensors"]["values"].clone()
    payload["tensors"]["values"].view(-1)[5] += 1.0
    torch.save(payload, files.dir / "edited.pt")
    with pytest.raises(ValueError, match="^path: .*checksum"):
        MemoryState.load(files.dir / "edited.pt")
    snap = torch.load(files.snap_path, weights_only=True)
    snap["pos"] += 20
    torch.save(snap, files.dir / "edited-snap.pt")
    with pytest.raises(ValueError, match="^path: .*checksum"):
        load_snapshot(files.dir / "edited-snap.pt")


def test_save_leaves_no_tmp_and_keeps_mode(files, tmp_path):
    files.state.save(tmp_path / "s.pt")
    files.state.save(tmp_path / "s.pt")  # over an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "s.pt").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------
# a writer killed mid-save
# ------------------------------------------------------------------------------------------
WRITER = r"""
import os, sys, torch
from fwpkm_ext import FwPKM
path = sys.argv[1]
torch.manual_seed(0)
layer = FwPKM(16, n_subkeys=256, mem_k_dim=8, mem_v_dim=16, topk=2, chunk_size=4)
state = layer.init_state(None)  # 65536 x 16 float32 values: a 4 MiB file
print(float(state.values.double().sum()), flush=True)
for _ in sys.stdin:  # a line: fork a child that saves in a loop until it is killed
    pid = os.fork()
    if pid == 0:
        k = 0
        while True:
            state.tokens = k
            state.save(path)
            k += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_save_leaves_a_loadable_file(tmp_path):
    """Writers SIGKILLed at random moments (after a first complete save): the file at the path is
    always a complete state. One process imports torch once and forks a writer per kill."""
    path = tmp_path / "state.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    rng = random.Random()
    child = None
    try:
        total = float(proc.stdout.readline())
        kills = 5
        for _ in range(kills):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            child = int(proc.stdout.readline())
            t0 = time.monotonic()
            while not path.exists():  # the first complete save
                assert time.monotonic() - t0 < 30, "the writer never saved"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(child, signal.SIGKILL)
            child = None
            st = MemoryState.load(path)
            assert st.values.shape == (1, 65536, 16) and st.tokens >= 0
            assert float(st.values.double().sum()) == total
        # a kill mid-write leaves at most its own tmp file beside the target, never a torn target
        left = [p.name for p in tmp_path.iterdir() if p.name != "state.pt"]
        assert len(left) <= kills and all(n.startswith("state.pt.") and n.endswith(".tmp")
                                          for n in left), left
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
