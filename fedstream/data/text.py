"""Text preprocessing for next-character and next-word prediction: pure NumPy functions.

Used once, at preprocess time, by the `shakespeare` and `stackoverflow`
recipes; their outputs are int32 id arrays. The id conventions are those of
the TensorFlow Federated (TFF) baselines
(`tff.simulation.baselines.{shakespeare,stackoverflow}`):

    PAD = 0, the vocabulary's tokens 1..V (in vocabulary order), OOV = V + 1,
    BOS = V + 2, EOS = V + 3; V + 4 ids in all.

Characters (Shakespeare): V = 86, the TFF `CHAR_VOCAB` (reused from TFF's
text-generation tutorial) in its own order, so PAD 0, chars 1..86, OOV 87,
BOS 88, EOS 89 (90 ids). Like TFF (`tf.strings.bytes_split`) the lookup is
per UTF-8 *byte*: every byte that is not one of the 86 ASCII characters is
one OOV id, so a 2-byte character gives two OOV ids. FedJAX uses the same
86 characters with PAD 0, BOS 1, EOS 2, chars 3..88, OOV 89 instead.

Words (Stack Overflow): the first V lines (10,000 by default) of TFF's
`stackoverflow.word_count` file (`word count` per line, most frequent first),
one OOV bucket, so PAD 0, words 1..V, OOV V+1, BOS V+2, EOS V+3. FedJAX uses
PAD 0, BOS 1, EOS 2, words 3..V+2, OOV V+3.

The vocabulary of a dataset is stored with it as the asset `vocab.json`
(`Vocabulary.to_json`), read back with `Vocabulary.from_json(ds.asset(...))`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Sequence

import numpy as np

# TFF baselines/shakespeare/char_prediction_preprocessing.py CHAR_VOCAB: 86 characters, in this order.
CHAR_VOCAB = "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
SHAKESPEARE_SEQUENCE_LENGTH = 80  # McMahan et al. (AISTATS 2017), TFF and FedJAX default
STACKOVERFLOW_VOCAB_SIZE = 10_000  # TFF DEFAULT_WORD_VOCAB_SIZE
STACKOVERFLOW_SEQUENCE_LENGTH = 20  # TFF DEFAULT_SEQUENCE_LENGTH (Reddi et al. 2021)
PAD_ID = 0
VOCAB_FORMAT = "fedstream.vocab/1"
PACKINGS = ("joined", "tff", "fedjax")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A token vocabulary with TFF's special ids: PAD 0, tokens 1..V, OOV V+1, BOS V+2, EOS V+3.

    `kind` is "char" (tokens are single ASCII characters, looked up per byte)
    or "word" (tokens are words, looked up after splitting on ' ').
    """

    tokens: tuple[str, ...]
    kind: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.kind not in ("char", "word"):
            raise ValueError(f"vocabulary kind must be 'char' or 'word', got {self.kind!r}")
        if not self.tokens:
            raise ValueError("a vocabulary needs at least one token")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")
        if self.kind == "char" and any(len(t) != 1 or ord(t) > 127 for t in self.tokens):
            raise ValueError("a character vocabulary holds single ASCII characters")
        if self.kind == "word" and any(not t or " " in t for t in self.tokens):
            raise ValueError("vocabulary words must be non-empty and contain no space")

    @property
    def pad(self) -> int:
        """Padding id, 0."""
        return PAD_ID

    @property
    def oov(self) -> int:
        """Out-of-vocabulary id, V + 1."""
        return len(self.tokens) + 1

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id, V + 2."""
        return len(self.tokens) + 2

    @property
    def eos(self) -> int:
        """End-of-sequence id, V + 3."""
        return len(self.tokens) + 3

    @property
    def size(self) -> int:
        """Number of ids, V + 4 (the model's input and output size)."""
        return len(self.tokens) + 4

    @property
    def special_ids(self) -> tuple[int, int, int, int]:
        """(PAD, OOV, BOS, EOS): the ids left out of "in-vocabulary" accuracy."""
        return (self.pad, self.oov, self.bos, self.eos)

    def id_to_token(self) -> list[str]:
        """Token string of every id: `<pad>`, the tokens, `<oov>`, `<bos>`, `<eos>`."""
        return ["<pad>", *self.tokens, "<oov>", "<bos>", "<eos>"]

    def to_json(self, **extra: object) -> bytes:
        """The `vocab.json` asset: ids, special ids and tokens (id = index + 1), plus `extra` keys."""
        doc: dict[str, object] = {
            "format": VOCAB_FORMAT, "kind": self.kind, "size": self.size,
            "pad": self.pad, "oov": self.oov, "bos": self.bos, "eos": self.eos,
            "convention": "TFF baselines: PAD 0, tokens 1..V, OOV V+1, BOS V+2, EOS V+3",
            "lookup": "per UTF-8 byte" if self.kind == "char" else "split on ' '",
            "tokens": list(self.tokens),
        }
        for key, value in extra.items():
            if key in doc:
                raise ValueError(f"vocab.json key {key!r} is reserved")
            doc[key] = value
        return (json.dumps(doc, indent=1, ensure_ascii=True) + "\n").encode("ascii")

    @classmethod
    def from_json(cls, data: bytes | str) -> Vocabulary:
        """Inverse of `to_json`; checks that the stored ids agree with the convention."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != VOCAB_FORMAT or not isinstance(doc.get("tokens"), list):
            raise ValueError(f"not a {VOCAB_FORMAT} vocabulary")
        vocab = cls(tuple(doc["tokens"]), doc.get("kind"))
        stored = tuple(doc.get(k) for k in ("pad", "oov", "bos", "eos", "size"))
        if stored != (*vocab.special_ids, vocab.size):
            raise ValueError(f"vocab.json ids {stored} do not match the TFF convention for {len(vocab.tokens)} tokens")
        return vocab


def char_vocabulary(chars: str = CHAR_VOCAB) -> Vocabulary:
    """The character vocabulary (default: TFF's 86 characters, ids 1..86; 90 ids with the specials)."""
    return Vocabulary(tuple(chars), "char")


def char_table(vocab: Vocabulary) -> np.ndarray:
    """int32 [256]: the id of every byte value (OOV for bytes not in the vocabulary)."""
    if vocab.kind != "char":
        raise ValueError("char_table needs a character vocabulary")
    table = np.full(256, vocab.oov, np.int32)
    for i, c in enumerate(vocab.tokens):
        table[ord(c)] = i + 1
    return table


def encode_chars(data: bytes, table: np.ndarray) -> np.ndarray:
    """int32 ids of the bytes of `data` (one id per byte, as TFF's `bytes_split` lookup)."""
    return table[np.frombuffer(data, np.uint8)]


def snippet_stream(snippets: Sequence[bytes], table: np.ndarray, bos: int, eos: int) -> np.ndarray:
    """int32 [sum(len + 2)]: every snippet as BOS, its byte ids, EOS, one after the other."""
    out = np.empty(sum(len(s) + 2 for s in snippets), np.int32)
    pos = 0
    for s in snippets:
        out[pos] = bos
        out[pos + 1: pos + 1 + len(s)] = encode_chars(s, table)
        out[pos + 1 + len(s)] = eos
        pos += len(s) + 2
    return out


def cut_windows(stream: np.ndarray, length: int, pad: int = PAD_ID) -> np.ndarray:
    """[ceil(n / length), length]: consecutive non-overlapping windows, the last filled with `pad`."""
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    stream = np.asarray(stream)
    rows = -(-len(stream) // length)
    out = np.full((rows, length), pad, stream.dtype)
    out.reshape(-1)[: len(stream)] = stream
    return out


def char_sequences(snippets: Sequence[bytes], table: np.ndarray, vocab: Vocabulary,
                   sequence_length: int = SHAKESPEARE_SEQUENCE_LENGTH,
                   packing: str = "joined") -> tuple[np.ndarray, np.ndarray]:
    """Next-character examples of one client: `x`, `y` int32 [n, sequence_length], PAD-filled.

    Each snippet becomes BOS + byte ids + EOS. `packing`:
      - "joined": the snippets' sequences are concatenated into one stream, cut
        into windows of sequence_length + 1, the last padded; x = w[:-1], y = w[1:].
      - "tff": as TFF's baseline, each snippet's sequence is padded on its own
        to a multiple of sequence_length + 1 and cut; x = w[:-1], y = w[1:].
      - "fedjax": as FedJAX, the joined stream s gives x = s[:-1], y = s[1:],
        each padded to a multiple of sequence_length and cut (no token is lost
        between windows).
    A client without snippets gives [0, sequence_length] arrays.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    if packing == "fedjax":
        stream = snippet_stream(snippets, table, vocab.bos, vocab.eos)
        return cut_windows(stream[:-1], sequence_length), cut_windows(stream[1:], sequence_length)
    if packing == "joined":
        windows = cut_windows(snippet_stream(snippets, table, vocab.bos, vocab.eos), sequence_length + 1)
    else:
        parts = [cut_windows(snippet_stream([s], table, vocab.bos, vocab.eos), sequence_length + 1)
                 for s in snippets]
        windows = np.concatenate(parts) if parts else np.zeros((0, sequence_length + 1), np.int32)
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


def num_char_sequences(snippet_lengths: Sequence[int], sequence_length: int = SHAKESPEARE_SEQUENCE_LENGTH,
                       packing: str = "joined") -> int:
    """How many examples `char_sequences` makes from snippets of these byte lengths."""
    lengths = np.asarray(snippet_lengths, np.int64) + 2
    if packing == "tff":
        return int((-(-lengths // (sequence_length + 1))).sum())
    total = int(lengths.sum())
    if packing == "joined":
        return -(-total // (sequence_length + 1))
    if packing == "fedjax":
        return -(-max(total - 1, 0) // sequence_length)
    raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")


def parse_word_counts(lines: Iterable[str], limit: int | None = None) -> list[tuple[str, int]]:
    """(word, count) of the first `limit` lines (all if None) of a `stackoverflow.word_count` file.

    Each line is `word count` (whitespace-separated, as TFF's `line.split()`);
    counts must be non-negative integers in non-increasing order and words
    unique, so that the first V lines are the V most frequent words (ties in
    file order, as TFF's `load_word_counts(vocab_size=V)`). Errors name the line.
    """
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    previous = None
    for number, line in enumerate(lines, 1):
        if limit is not None and len(out) >= limit:
            break
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"word counts line {number}: expected 'word count', got {line.strip()[:60]!r}")
        word, count = fields[0], int(fields[1])
        if word in seen:
            raise ValueError(f"word counts line {number}: duplicate word {word!r}")
        if previous is not None and count > previous:
            raise ValueError(f"word counts line {number}: counts are not sorted in decreasing order "
                             f"({word!r} {count} after {previous})")
        seen.add(word)
        previous = count
        out.append((word, count))
    return out


def word_vocabulary(word_counts: Iterable[tuple[str, int]] | Iterable[str],
                    vocab_size: int = STACKOVERFLOW_VOCAB_SIZE) -> Vocabulary:
    """The first `vocab_size` words (of (word, count) pairs or words, most frequent first) as a vocabulary.

    Raises if there are fewer than `vocab_size` words.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    words = []
    for item in word_counts:
        words.append(item if isinstance(item, str) else item[0])
        if len(words) == vocab_size:
            break
    if len(words) < vocab_size:
        raise ValueError(f"the word counts hold {len(words)} words, fewer than vocab_size={vocab_size}")
    return Vocabulary(tuple(words), "word")


class WordTable(dict):
    """word -> id for a word vocabulary; a missing word gives OOV (without being inserted)."""

    def __init__(self, vocab: Vocabulary) -> None:
        if vocab.kind != "word":
            raise ValueError("WordTable needs a word vocabulary")
        super().__init__((w, i + 1) for i, w in enumerate(vocab.tokens))
        self.oov = vocab.oov

    def __missing__(self, word: str) -> int:
        return self.oov


def encode_sentences(sentences: Sequence[str], table: WordTable, vocab: Vocabulary,
                     max_length: int = STACKOVERFLOW_SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Next-word examples: `x`, `y` int32 [len(sentences), max_length], one per sentence.

    As TFF's `build_to_ids_fn` + `padded_batch(max_length + 1)`: the sentence
    is split on ' ' (Python's `str.split(' ')`, like `tf.strings.split(sep=' ')`:
    repeated spaces give empty words, which are OOV; '' is one OOV word), the
    first `max_length` words are looked up, EOS is appended only if fewer than
    `max_length` words remain, BOS is prepended, the row is PAD-filled to
    max_length + 1; x = row[:-1], y = row[1:].
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    n = len(sentences)
    lookup = table.__getitem__
    bos, eos = vocab.bos, vocab.eos
    lengths = np.empty(n, np.int64)  # ids per row before padding
    flat: list[int] = []
    for i, sentence in enumerate(sentences):
        words = sentence.split(" ", max_length)[:max_length]  # maxsplit: a long sentence is not split further
        flat.append(bos)
        flat.extend(map(lookup, words))
        if len(words) < max_length:
            flat.append(eos)
        lengths[i] = len(words) + 1 + (len(words) < max_length)
    rows = np.zeros((n, max_length + 1), np.int32)
    if n:  # scatter the flat ids into their rows in one step
        starts = np.cumsum(lengths) - lengths
        rows[np.repeat(np.arange(n), lengths), np.arange(len(flat)) - np.repeat(starts, lengths)] = flat
    return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])


def decode_ids(ids: Iterable[int], vocab: Vocabulary, skip_pad: bool = True) -> list[str]:
    """Token strings of `ids` (for inspection and tests); PAD dropped unless `skip_pad` is False."""
    names = vocab.id_to_token()
    return [names[int(i)] for i in ids if not (skip_pad and int(i) == PAD_ID)]


def check_utf8(texts: Iterable[bytes], what: str) -> None:
    """Raises ValueError naming `what` and the example index if a text is not valid UTF-8."""
    for i, t in enumerate(texts):
        try:
            t.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what}: example {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
