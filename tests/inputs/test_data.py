import numpy as np
import pytest
from helpers import tiny

from mpiattn.errors import InputError
from mpiattn.inputs.data import load_batch, read_lines, seeded_batch, text_batch


def test_seeded_batch_is_deterministic_and_padded():
    a = seeded_batch(0, 6, 20, 100, 0.5)
    b = seeded_batch(0, 6, 20, 100, 0.5)
    np.testing.assert_array_equal(a.ids, b.ids)
    lengths = a.mask.sum(1)
    assert lengths.min() >= 10 and lengths.max() <= 20
    assert (a.ids[~a.mask] == 0).all() and (a.ids[a.mask] > 0).all()
    assert not np.array_equal(a.ids, seeded_batch(1, 6, 20, 100, 0.5).ids)


def test_rows_slice_keeps_text():
    batch = seeded_batch(0, 5, 8, 50, 1.0)
    part = batch.rows(2, 2)
    np.testing.assert_array_equal(part.ids, batch.ids[2:4])


@pytest.mark.parametrize(("content", "message"), [
    (b"", "has no text"),
    (b"\n   \n", "has no text"),
    (b"caf\xe9\n", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "s.txt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_lines(path)
    with pytest.raises(InputError, match="does not exist"):
        read_lines(tmp_path / "nope.txt")


def test_text_through_the_minilm_tokenizer(minilm_dir):
    batch = text_batch(["Hello world.", "A much longer sentence, with more words in it."],
                       minilm_dir / "tokenizer.json", 128)
    assert batch.ids[0, 0] == 101 and batch.ids[1, 0] == 101  # [CLS]
    assert batch.mask[0].sum() < batch.mask[1].sum() == batch.ids.shape[1]
    assert batch.ids[0, batch.mask[0].sum() - 1] == 102  # [SEP] ends the real tokens
    assert (batch.ids[0, ~batch.mask[0]] == 0).all()  # [PAD]
    short = text_batch(["A much longer sentence, with more words in it."],
                       minilm_dir / "tokenizer.json", 5)
    assert short.ids.shape == (1, 5)


def test_text_needs_a_tokenizer(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("hello\n")
    with pytest.raises(InputError, match="needs a tokenizer"):
        load_batch(tiny(input__text=str(path)))


@pytest.mark.parametrize("name", ["s.txt", "s.txt.gz", "s.jsonl", "s.parquet"])
def test_one_batch_text_reads_every_corpus_format(tmp_path, minilm_dir, name):
    """``mpiattn bench`` with ``input.text`` reads records as a text run does: a lone
    ``\\r`` ends a line, a BOM is not text, JSON Lines and Parquet give their field."""
    import gzip
    import json

    sentences = ["Hello world.", "Second line", "", "third, last"]
    path = tmp_path / name
    if name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": sentences}), path)
    elif ".jsonl" in name:
        path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    else:
        raw = ("\ufeff" + "\r".join(sentences[:2]) + "\r\n" + "\n".join(sentences[2:])
               + "\n").encode()
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    cfg = tiny(input__text=str(path), input__tokenizer=str(minilm_dir / "tokenizer.json"),
               model__vocab=30522, input__seq_len=16)
    want = text_batch(sentences, minilm_dir / "tokenizer.json", 16)
    got = load_batch(cfg)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.mask, want.mask)


def test_one_batch_text_refuses_pairs(tmp_path, minilm_dir):
    from mpiattn.errors import ConfigError

    path = tmp_path / "p.txt"
    path.write_text("a\tb\n")
    cfg = tiny(input__text=str(path), input__tokenizer=str(minilm_dir / "tokenizer.json"),
               model__vocab=30522, input__pairs=True)
    with pytest.raises(ConfigError, match="input.pairs needs a text run"):
        load_batch(cfg)
