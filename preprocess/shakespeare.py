"""Recipe `shakespeare`: TFF's federated Shakespeare as next-character sequences (80 ids, 90-id vocabulary).

TFF's `tff.simulation.datasets.shakespeare` (LEAF's preprocessing of the
Complete Works of Shakespeare): 715 clients, one per speaking role
(`PLAY_CHARACTER`, e.g. `THE_TRAGEDY_OF_KING_LEAR_MACBETH`), each example
(`snippets`, bytes) a contiguous set of lines the role speaks; every role
has examples in both splits. Two upstream layouts are read:

- `shakespeare.sqlite.lzma` (TFF's current file): splits `train`/`test`,
  tf.Example feature `snippets` (one bytes value). No sha256 is pinned for
  it, so downloading it needs `--config.download=sqlite --config.sha256=<hex>`;
  or pass a local copy with `--source shakespeare.sqlite.lzma`;
- the legacy archive `shakespeare.tar.bz2` (sha256 pinned, the default
  download) of `shakespeare_{train,test}.h5` (needs h5py:
  `pip install 'fedstream[tff-h5]'`), or a directory of those .h5 files;
- FedJAX's copy (`fedjax.datasets.shakespeare.load_split`):
  `shakespeare_train.sqlite` and `shakespeare_test.sqlite`, table
  `federated_data`, feature `snippets` as bytes strings (msgpack ext type
  4). `--source` is either file (the other must lie next to it) or their
  directory. FedJAX's "<16 hex>:" id prefix is dropped and clients are read
  in id order, so ids, counts and sequences equal those from TFF's files.

Text preprocessing happens here, once (fedstream/data/text.py). The
vocabulary is TFF's (`baselines/shakespeare/char_prediction_preprocessing.py`):
PAD 0, the 86 characters of `CHAR_VOCAB` in its order as ids 1..86, OOV 87,
BOS 88, EOS 89; 90 ids, stored as the asset `vocab.json`. The lookup is per
UTF-8 byte, as TFF's `bytes_split` (a non-ASCII character is one OOV per
byte); a snippet that is not valid UTF-8 is an error naming the client.
(FedJAX orders the same ids differently: PAD 0, BOS 1, EOS 2, chars 3..88,
OOV 89.)

Examples, `x` and `y` int32 (sequence_length,) = (80,), with `packing`:

- `joined` (default): each snippet of a client becomes BOS + ids + EOS; the
  client's snippets are concatenated into one stream, cut into windows of
  81, the last padded with PAD; x = window[:-1], y = window[1:]. A client's
  last window is its only padded one.
- `tff`: TFF's baseline exactly: every snippet padded on its own to a
  multiple of 81, then cut (more padding, more examples).
- `fedjax`: FedJAX's: the joined stream s gives x = s[:-1], y = s[1:], each
  padded to a multiple of 80 and cut (windows share their boundary token,
  so every token but the first is a target).

Counts: TFF publishes 715 clients and 16,068 train / 2,356 test snippets,
not the number of sequences, so the check against upstream is on snippets
and clients: the file's client_metadata before reading (SQLite), and what
was read, per split (an error, a warning with `check_counts=False`). The
number of sequences written is checked against `expected_counts`, computed
from the snippet lengths (by `text.num_char_sequences`, not from the
sequences written) during the same pass, so the input is decompressed or
extracted once; `expected_counts` called on its own reads the input again.
FedJAX's files: the counts of their rows (`num_examples`) are checked first.

Training-time caps (TFF's `max_elements` per client) are the pipeline's
`client.max_examples`; they count sequences here, not snippets as in TFF.

    fedstream preprocess shakespeare --output data/shakespeare --source shakespeare.sqlite.lzma
    fedstream preprocess shakespeare --output data/shakespeare --source shakespeare_train.sqlite  # FedJAX's
"""

from __future__ import annotations

from typing import Iterator

import ml_collections
import numpy as np

from fedstream.config import to_json
from fedstream.data import text
from fedstream.data.download import Remote
from fedstream.data.format import FeatureSpec, Schema
from fedstream.data.tff import TFFFormatError
from fedstream.recipes import _tff_common as common
from fedstream.recipes import _tff_text

SOURCE = ("Federated Shakespeare of TensorFlow Federated (tff.simulation.datasets.shakespeare: LEAF, Caldas et al. "
          "2018, preprocessing of The Complete Works of William Shakespeare, Project Gutenberg, public domain; "
          "one client per speaking role), files from storage.googleapis.com/tff-datasets-public (TFF code "
          "Apache-2.0, LEAF BSD-2-Clause); as next-character ids with TFF's 86-character vocabulary")

REMOTES = {
    "sqlite": Remote(common.TFF_BASE_URL + "shakespeare.sqlite.lzma"),
    "h5": Remote(common.TFF_BASE_URL + "shakespeare.tar.bz2",
                 sha256="0285be9906cb5f268092eee4edeeacfc2af4574f2941f7cc2f08a321d7f5c707"),
}
# output split -> (SQLite split name, legacy .h5 file name)
SPLITS = {"train": ("train", "shakespeare_train.h5"), "test": ("test", "shakespeare_test.h5")}
# (clients, snippets) per split, from TFF's documentation.
PUBLISHED = {"train": (715, 16_068), "test": (715, 2_356)}
FEATURES = {"snippets": ()}
# upstream split -> FedJAX's file of it (fedjax/datasets/shakespeare.py).
FEDJAX_FILES = {"train": "shakespeare_train.sqlite", "test": "shakespeare_test.sqlite"}
# (clients, sequences) per split counted by the last `generate` of a config, for `expected_counts`.
_COUNTED: dict[str, dict[str, tuple[int, int]]] = {}


def get_config() -> ml_collections.ConfigDict:
    """sequence_length (80), packing (joined | tff | fedjax), and the TFF source keys."""
    c = ml_collections.ConfigDict()
    c.sequence_length = text.SHAKESPEARE_SEQUENCE_LENGTH
    c.packing = "joined"  # joined | tff | fedjax (see the module docstring)
    common.add_source_keys(c, default_download="h5")
    return c


def _check_config(config: ml_collections.ConfigDict) -> None:
    if config.packing not in text.PACKINGS:
        raise ValueError(f"config.packing must be one of {', '.join(text.PACKINGS)}, got {config.packing!r}")
    if config.sequence_length < 1:
        raise ValueError(f"config.sequence_length must be >= 1, got {config.sequence_length}")


def schema(config: ml_collections.ConfigDict) -> Schema:
    """`x`, `y` int32 (sequence_length,): input ids and the next-character targets."""
    _check_config(config)
    return {"x": FeatureSpec("int32", (config.sequence_length,)), "y": FeatureSpec("int32", (config.sequence_length,))}


def _snippets(data: dict, where: str) -> list[bytes]:
    """The client's snippets as bytes, checked to be valid UTF-8."""
    snippets = data["snippets"]
    if not isinstance(snippets, list) or any(not isinstance(s, bytes) for s in snippets):
        raise TFFFormatError(f"{where}: feature 'snippets' is not one string per example")
    text.check_utf8(snippets, where)
    return snippets


def _clients(config: ml_collections.ConfigDict, check: bool = True) -> Iterator[tuple[str, str, list[bytes]]]:
    """(split, client id, snippets) of every client; `check`: compare snippets and clients with upstream's."""
    path = common.resolve_source(config, REMOTES)
    with _tff_text.open_with_counts(path, config, FEDJAX_FILES) as (read, counts):
        if check:
            _tff_text.check_metadata(config, path, counts, PUBLISHED, {s: u for s, (u, _) in SPLITS.items()},
                                     "snippets")
        for split, (sqlite_split, h5_name) in SPLITS.items():
            clients = snippets_read = 0
            for client_id, data in read(sqlite_split, h5_name, FEATURES):
                snippets = _snippets(data, f"{path}: split {split!r}, client {client_id!r}")
                clients += 1
                snippets_read += len(snippets)
                yield split, client_id, snippets
            if check:
                _tff_text.check_published(config, path, split, "snippets", (clients, snippets_read), PUBLISHED[split])


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields every `train` client, then every `test` client, in client id order: `x`, `y` [n, 80] int32."""
    _check_config(config)
    vocab = text.char_vocabulary()
    table = text.char_table(vocab)
    key = to_json(config)
    _COUNTED.pop(key, None)
    counted = {split: [0, 0] for split in SPLITS}
    for split, client_id, snippets in _clients(config):
        x, y = text.char_sequences(snippets, table, vocab, config.sequence_length, config.packing)
        counted[split][0] += 1
        counted[split][1] += text.num_char_sequences([len(s) for s in snippets], config.sequence_length,
                                                     config.packing)
        yield split, client_id, {"x": x, "y": y}
    _COUNTED[key] = {split: (c, n) for split, (c, n) in counted.items()}


def assets(config: ml_collections.ConfigDict) -> dict[str, bytes]:
    """`vocab.json`: the 90-id character vocabulary (TFF ids) with the sequence length and packing."""
    return {"vocab.json": text.char_vocabulary().to_json(task="next-character prediction",
                                                          sequence_length=config.sequence_length,
                                                          packing=config.packing)}


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 of the local source file(s) (FedJAX's: each split file), or the pinned sha256 of the download."""
    return _tff_text.fingerprint(config, REMOTES, FEDJAX_FILES)


def expected_counts(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """(clients, sequences) per split, computed from the snippet lengths.

    After a complete `generate` of the same config, its tally (no second
    decompression or extraction); otherwise a second pass over the input.
    """
    counted = _COUNTED.pop(to_json(config), None)
    if counted is not None:
        return counted
    out: dict[str, list[int]] = {split: [0, 0] for split in SPLITS}
    for split, _, snippets in _clients(config, check=False):
        out[split][0] += 1
        out[split][1] += text.num_char_sequences([len(s) for s in snippets], config.sequence_length, config.packing)
    return {split: (c, n) for split, (c, n) in out.items()}
