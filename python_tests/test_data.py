"""Corpus reading, splitting, packing, needles and the tokenizer."""
import glob
import gzip
import os
import random
import re

import numpy as np
import pytest

pytest.importorskip("sentencepiece")

from fwpkm_ext.data import (  # noqa: E402
    PackedData, build_datasets, insert_needles, list_corpus_files, make_needle, needle_query,
    needle_sentence, read_corpus, read_document, resolve_corpus, split_documents)
from fwpkm_ext.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

GUTENBERG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gutenberg")
WORDS = ("the a cat dog bird sat ran sang on under near mat tree hill red big old small and "
         "then while it was night day morning").split()


def write_corpus(root, n_docs=4, lines=120, seed=0):
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    for d in range(n_docs):
        text = "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
            for _ in range(lines))
        path = os.path.join(root, f"doc{d}.txt" if d % 2 == 0 else f"doc{d}.txt.gz")
        if path.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    return str(root)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=400)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_missing_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_corpus_files(str(tmp_path / "nope"))


def test_default_corpus_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--corpus"):
        resolve_corpus(None)
    assert resolve_corpus("x") == "x"


def test_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        list_corpus_files(str(tmp_path))
    (tmp_path / "a.txt").write_text("  \n\n")
    (tmp_path / "notes.md").write_text("ignored")
    with pytest.raises(ValueError, match="empty"):
        read_corpus(str(tmp_path))


def test_undecodable_bytes(tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"bad\.txt.*not valid UTF-8"):
        read_corpus(str(tmp_path))
    with pytest.warns(UserWarning, match="bad.txt"):
        assert read_document(str(bad), "latin1") == "Caf\u00e9 au lait\n"
    with pytest.warns(UserWarning):
        assert "\ufffd" in read_document(str(bad), "replace")


def test_read_txt_and_gz(corpus):
    files = list_corpus_files(corpus)
    assert [os.path.basename(f) for f in files] == ["doc0.txt", "doc1.txt.gz", "doc2.txt",
                                                    "doc3.txt.gz"]
    docs = read_corpus(corpus)
    assert len(docs) == 4 and all(t.count("\n") == 119 for _, t in docs)


# ------------------------------------------------------------------------------------------
# splitting and packing
# ------------------------------------------------------------------------------------------
def test_split_by_documents():
    files = [f"/c/b{i}.txt" for i in range(20)]
    tr, va = split_documents(files, 0.1, seed=3)
    assert len(va) == 2 and len(tr) == 18 and not set(tr) & set(va)
    assert split_documents(list(reversed(files)), 0.1, seed=3) == (tr, va)  # order-independent
    assert split_documents(files, 0.1, seed=4) != (tr, va)
    assert split_documents(files[:2], 0.1) [1] and split_documents(files[:2], 0.1)[0]
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(files[:1], 0.1)
    assert split_documents(files[:1], 0.0) == (files[:1], [])


def test_packing_marks_boundaries():
    docs = [np.arange(10, 20), np.arange(30, 35), np.arange(50, 63)]
    pd = PackedData(docs, seq_len=8, eos_id=2, shuffle_docs=False)
    assert pd.num_tokens == 10 + 5 + 13 + 3
    assert list(pd.stream[:11]) == list(range(10, 20)) + [2]
    assert len(pd) == (pd.num_tokens - 1) // 8
    s = pd.sequence(1)
    assert len(s) == 9 and list(s) == list(pd.stream[8:17])
    # the permutation covers every sequence once per epoch and is reproducible
    ep0 = sorted(tuple(pd.sample(i)) for i in range(len(pd)))
    assert ep0 == sorted(tuple(pd.sequence(j)) for j in range(len(pd)))
    again = PackedData(docs, seq_len=8, eos_id=2, shuffle_docs=False)
    assert all((pd.sample(i) == again.sample(i)).all() for i in range(3 * len(pd)))
    with pytest.raises(ValueError, match="smaller --seq-len"):
        PackedData(docs, seq_len=100, eos_id=2)
    short = PackedData(docs, seq_len=100, eos_id=2, allow_short=True)
    assert len(short) == 1 and len(short.sequence(0)) == short.num_tokens


def test_build_datasets_holds_out_documents(corpus, tok):
    ds = build_datasets(corpus, tok, seq_len=32, seed=0, val_fraction=0.25)
    assert len(ds.val_files) == 1 and len(ds.train_files) == 3
    assert not set(ds.val_files) & set(ds.train_files)
    assert ds.train.stream.tolist().count(tok.eos_id) == 3
    val_text = read_document(ds.val_files[0])
    assert tok.decode(ds.val.stream[:-1].tolist()) == val_text
    assert (ds.train.batch(5, 3) == np.stack([ds.train.sample(i) for i in (5, 6, 7)])).all()


def test_token_cache(corpus, tok, tmp_path):
    a = build_datasets(corpus, tok, seq_len=32, cache_dir=str(tmp_path))
    assert len(glob.glob(str(tmp_path / "tokens-*.npz"))) == 2
    b = build_datasets(corpus, tok, seq_len=32, cache_dir=str(tmp_path))
    assert (a.train.stream == b.train.stream).all()


def test_needles(tok):
    rng = random.Random(0)
    key, num = make_needle(rng)
    assert re.fullmatch(r"[0-9a-f]{4}", key) and re.fullmatch(r"\d{6}", num)
    sent = needle_sentence(key, num)
    assert sent == f"The secret number for ID-{key} is {num}."
    assert sent.startswith(needle_query(key))
    seq = np.full(400, tok.encode("cat")[0], dtype=np.int64)
    out = insert_needles(seq, tok, random.Random(1), rate=1.0)
    assert out.shape == seq.shape and out.dtype == seq.dtype
    text = tok.decode(out.tolist())
    found = re.findall(r"The secret number for ID-([0-9a-f]{4}) is (\d{6})\.", text)
    assert len(found) == 2 and found[0] == found[1]
    first = text.index("The secret")
    second = text.index("The secret", first + 1)
    assert first < len(text) // 3 < second
    assert (insert_needles(seq, tok, random.Random(1), rate=0.0) == seq).all()


# ------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------
def test_tokenizer_roundtrip(tok, tmp_path):
    assert 300 <= tok.vocab_size <= 400
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    text = "The cat sat.\n\n  Then the dog ran!\nZebra \u00e9t\u00e9 \u2603 \U0001F600 42"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # newlines, spaces and unseen characters (byte fallback)
    assert tok.unk_id not in ids
    assert tok.encode("a", bos=True, eos=True)[0] == tok.bos_id
    long = (text + "\n") * 2000  # the line-parallel path
    assert tok.encode(long) == list(tok.sp.encode(long, out_type=int))
    path = tmp_path / "t.model"
    tok.save(str(path))
    again = Tokenizer.load(str(path))
    assert again.model_proto == tok.model_proto and again.encode(text) == ids
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError):
        Tokenizer(b"not a model")


@pytest.mark.skipif(not glob.glob(os.path.join(GUTENBERG, "*.txt.gz")),
                    reason="shared Gutenberg data not present")
def test_gutenberg_corpus():
    files = list_corpus_files(GUTENBERG)
    assert len(files) >= 18
    with pytest.warns(UserWarning, match="Latin-1"):
        docs = read_corpus(GUTENBERG, "latin1")
    assert len(docs) == len(files)
    tr, va = split_documents([p for p, _ in docs], 0.1, seed=0)
    assert len(va) == 2 and not set(tr) & set(va)


def test_insert_many_needles_positions_and_distance():
    import random as _random

    import numpy as _np

    from fwpkm_ext.data import insert_needles, needle_query

    class Tok:
        newline_id = 1

        def encode(self, s):
            return [ord(c) for c in s]

    tok = Tok()
    seq = _np.arange(5000, 9097, dtype=_np.int64)  # 4097 tokens, none collide with text
    for seed in range(5):
        answers = []
        out = insert_needles(seq, tok, _random.Random(seed), 1.0, count=4, answers=answers)
        assert len(out) == len(seq) and out.dtype == seq.dtype
        text = "".join(chr(t) if t < 5000 else "#" for t in out.tolist())
        facts = [i for i in range(len(text)) if text.startswith("The secret number for ID-", i)]
        assert len(facts) == 8
        first, second = facts[:4], facts[4:]
        assert max(first) < len(seq) // 4 and min(second) >= len(seq) // 2
        keys = [text[i + 25: i + 29] for i in facts]
        assert sorted(keys[:4]) == sorted(keys[4:]) and len(set(keys[:4])) == 4
        # answers: the 6 digits and the period of each query
        assert len(answers) == 4 * 7
        got = "".join(chr(out[p]) for p in sorted(answers))
        assert all(c.isdigit() or c == "." for c in got)
        for i in second:
            q = len(needle_query(text[i + 25: i + 29]))
            assert i + q in answers
    # rate 0 leaves the sequence alone
    assert insert_needles(seq, tok, _random.Random(0), 0.0, count=4) is seq


def test_needle_wordings():
    import random as _random

    from fwpkm_ext.data import (HELD_OUT_WORDING, SPEC_WORDING, VARIED_WORDINGS, check_wording,
                                insert_needles)

    assert SPEC_WORDING in VARIED_WORDINGS and HELD_OUT_WORDING not in VARIED_WORDINGS
    for w in VARIED_WORDINGS + (HELD_OUT_WORDING,):
        assert check_wording(w) == w
        assert needle_sentence("ab12", "123456", w).startswith(needle_query("ab12", w))
    assert needle_query("ab12", HELD_OUT_WORDING) == "The vault combination for box ab12 is "
    for bad in ("no fields", "{number} before {key}", "{key} {key} {number}", "{key} {number} {x}"):
        with pytest.raises(ValueError, match="^wording"):
            check_wording(bad)
    with pytest.raises(TypeError, match="^wording"):
        check_wording(3)

    class Tok:
        newline_id = 1

        def encode(self, s):
            return [ord(c) for c in s]

    seq = np.arange(5000, 9097, dtype=np.int64)
    seen = set()
    for seed in range(6):
        answers = []
        out = insert_needles(seq, Tok(), _random.Random(seed), 1.0, count=6, answers=answers,
                             wordings=VARIED_WORDINGS)
        text = "".join(chr(t) if t < 5000 else "#" for t in out.tolist())
        for w in VARIED_WORDINGS:
            pat = re.escape(w).replace(r"\{key\}", "([0-9a-f]{4})").replace(r"\{number\}", r"(\d{6})")
            hits = re.findall(pat, text)
            if hits:
                seen.add(w)
                assert len(hits) % 2 == 0  # each fact comes back as its query + answer
        assert "vault" not in text
        got = "".join(chr(out[p]) for p in sorted(answers))
        assert len(answers) == 6 * 7 and all(c.isdigit() or c == "." for c in got)
    assert len(seen) >= 5
    # without wordings the samples are exactly the SPEC-only ones
    a = insert_needles(seq, Tok(), _random.Random(3), 1.0, count=4)
    b = insert_needles(seq, Tok(), _random.Random(3), 1.0, count=4, wordings=None)
    assert (a == b).all()
