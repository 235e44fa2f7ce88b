"""Seeded shards never depend on the rank count; checkpoints load slice by slice."""

import dataclasses

import numpy as np
import pytest
from helpers import tiny

from mpiattn.core.shard import head_shard
from mpiattn.errors import InputError
from mpiattn.io.weights import SafetensorsWeights, SeededWeights, resolve_weights

FIELDS = ("w_qkv", "b_qkv", "w_o", "w_1", "b_1", "w_2")


def test_seeded_shards_tile_the_full_layer():
    cfg = tiny(model__ffn=250)  # 250 MLP columns over 12 heads: uneven groups
    m = cfg.model
    src = SeededWeights(3, m, "float32")
    d = m.hidden // m.heads
    full = src.layer(1, head_shard(m.heads, d, m.ffn, 1, 0))
    for parts in (2, 5, 12):
        shards = [src.layer(1, head_shard(m.heads, d, m.ffn, parts, i)) for i in range(parts)]
        q, k, v = (np.concatenate([np.split(s.w_qkv, 3, axis=1)[j] for s in shards], axis=1)
                   for j in range(3))
        np.testing.assert_array_equal(np.concatenate([q, k, v], axis=1), full.w_qkv)
        np.testing.assert_array_equal(np.concatenate([s.w_o for s in shards]), full.w_o)
        np.testing.assert_array_equal(np.concatenate([s.w_1 for s in shards], axis=1), full.w_1)
        np.testing.assert_array_equal(np.concatenate([s.w_2 for s in shards]), full.w_2)
        for s in shards:
            np.testing.assert_array_equal(s.b_o, full.b_o)


def test_seed_changes_weights_and_dtype_does_not():
    m = tiny().model
    shard = head_shard(12, 8, m.ffn, 1, 0)
    a = SeededWeights(0, m, "float32").layer(0, shard)
    b = SeededWeights(1, m, "float32").layer(0, shard)
    c = SeededWeights(0, m, "float64").layer(0, shard)
    assert not np.array_equal(a.w_qkv, b.w_qkv)
    np.testing.assert_array_equal(a.w_qkv, c.w_qkv.astype(np.float32))


def export_hf(src, m) -> dict:
    """Our (in, out) layout back to Hugging Face BERT names, (out, in) weights."""
    full = head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0)
    e = src.embeddings()
    t = {
        "embeddings.word_embeddings.weight": e.word,
        "embeddings.position_embeddings.weight": e.position,
        "embeddings.token_type_embeddings.weight": e.token_type,
        "embeddings.LayerNorm.weight": e.ln_g, "embeddings.LayerNorm.bias": e.ln_b,
    }
    for i in range(m.layers):
        p = src.layer(i, full)
        pre = f"encoder.layer.{i}."
        for name, w, b in zip(("query", "key", "value"), np.split(p.w_qkv, 3, axis=1),
                              np.split(p.b_qkv, 3), strict=True):
            t[pre + f"attention.self.{name}.weight"] = w.T
            t[pre + f"attention.self.{name}.bias"] = b
        t[pre + "attention.output.dense.weight"] = p.w_o.T
        t[pre + "attention.output.dense.bias"] = p.b_o
        t[pre + "attention.output.LayerNorm.weight"] = p.ln1_g
        t[pre + "attention.output.LayerNorm.bias"] = p.ln1_b
        t[pre + "intermediate.dense.weight"] = p.w_1.T
        t[pre + "intermediate.dense.bias"] = p.b_1
        t[pre + "output.dense.weight"] = p.w_2.T
        t[pre + "output.dense.bias"] = p.b_2
        t[pre + "output.LayerNorm.weight"] = p.ln2_g
        t[pre + "output.LayerNorm.bias"] = p.ln2_b
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


@pytest.fixture
def checkpoint(tmp_path):
    from safetensors.numpy import save_file

    m = tiny().model
    src = SeededWeights(5, m, "float32")
    path = tmp_path / "model.safetensors"
    save_file(export_hf(src, m), str(path))
    return path, src, m


@pytest.mark.parametrize("parts", [1, 3, 5])
def test_safetensors_shards_equal_seeded_shards(checkpoint, parts):
    path, src, m = checkpoint
    loaded = SafetensorsWeights(path, m, "float32")
    d = m.hidden // m.heads
    for i in range(parts):
        shard = head_shard(m.heads, d, m.ffn, parts, i)
        got, want = loaded.layer(1, shard), src.layer(1, shard)
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    np.testing.assert_array_equal(loaded.embeddings().word, src.embeddings().word)


@pytest.mark.parametrize("hidden", [8, 6, 7])  # rows that start inside a 64-bit word too
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_embeddings_of_some_rows_are_those_rows_of_the_whole_table(hidden, dtype):
    """Seeded: the rows drawn alone (the stream jumps to them) are the whole table's rows,
    bit for bit, and the tables drawn after the word table are unchanged."""
    m = dataclasses.replace(tiny().model, hidden=hidden, vocab=97)
    src = SeededWeights(5, m, dtype)
    whole = src.embeddings()
    for rows in ([0], [96], [1, 2, 3, 40, 95, 96], list(range(97)), []):
        part = src.embeddings(np.array(rows, dtype=np.int64))
        assert part.word.shape == (len(rows), hidden) and part.word.dtype == whole.word.dtype
        np.testing.assert_array_equal(part.word, whole.word[rows])
        for name in ("position", "token_type", "ln_g", "ln_b"):
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name))
    with pytest.raises(ValueError, match="outside the 97 rows"):
        src.embeddings(np.array([3, 97]))


def test_safetensors_embeddings_of_some_rows(checkpoint):
    path, src, m = checkpoint
    rows = np.array([0, 3, m.vocab - 1])
    got = SafetensorsWeights(path, m, "float32").embeddings(rows)
    np.testing.assert_array_equal(got.word, src.embeddings().word[rows])
    np.testing.assert_array_equal(got.position, src.embeddings().position)


def test_missing_tensor_and_wrong_shape_are_named(checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _, m = checkpoint
    tensors = load_file(str(path))
    del tensors["encoder.layer.1.output.dense.bias"]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0)
    with pytest.raises(InputError, match="'encoder.layer.1.output.dense.bias' is missing"):
        SafetensorsWeights(tmp_path / "missing.safetensors", m, "float32").layer(1, shard)
    tensors["encoder.layer.1.output.dense.bias"] = np.zeros(7, np.float32)
    save_file(tensors, str(tmp_path / "shape.safetensors"))
    with pytest.raises(InputError, match=r"has shape \(7,\)"):
        SafetensorsWeights(tmp_path / "shape.safetensors", m, "float32").layer(1, shard)


def test_unreadable_and_absent_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        SafetensorsWeights(junk, tiny().model, "float32")
    with pytest.raises(InputError, match="no safetensors file"):
        resolve_weights(str(tmp_path / "absent"))
    with pytest.raises(InputError, match="not installed"):
        resolve_weights("package:no_such_package_here/model")


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5])
def test_seeded_model_is_the_same_at_1_to_5_head_ranks(parts):
    """Every layer of a model split over ``parts`` head ranks joins to the one-rank layer,
    bit for bit (heads 12 over 5 ranks: 3, 3, 2, 2, 2)."""
    from mpiattn.core.model import join_shards

    m = tiny(model__ffn=250).model
    d = m.hidden // m.heads
    src = SeededWeights(11, m, "float32")
    for layer in range(m.layers):
        whole = src.layer(layer, head_shard(m.heads, d, m.ffn, 1, 0))
        joined = join_shards([src.layer(layer, head_shard(m.heads, d, m.ffn, parts, i))
                              for i in range(parts)])
        for name in (*FIELDS, "b_o", "ln1_g", "ln1_b", "b_2", "ln2_g", "ln2_b"):
            np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name),
                                          err_msg=f"layer {layer} {name}")


def test_seeded_values_are_table_entries_picked_by_16_raw_bits():
    """A head's stream, rebuilt by hand: its first tensor (Q) is the normal table at the
    little-endian 16-bit quarters of the raw PCG64 words, times 1/sqrt(hidden)."""
    from mpiattn.io.weights import _HEAD, _normal_table

    m = tiny().model
    d = m.hidden // m.heads
    got = SeededWeights(4, m, "float32").layer(2, head_shard(m.heads, d, m.ffn, 1, 0))
    rng = np.random.default_rng([4, _HEAD, 2, 0])  # seed, tag, layer, head 0
    n = m.hidden * d
    words = rng.bit_generator.random_raw((n + 3) // 4)
    picks = [(int(w) >> (16 * j)) & 0xFFFF for w in words for j in range(4)][:n]
    want = _normal_table()[picks] * np.float32(1 / np.sqrt(m.hidden))
    np.testing.assert_array_equal(got.w_qkv[:, :d], want.reshape(m.hidden, d))


def test_normal_table_is_standard_normal():
    """Mean 0, variance 1, and its empirical CDF within 0.01 of Phi everywhere (the
    Kolmogorov-Smirnov distance; a 2^16-value normal sample is at ~0.003)."""
    import math

    from mpiattn.io.weights import _normal_table

    z = np.sort(_normal_table().astype(np.float64))
    assert z.dtype == np.float64 and z.size == 1 << 16
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    phi = np.array([0.5 * (1 + math.erf(x / math.sqrt(2))) for x in z[::64]])
    empirical = (np.arange(z.size)[::64] + 0.5) / z.size
    assert np.abs(empirical - phi).max() < 0.01
    assert len(np.unique(z)) > 0.99 * z.size
