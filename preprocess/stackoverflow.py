"""Recipe `stackoverflow`: TFF's federated Stack Overflow as next-word sequences (20 ids, 10,004-id vocabulary).

TFF's `tff.simulation.datasets.stackoverflow`: the bodies of Stack Overflow
questions and answers, one client per user, one example per sentence
(lower-cased, HTML-unescaped, non-ASCII removed, punctuation split into
tokens; users with fewer than 100 sentences dropped). Splits and sizes (TFF):

    train    (before 2018-01-01, not held-out users)  342,477 clients  135,818,730 sentences
    heldout  (users with id % 10 == 0, all dates)       38,758 clients   16,491,230 sentences
    test     (after 2018-01-01, not held-out users)    204,088 clients   16,586,035 sentences

Upstream features per sentence: `tokens` (space-separated words), `title`,
`tags` ('|'-separated), `type` (question/answer), `creation_date`, `score`.
Only `tokens` is used: this recipe is the standard next-word task; the
tag-prediction task (tags + title/tokens bag of words) is out of scope.

Two upstream layouts are read: `stackoverflow.sqlite.lzma` (TFF's current
file, splits `train`/`heldout`/`test`; no sha256 is pinned, so downloading
it needs `--config.download=sqlite --config.sha256=<hex>`, or pass a local
copy with `--source`), or the legacy archive `stackoverflow.tar.bz2`
(sha256 pinned, the default download) of
`stackoverflow_{train,held_out,test}.h5` (needs h5py), or FedJAX's copy
(`fedjax.datasets.stackoverflow.load_split`): `stackoverflow_train.sqlite`,
`stackoverflow_held_out.sqlite`, `stackoverflow_test.sqlite`, table
`federated_data`, `tokens` as bytes strings (msgpack ext type 4). `--source`
is one of those files (the other selected splits' files must lie next to
it) or their directory; FedJAX's "<16 hex>:" id prefix is dropped and
clients are read in id order, so ids, counts and word ids equal those
from TFF's files. (FedJAX's `load_data` also derives a `domain_id`,
question 0 / answer 1, from `type`; it is not written here, as for TFF.)

Vocabulary (TFF's `baselines/stackoverflow/word_prediction_preprocessing.py`,
Reddi et al. 2021): the first `vocab_size` (10,000) lines of TFF's
`stackoverflow.word_count` (lines `word count`, most frequent first; count =
number of train users using the word), from the archive
`stackoverflow.word_count.tar.bz2` (sha256 pinned; `word_counts` = a local
copy of the archive or the extracted file). Ids: PAD 0, words 1..10,000 in
file order, OOV 10,001 (one bucket), BOS 10,002, EOS 10,003; 10,004 ids,
stored as the asset `vocab.json`. (FedJAX: PAD 0, BOS 1, EOS 2, words
3..10,002, OOV 10,003.)

Examples, one per sentence, `x` and `y` int32 (sequence_length,) = (20,):
the tokens split on ' ', truncated to 20 words, looked up, EOS appended
only if fewer than 20 words remain, BOS prepended, PAD-filled to 21;
x = ids[:-1], y = ids[1:] (TFF's `build_to_ids_fn` + `padded_batch(21)`).

Not capped here: TFF caps a client at training time (`ClientSpec.max_elements`,
`take` after the shuffle; Reddi et al. use 1,000 per client), so use the
pipeline's `client.max_examples`. The written (clients, examples) per split
are checked against TFF's numbers above (a SQLite file's client_metadata is
checked before reading, so a wrong file fails at once); `check_counts=False`
makes a mismatch a warning. `splits` selects the splits to write.

    fedstream preprocess stackoverflow --output data/stackoverflow --source stackoverflow.sqlite.lzma \
        --config.word_counts=stackoverflow.word_count.tar.bz2
    fedstream preprocess stackoverflow --output data/stackoverflow --source DIR_OF_FEDJAX_FILES \
        --config.word_counts=stackoverflow.word_count.tar.bz2
"""

from __future__ import annotations

import functools
import io
import pathlib
import tarfile
from typing import Iterator, TextIO

import ml_collections
import numpy as np

from fedstream.data import text
from fedstream.data.download import Remote, fetch
from fedstream.data.format import FeatureSpec, Schema, file_sha256
from fedstream.data.tff import TFFFormatError
from fedstream.recipes import _tff_common as common
from fedstream.recipes import _tff_text

SOURCE = ("Federated Stack Overflow of TensorFlow Federated (tff.simulation.datasets.stackoverflow: Stack Overflow "
          "questions and answers from the Stack Exchange data dump via Kaggle/BigQuery, CC BY-SA 3.0; one client "
          "per user), files from storage.googleapis.com/tff-datasets-public (TFF code Apache-2.0); as next-word "
          "ids with the 10,000 most frequent words of TFF's stackoverflow.word_count")

REMOTES = {
    "sqlite": Remote(common.TFF_BASE_URL + "stackoverflow.sqlite.lzma"),
    "h5": Remote(common.TFF_BASE_URL + "stackoverflow.tar.bz2",
                 sha256="99eca2f8b8327a09e5fc123979df2d237acbc5e52322f6d86bf523ee47b961a2"),
}
WORD_COUNTS = Remote(common.TFF_BASE_URL + "stackoverflow.word_count.tar.bz2",
                     sha256="1dc00256d6e527c54b9756d968118378ae14e6692c0b3b6cad470cdd3f0c519c")
WORD_COUNTS_MEMBER = "stackoverflow.word_count"
# output split -> (SQLite split name, legacy .h5 file name)
SPLITS = {"train": ("train", "stackoverflow_train.h5"), "heldout": ("heldout", "stackoverflow_held_out.h5"),
          "test": ("test", "stackoverflow_test.h5")}
# (clients, sentences) per split, from TFF's documentation.
PUBLISHED = {"train": (342_477, 135_818_730), "heldout": (38_758, 16_491_230), "test": (204_088, 16_586_035)}
FEATURES = {"tokens": ()}
# upstream split -> FedJAX's file of it (fedjax/datasets/stackoverflow.py).
FEDJAX_FILES = {"train": "stackoverflow_train.sqlite", "heldout": "stackoverflow_held_out.sqlite",
                "test": "stackoverflow_test.sqlite"}


def _fedjax_names(config: ml_collections.ConfigDict) -> dict[str, str]:
    """FedJAX's files of the selected splits (upstream split -> file name)."""
    return {SPLITS[s][0]: FEDJAX_FILES[SPLITS[s][0]] for s in selected_splits(config)}


def get_config() -> ml_collections.ConfigDict:
    """splits, vocab_size (10,000), sequence_length (20), word_counts, and the TFF source keys."""
    c = ml_collections.ConfigDict()
    c.splits = "train,heldout,test"  # comma-separated subset of train, heldout, test
    c.vocab_size = text.STACKOVERFLOW_VOCAB_SIZE
    c.sequence_length = text.STACKOVERFLOW_SEQUENCE_LENGTH
    c.word_counts = ""  # local stackoverflow.word_count.tar.bz2 or extracted stackoverflow.word_count; '' = download
    common.add_source_keys(c, default_download="h5")
    return c


def selected_splits(config: ml_collections.ConfigDict) -> list[str]:
    """The output splits to write, in the order train, heldout, test."""
    chosen = [s.strip() for s in config.splits.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SPLITS))
    if unknown or not chosen:
        raise ValueError(f"config.splits must be a comma-separated subset of {', '.join(SPLITS)}, "
                         f"got {config.splits!r}")
    return [s for s in SPLITS if s in chosen]


def schema(config: ml_collections.ConfigDict) -> Schema:
    """`x`, `y` int32 (sequence_length,): input ids and the next-word targets."""
    if config.sequence_length < 1:
        raise ValueError(f"config.sequence_length must be >= 1, got {config.sequence_length}")
    return {"x": FeatureSpec("int32", (config.sequence_length,)), "y": FeatureSpec("int32", (config.sequence_length,))}


def _word_counts_path(config: ml_collections.ConfigDict) -> pathlib.Path:
    if config.word_counts:
        path = pathlib.Path(config.word_counts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (config.word_counts)")
        return path
    return fetch(WORD_COUNTS, config.cache_dir, progress=common.say)


def read_vocabulary(path: pathlib.Path, vocab_size: int) -> text.Vocabulary:
    """The first `vocab_size` words of a word-count file or of its `.tar.bz2` archive."""
    def build(lines: TextIO) -> text.Vocabulary:
        try:
            return text.word_vocabulary(text.parse_word_counts(lines, limit=vocab_size), vocab_size)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: the word counts are not UTF-8 text ({e.reason})") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    if not path.name.endswith((".tar.bz2", ".tbz2", ".tar.gz", ".tgz", ".tar")):
        with open(path, encoding="utf-8") as f:
            return build(f)
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and pathlib.PurePosixPath(member.name).name == WORD_COUNTS_MEMBER:
                    raw = tar.extractfile(member)
                    assert raw is not None
                    with io.TextIOWrapper(raw, encoding="utf-8") as f:
                        return build(f)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path}: truncated or unreadable archive ({e})") from None
    raise ValueError(f"{path}: the archive holds no {WORD_COUNTS_MEMBER} file")


@functools.lru_cache(maxsize=4)
def _cached_vocabulary(path: str, size: int, mtime_ns: int, vocab_size: int) -> text.Vocabulary:
    return read_vocabulary(pathlib.Path(path), vocab_size)


def vocabulary(config: ml_collections.ConfigDict) -> text.Vocabulary:
    """The word vocabulary: the first `vocab_size` words of the word counts (downloaded if not given)."""
    path = _word_counts_path(config)
    stat = path.stat()
    return _cached_vocabulary(str(path.resolve()), stat.st_size, stat.st_mtime_ns, int(config.vocab_size))


def _sentences(tokens: object, where: str) -> list[str]:
    """The client's `tokens` strings decoded (UTF-8; an invalid one is an error naming the example)."""
    if not isinstance(tokens, list) or any(not isinstance(t, bytes) for t in tokens):
        raise TFFFormatError(f"{where}: feature 'tokens' is not one string per example")
    try:
        return [t.decode("utf-8") for t in tokens]
    except UnicodeDecodeError:
        text.check_utf8(tokens, where)
        raise


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields every client of each selected split (train, heldout, test), in client id order."""
    splits = selected_splits(config)
    schema(config)
    vocab = vocabulary(config)
    table = text.WordTable(vocab)
    path = common.resolve_source(config, REMOTES)
    with _tff_text.open_with_counts(path, config, _fedjax_names(config)) as (read, counts):
        _tff_text.check_metadata(config, path, counts, PUBLISHED, {s: SPLITS[s][0] for s in splits}, "sentences")
        for split in splits:
            sqlite_split, h5_name = SPLITS[split]
            for client_id, data in read(sqlite_split, h5_name, FEATURES):
                sentences = _sentences(data["tokens"], f"{path}: split {split!r}, client {client_id!r}")
                x, y = text.encode_sentences(sentences, table, vocab, config.sequence_length)
                yield split, client_id, {"x": x, "y": y}


def assets(config: ml_collections.ConfigDict) -> dict[str, bytes]:
    """`vocab.json`: the 10,004-id word vocabulary (TFF ids) with the sequence length."""
    return {"vocab.json": vocabulary(config).to_json(task="next-word prediction",
                                                     sequence_length=config.sequence_length)}


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 of the local source and word-count files, or the pinned sha256 of the downloads."""
    words = f"sha256:{file_sha256(_word_counts_path(config))}" if config.word_counts else f"sha256:{WORD_COUNTS.sha256}"
    return f"{_tff_text.fingerprint(config, REMOTES, _fedjax_names(config))};words={words}"


def expected_counts(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """TFF's published (clients, sentences) of each selected split (one example per sentence)."""
    return {split: PUBLISHED[split] for split in selected_splits(config)}
