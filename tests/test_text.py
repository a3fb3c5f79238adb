"""Text preprocessing (fedstream/data/text.py) against hand-computed ids."""

import numpy as np
import pytest

from fedstream.data import text

# Character ids (TFF): PAD 0, 'd' 1, 'h' 2, 'l' 3, ..., OOV 87, BOS 88, EOS 89.
D, H, L, OOV, BOS, EOS = 1, 2, 3, 87, 88, 89


@pytest.fixture(scope="module")
def chars():
    vocab = text.char_vocabulary()
    return vocab, text.char_table(vocab)


def test_char_vocabulary_is_tffs_90_ids():
    vocab = text.char_vocabulary()
    assert len(text.CHAR_VOCAB) == 86 and len(set(text.CHAR_VOCAB)) == 86
    assert (vocab.pad, vocab.oov, vocab.bos, vocab.eos, vocab.size) == (0, 87, 88, 89, 90)
    assert vocab.special_ids == (0, 87, 88, 89)
    names = vocab.id_to_token()
    assert names[:4] == ["<pad>", "d", "h", "l"] and names[86] == "\r" and names[14] == " "
    assert names[87:] == ["<oov>", "<bos>", "<eos>"]


def test_char_table_is_per_byte(chars):
    vocab, table = chars
    assert table.shape == (256,) and table.dtype == np.int32
    assert text.encode_chars(b"dhl", table).tolist() == [D, H, L]
    assert text.encode_chars(b"\n\r ", table).tolist() == [text.CHAR_VOCAB.index(c) + 1 for c in "\n\r "]
    # 'é' is two UTF-8 bytes: two OOV ids, like TFF's bytes_split lookup; '~' and tab are not in the vocabulary.
    assert text.encode_chars("dé~\t".encode(), table).tolist() == [D, OOV, OOV, OOV, OOV]


def test_snippet_stream(chars):
    vocab, table = chars
    stream = text.snippet_stream([b"dh", b"", b"l"], table, vocab.bos, vocab.eos)
    assert stream.dtype == np.int32
    assert stream.tolist() == [BOS, D, H, EOS, BOS, EOS, BOS, L, EOS]


def test_cut_windows():
    np.testing.assert_array_equal(text.cut_windows(np.arange(1, 6), 2), [[1, 2], [3, 4], [5, 0]])
    np.testing.assert_array_equal(text.cut_windows(np.arange(1, 5), 2), [[1, 2], [3, 4]])  # no all-PAD row
    assert text.cut_windows(np.zeros(0, np.int32), 3).shape == (0, 3)
    with pytest.raises(ValueError):
        text.cut_windows(np.arange(3), 0)


def test_char_sequences_joined_tff_fedjax(chars):
    vocab, table = chars
    snippets = [b"d", b"h"]  # stream: BOS d EOS BOS h EOS
    x, y = text.char_sequences(snippets, table, vocab, sequence_length=3, packing="joined")
    # windows of 4 over the joined stream: [BOS d EOS BOS] [h EOS PAD PAD]
    assert x.tolist() == [[BOS, D, EOS], [H, EOS, 0]]
    assert y.tolist() == [[D, EOS, BOS], [EOS, 0, 0]]
    assert x.dtype == y.dtype == np.int32 and x.flags.c_contiguous and y.flags.c_contiguous
    x, y = text.char_sequences(snippets, table, vocab, sequence_length=3, packing="tff")
    # each snippet padded on its own: [BOS d EOS PAD] [BOS h EOS PAD]
    assert x.tolist() == [[BOS, D, EOS], [BOS, H, EOS]]
    assert y.tolist() == [[D, EOS, 0], [H, EOS, 0]]
    x, y = text.char_sequences(snippets, table, vocab, sequence_length=3, packing="fedjax")
    # x = stream[:-1] = BOS d EOS BOS h, y = stream[1:] = d EOS BOS h EOS, each cut into 3s
    assert x.tolist() == [[BOS, D, EOS], [BOS, H, 0]]
    assert y.tolist() == [[D, EOS, BOS], [H, EOS, 0]]


def test_char_sequences_default_length_and_empty_client(chars):
    vocab, table = chars
    snippet = b"dh" * 50  # 100 bytes + BOS + EOS = 102 ids -> windows of 81: 2
    x, y = text.char_sequences([snippet], table, vocab)
    assert x.shape == y.shape == (2, 80)
    assert x[0, 0] == BOS and x[0, 1:].tolist() == ([D, H] * 40)[:79] and y[0].tolist() == [D, H] * 40
    assert x[1, :21].tolist() == [D, H] * 10 + [EOS] and not x[1, 21:].any()
    stream = [BOS] + [D, H] * 50 + [EOS]
    assert np.concatenate([x[0], [y[0, -1]], x[1], [y[1, -1]]]).tolist()[:102] == stream
    for packing in text.PACKINGS:
        x, y = text.char_sequences([], table, vocab, packing=packing)
        assert x.shape == y.shape == (0, 80)
    with pytest.raises(ValueError, match="packing"):
        text.char_sequences([b"d"], table, vocab, packing="nope")


def test_num_char_sequences_matches(chars):
    vocab, table = chars
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(text.CHAR_VOCAB.encode(), np.uint8)
    for _ in range(30):
        snippets = [rng.choice(alphabet, rng.integers(0, 300)).tobytes() for _ in range(rng.integers(0, 6))]
        for packing in text.PACKINGS:
            for length in (1, 5, 80):
                x, y = text.char_sequences(snippets, table, vocab, length, packing)
                assert len(x) == len(y) == text.num_char_sequences([len(s) for s in snippets], length, packing)
                # Nothing lost: every snippet id appears in x or y in order (joined: as one stream).
                if packing == "joined" and snippets:
                    rows = np.concatenate([x, y[:, -1:]], axis=1).reshape(-1)
                    stream = text.snippet_stream(snippets, table, vocab.bos, vocab.eos)
                    np.testing.assert_array_equal(rows[: len(stream)], stream)
                    assert not rows[len(stream):].any()


WORD_COUNTS = ["the 10\n", ". 9\n", "to 9\n", "a 3\n", "rare 1\n"]


def test_parse_word_counts_and_vocabulary():
    assert text.parse_word_counts(WORD_COUNTS) == [("the", 10), (".", 9), ("to", 9), ("a", 3), ("rare", 1)]
    assert text.parse_word_counts(WORD_COUNTS, limit=2) == [("the", 10), (".", 9)]
    # Only the first `limit` lines are read (as TFF): a bad line after them does not matter.
    assert text.parse_word_counts(["x 2\n", "y 1\n", "garbage\n"], limit=2) == [("x", 2), ("y", 1)]
    vocab = text.word_vocabulary(text.parse_word_counts(WORD_COUNTS), vocab_size=3)
    assert vocab.tokens == ("the", ".", "to")
    assert (vocab.pad, vocab.oov, vocab.bos, vocab.eos, vocab.size) == (0, 4, 5, 6, 7)
    big = text.word_vocabulary([f"w{i}" for i in range(10_000)])
    assert (big.oov, big.bos, big.eos, big.size) == (10_001, 10_002, 10_003, 10_004)
    with pytest.raises(ValueError, match="fewer than vocab_size=6"):
        text.word_vocabulary(text.parse_word_counts(WORD_COUNTS), vocab_size=6)


@pytest.mark.parametrize("lines, message", [
    (["the 10\n", "to 11\n"], "line 2: counts are not sorted"),
    (["the 10\n", "the 9\n"], "line 2: duplicate word 'the'"),
    (["the 10\n", "to\n"], "line 2: expected 'word count'"),
    (["the ten\n"], "line 1: expected 'word count'"),
    (["the 1 2\n"], "line 1: expected 'word count'"),
])
def test_parse_word_counts_errors(lines, message):
    with pytest.raises(ValueError, match=message):
        text.parse_word_counts(lines)


def test_encode_sentences():
    vocab = text.word_vocabulary(["the", ".", "to"], vocab_size=3)  # the 1, . 2, to 3, OOV 4, BOS 5, EOS 6
    table = text.WordTable(vocab)
    assert table["the"] == 1 and table["zebra"] == 4 and "zebra" not in table
    sentences = ["the to", "the . to", "a b c d", "", "the  to", "to"]
    x, y = text.encode_sentences(sentences, table, vocab, max_length=3)
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (6, 3)
    rows = np.concatenate([x, y[:, -1:]], axis=1).tolist()
    assert rows == [
        [5, 1, 3, 6],  # BOS the to EOS
        [5, 1, 2, 3],  # exactly max_length words: no EOS (TFF)
        [5, 4, 4, 4],  # truncated to 3 words, OOV
        [5, 4, 6, 0],  # '' splits into one empty word: OOV (as tf.strings.split(sep=' '))
        [5, 1, 4, 3],  # a double space gives an empty (OOV) word
        [5, 3, 6, 0],  # padded
    ]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    x, y = text.encode_sentences([], table, vocab, max_length=3)
    assert x.shape == y.shape == (0, 3)
    assert text.decode_ids([5, 1, 4, 3, 6, 0], vocab) == ["<bos>", "the", "<oov>", "to", "<eos>"]


def test_encode_sentences_default_length():
    vocab = text.word_vocabulary([f"w{i}" for i in range(10_000)])
    table = text.WordTable(vocab)
    long = " ".join(f"w{i}" for i in range(30))
    x, y = text.encode_sentences([long, "w0 w9999 zzz"], table, vocab)
    assert x.shape == (2, 20)
    assert x[0].tolist() == [10_002] + list(range(1, 20)) and y[0].tolist() == list(range(1, 21))
    assert x[1].tolist() == [10_002, 1, 10_000, 10_001, 10_003] + [0] * 15


def test_vocabulary_json_round_trip():
    for vocab in (text.char_vocabulary(), text.word_vocabulary(["the", "\u00e9t\u00e9", "'s"], 3)):
        data = vocab.to_json(sequence_length=80)
        assert isinstance(data, bytes)
        back = text.Vocabulary.from_json(data)
        assert back == vocab
        import json

        doc = json.loads(data)
        assert doc["sequence_length"] == 80 and doc["kind"] == vocab.kind
        assert [doc[k] for k in ("pad", "oov", "bos", "eos", "size")] == [*vocab.special_ids, vocab.size]
        doc["bos"] = 1
        with pytest.raises(ValueError, match="do not match"):
            text.Vocabulary.from_json(json.dumps(doc))
    with pytest.raises(ValueError, match="reserved"):
        text.char_vocabulary().to_json(size=3)


def test_vocabulary_validation():
    with pytest.raises(ValueError, match="unique"):
        text.Vocabulary(("a", "a"), "word")
    with pytest.raises(ValueError, match="no space"):
        text.Vocabulary(("a b",), "word")
    with pytest.raises(ValueError, match="single ASCII"):
        text.Vocabulary(("ab",), "char")


def test_check_utf8():
    text.check_utf8([b"ok", "\u00e9".encode()], "client A")
    with pytest.raises(ValueError, match=r"client A: example 1 is not valid UTF-8"):
        text.check_utf8([b"ok", b"bad \xff"], "client A")


def reference_encode(sentence: str, table: dict, oov: int, bos: int, eos: int, length: int) -> list[int]:
    """TFF's to_ids in plain Python: split on ' ', truncate, lookup (+1 ids), EOS if short, BOS, pad to length+1."""
    words = sentence.split(" ")[:length]
    ids = [bos] + [table.get(w, oov) for w in words] + ([eos] if len(words) < length else [])
    return ids + [0] * (length + 1 - len(ids))


def test_encode_sentences_matches_reference_on_random_text():
    rng = np.random.default_rng(0)
    pool = ["the", ".", "to", "a", "zebra", "", "x-y", "it's"]
    vocab = text.word_vocabulary(["the", ".", "to", "a", "it's"], vocab_size=5)
    table = text.WordTable(vocab)
    plain = {w: i + 1 for i, w in enumerate(vocab.tokens)}
    for length in (1, 3, 20):
        sentences = [" ".join(rng.choice(pool, rng.integers(0, 45)).tolist()) for _ in range(300)]
        sentences += ["", " ", "  the", "the  ", " ".join(["a"] * length), " ".join(["a"] * (length + 1))]
        x, y = text.encode_sentences(sentences, table, vocab, max_length=length)
        rows = np.concatenate([x, y[:, -1:]], axis=1).tolist()
        assert rows == [reference_encode(s, plain, vocab.oov, vocab.bos, vocab.eos, length) for s in sentences]
    original = ["a a a a", "the"]
    text.encode_sentences(original, table, vocab, max_length=2)
    assert original == ["a a a a", "the"]
