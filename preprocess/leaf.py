"""Recipe `leaf`: LEAF JSON directories (FEMNIST, Shakespeare, CelebA, Synthetic).

LEAF (Caldas et al., 2018; github.com/TalwalkarLab/leaf) writes each split as
a directory of JSON files, each

    {"users": [id, ...], "num_samples": [n, ...],
     "user_data": {id: {"x": [...], "y": [...]}, ...}, "hierarchies": [...]?}

`train` and `test` name those directories (or single .json files), or
`data_dir` names the LEAF `data/` directory holding `train/` and `test/`.
Files are read in name order, users in the order of `users`; the client ids
are LEAF's user ids. `hierarchies` (and any other key) is ignored.
Example counts come from the data (`len(y)`, which must equal `len(x)`):
LEAF's `num_samples` can be wrong (its Shakespeare test split overstates
them by 79), so a difference is reported with a warning and the real count
is used. A user listed twice (in one split) is an error.

`task` converts the examples:

- `femnist`: x = 784 floats -> `x` float32 (28, 28, 1), as LEAF stores them
  (grayscale / 255, so the background is ~1.0; not inverted like TFF/FedJAX
  EMNIST); y -> `y` int32 (0-61).
- `synthetic`: x = a float vector -> `x` float32 (d,), d from the data
  (LEAF Synthetic and FedProx's Synthetic(alpha, beta) JSON); y (FedProx
  writes floats such as 3.0; they must be integers) -> `y` int32.
- `shakespeare`: x = an 80-character string, y = the next character ->
  `x` int32 (seq_length,) and `y` int32 (), the character ids of LEAF's
  `models/utils/language_utils.py`: the index in LEAF's 80-letter
  ALL_LETTERS (`LEAF_LETTERS` here; `word_to_indices`, `letter_to_vec`).
  LEAF maps a character outside it to -1 (`str.find`); here it becomes 80
  (`OOV_ID`; vocabulary size 81) and is counted in a warning. The
  vocabulary is stored as the asset `vocab.json`.
- `celeba`: x = image file names -> `x` uint8 (image_size, image_size, 3),
  read from `image_dir` (LEAF's `data/raw/img_align_celeba`) exactly as
  LEAF's model does (`Image.open(p).resize((84, 84)).convert('RGB')`, values
  0-255, needs Pillow); y = Smiling as 0.0/1.0 -> `y` int32. The images are
  not part of the fingerprint.
- Sent140 is out of scope: its x is five raw tweet fields whose model input
  needs LEAF's GloVe word vocabulary; tokenizing it is a separate recipe.
  Reddit likewise.

    fedstream preprocess leaf --output data/femnist \\
        --config.data_dir=leaf/data/femnist/data --config.task=femnist
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings
from typing import Any, Iterator

import ml_collections
import numpy as np

from fedstream.data.format import FeatureSpec, Schema, file_sha256

SOURCE = "user-provided LEAF JSON files (LEAF, Caldas et al. 2018; data licenses are the datasets' own)"
TASKS = ("femnist", "synthetic", "shakespeare", "celeba")
OUT_OF_SCOPE = {"sent140": "Sent140 needs LEAF's GloVe word vocabulary to become model input",
                "reddit": "Reddit needs a word vocabulary to become model input"}
# LEAF models/utils/language_utils.py ALL_LETTERS: id = index.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
OOV_ID = len(LEAF_LETTERS)  # 80; LEAF itself gives -1
_LUT = np.full(128, OOV_ID, np.int32)
_LUT[[ord(c) for c in LEAF_LETTERS]] = np.arange(len(LEAF_LETTERS), dtype=np.int32)


def get_config() -> ml_collections.ConfigDict:
    """Knobs; `task` and the data (`data_dir`, or `train`/`test`) are required."""
    c = ml_collections.ConfigDict()
    c.task = ""  # femnist | synthetic | shakespeare | celeba
    c.data_dir = ""  # LEAF's data/ directory with train/ and test/ (instead of train and test)
    c.train = ""  # directory of LEAF JSON files (or one .json file) of the train split
    c.test = ""  # the same for the test split ('' = none)
    c.seq_length = 80  # shakespeare: characters per example
    c.image_dir = ""  # celeba: directory of the images named in x (img_align_celeba)
    c.image_size = 84  # celeba: images are resized to image_size x image_size
    c.seed = 0  # no randomness; recorded in the metadata like every recipe's seed
    return c


class _BadUser(ValueError):
    """A user's data does not convert; the caller adds file and user."""


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def _task(config: ml_collections.ConfigDict) -> str:
    task = config.task.lower()
    if task in OUT_OF_SCOPE:
        raise ValueError(f"task {task!r} is not supported by recipe leaf: {OUT_OF_SCOPE[task]}")
    if task not in TASKS:
        raise ValueError(f"config.task must be one of {', '.join(TASKS)}, got {config.task!r}")
    if task == "celeba":
        if not config.image_dir:
            raise ValueError("task celeba needs --config.image_dir=DIR (LEAF's data/raw/img_align_celeba)")
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise ValueError("task celeba reads images with Pillow: pip install pillow") from None
    return task


def split_files(config: ml_collections.ConfigDict) -> dict[str, list[pathlib.Path]]:
    """{split: JSON files in name order}; a split directory without .json files is an error."""
    roots = {}
    if config.data_dir:
        if config.train or config.test:
            raise ValueError("give either config.data_dir or config.train/config.test, not both")
        base = pathlib.Path(config.data_dir)
        if not base.is_dir():
            raise ValueError(f"{base}: no such directory")
        roots = {s: base / s for s in ("train", "test") if (base / s).is_dir()}
        if "train" not in roots:
            raise ValueError(f"{base}: no train/ directory (LEAF writes data/train and data/test)")
    else:
        roots = {s: pathlib.Path(p) for s, p in (("train", config.train), ("test", config.test)) if p}
    if not roots:
        raise ValueError("recipe leaf needs --config.data_dir=DIR or --config.train=DIR (and --config.test=DIR)")
    out = {}
    for split, root in roots.items():
        if root.is_file():
            out[split] = [root]
        elif root.is_dir():
            files = sorted(p for p in root.iterdir() if p.suffix == ".json" and p.is_file())
            if not files:
                raise ValueError(f"{root}: no .json files")
            out[split] = files
        else:
            raise ValueError(f"{root}: no such file or directory")
    return out


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadUser(f"duplicate key {key!r} in a JSON object (a user listed twice in user_data?)")
            seen.add(key)
    return out


def _invalid_utf8(value: Any) -> bool:
    """Whether a string decoded with surrogateescape (or anything inside a list/dict) held invalid UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_invalid_utf8(v) for v in value)
    if isinstance(value, dict):
        return any(_invalid_utf8(k) or _invalid_utf8(v) for k, v in value.items())
    return False


def _not_utf8(path: pathlib.Path, raw: bytes, error: UnicodeDecodeError) -> ValueError:
    """The error for a file with invalid UTF-8, naming the user whose id or data holds it if it parses."""
    where = f"{path}: not UTF-8 ({error.reason} at byte {error.start}); LEAF writes UTF-8 JSON"
    try:
        data = json.loads(raw.decode("utf-8", "surrogateescape"))
        for user in data.get("users", []) if isinstance(data, dict) else []:
            if not isinstance(user, str):
                continue
            if _invalid_utf8(user):
                raw_id = user.encode("utf-8", "surrogateescape")
                return ValueError(f"{path}: user {raw_id!r}: user id is not valid UTF-8 (byte {error.start})")
            if _invalid_utf8(data.get("user_data", {}).get(user)):
                return ValueError(f"{path}: user {user!r}: data is not valid UTF-8 (byte {error.start})")
    except (ValueError, AttributeError, RecursionError):
        pass
    return ValueError(where)


def _load(path: pathlib.Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw, e) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _BadUser as e:
        raise ValueError(f"{path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         "truncated?") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("users"), list) or not isinstance(
            data.get("user_data"), dict):
        raise ValueError(f"{path}: not a LEAF file (needs a 'users' list and a 'user_data' object)")
    return data


def _user_id(user: Any) -> str:
    if not isinstance(user, str):
        raise _BadUser(f"user id is a {type(user).__name__}, not a string")
    if not user:
        raise _BadUser("user id is empty")
    try:
        user.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadUser("user id is not valid UTF-8 (a lone surrogate escape)") from None
    return user


def _numbers(values: list[Any], what: str, width: int | None = None) -> np.ndarray:
    """A list of equal-length number lists -> float64 [n, width]."""
    lengths = {len(v) if isinstance(v, list) else -1 for v in values}
    if -1 in lengths:
        raise _BadUser(f"{what}: every example must be a list of numbers")
    if len(lengths) > 1:
        raise _BadUser(f"{what}: examples have different lengths {sorted(lengths)}")
    if width is not None and lengths and lengths != {width}:
        raise _BadUser(f"{what}: examples have {lengths.pop()} values, expected {width}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise _BadUser(f"{what}: values are not all numbers") from None
    return array.reshape(len(values), width if width is not None else -1)


def _labels(values: list[Any], what: str = "y") -> np.ndarray:
    if any(isinstance(v, (list, dict, str)) or v is None for v in values):
        raise _BadUser(f"{what}: labels must be numbers")
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    if y.size and not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
        raise _BadUser(f"{what}: labels must be integers")
    if y.size and (y.min() < np.iinfo(np.int32).min or y.max() > np.iinfo(np.int32).max):
        raise _BadUser(f"{what}: labels do not fit int32")
    return y.astype(np.int32)


class _Shakespeare:
    oov = 0

    def chars(self, values: list[Any], length: int, what: str) -> np.ndarray:
        if not all(isinstance(v, str) for v in values):
            raise _BadUser(f"{what}: examples must be strings")
        bad = {len(v) for v in values} - {length}
        if bad:
            raise _BadUser(f"{what}: strings of length {sorted(bad)}, expected {length}")
        codes = np.frombuffer("".join(values).encode("utf-32-le", "surrogatepass"), "<u4").astype(np.int64)
        ids = np.where(codes < 128, _LUT[np.minimum(codes, 127)], OOV_ID).astype(np.int32)
        self.oov += int((ids == OOV_ID).sum())
        return ids.reshape(len(values), length) if length else ids.reshape(len(values))


def _image(config: ml_collections.ConfigDict, name: Any) -> np.ndarray:
    from PIL import Image  # LEAF's own loader

    if not isinstance(name, str):
        raise _BadUser("x: image names must be strings")
    path = pathlib.Path(config.image_dir) / name
    try:
        with Image.open(path) as img:
            size = int(config.image_size)
            return np.asarray(img.resize((size, size)).convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
        raise _BadUser(f"image {name!r}: {_one_line(e)}") from None


def _convert(config: ml_collections.ConfigDict, task: str, data: Any, state: _Shakespeare, spec: Schema
             ) -> dict[str, np.ndarray]:
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        missing = [k for k in ("x", "y") if not isinstance(data, dict) or k not in data]
        raise _BadUser(f"user_data lacks {missing}")
    x, y = data["x"], data["y"]
    if not isinstance(x, list) or not isinstance(y, list):
        raise _BadUser("x and y must be lists")
    if len(x) != len(y):
        raise _BadUser(f"x has {len(x)} examples but y has {len(y)}")
    if task == "femnist":
        return {"x": _numbers(x, "x", 784).astype(np.float32).reshape(-1, 28, 28, 1), "y": _labels(y)}
    if task == "synthetic":
        return {"x": _numbers(x, "x", spec["x"].shape[0]).astype(np.float32), "y": _labels(y)}
    if task == "shakespeare":
        return {"x": state.chars(x, int(config.seq_length), "x"), "y": state.chars(y, 1, "y")[:, 0]}
    size = int(config.image_size)
    images = [_image(config, name) for name in x]
    return {"x": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), "y": _labels(y)}


def _users(path: pathlib.Path, config: ml_collections.ConfigDict, task: str, spec: Schema
           ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(user id, converted examples) per user of one file; warns once about wrong num_samples."""
    data = _load(path)
    users, user_data = data["users"], data["user_data"]
    listed = data.get("num_samples")
    state = _Shakespeare()
    wrong: list[str] = []
    seen: set[str] = set()
    for i, user in enumerate(users):
        try:
            user_id = _user_id(user)
            if user_id in seen:
                raise _BadUser("listed twice in 'users'")
            seen.add(user_id)
            if user_id not in user_data:
                raise _BadUser("listed in 'users' but has no entry in 'user_data'")
            examples = _convert(config, task, user_data[user_id], state, spec)
        except _BadUser as e:
            raise ValueError(f"{path}: user {user!r}: {e}") from None
        n = len(examples["y"])
        if isinstance(listed, list) and len(listed) == len(users) and listed[i] != n:
            wrong.append(f"{user_id!r}: {listed[i]} listed, {n} in the data")
        yield user_id, examples
    extra = [u for u in user_data if u not in seen]
    if extra:
        raise ValueError(f"{path}: user {extra[0]!r}: has data in 'user_data' but is not listed in 'users'")
    if listed is not None and not (isinstance(listed, list) and len(listed) == len(users)):
        warnings.warn(f"{path}: 'num_samples' does not have one count per user; ignored, counts come from the data",
                      stacklevel=2)
    if wrong:
        warnings.warn(f"{path}: num_samples differs from the data for {len(wrong)} of {len(users)} users "
                      f"(e.g. {wrong[0]}); using the counts of the data", stacklevel=2)
    if state.oov:
        warnings.warn(f"{path}: {state.oov} characters are not in LEAF's 80-letter vocabulary; stored as id "
                      f"{OOV_ID} (LEAF uses -1)", stacklevel=2)


def schema(config: ml_collections.ConfigDict) -> Schema:
    """x and y per task; the synthetic input width is read from the first user."""
    task = _task(config)
    if task == "femnist":
        return {"x": FeatureSpec("float32", (28, 28, 1)), "y": FeatureSpec("int32", ())}
    if task == "shakespeare":
        if int(config.seq_length) < 1:
            raise ValueError(f"config.seq_length must be >= 1, got {config.seq_length}")
        return {"x": FeatureSpec("int32", (int(config.seq_length),)), "y": FeatureSpec("int32", ())}
    if task == "celeba":
        size = int(config.image_size)
        if size < 1:
            raise ValueError(f"config.image_size must be >= 1, got {size}")
        return {"x": FeatureSpec("uint8", (size, size, 3)), "y": FeatureSpec("int32", ())}
    for files in split_files(config).values():
        for path in files:
            data = _load(path)
            for user in data["users"]:
                x = data["user_data"].get(user, {}).get("x") if isinstance(user, str) else None
                if isinstance(x, list) and x and isinstance(x[0], list):
                    return {"x": FeatureSpec("float32", (len(x[0]),)), "y": FeatureSpec("int32", ())}
    raise ValueError("task synthetic: no user with examples to infer the input width from")


def assets(config: ml_collections.ConfigDict) -> dict[str, bytes]:
    """shakespeare: `vocab.json` with LEAF's letters and the ids used here."""
    if _task(config) != "shakespeare":
        return {}
    vocab = {"letters": LEAF_LETTERS, "ids": "index in letters", "oov_id": OOV_ID, "vocab_size": OOV_ID + 1,
             "source": "LEAF models/utils/language_utils.py ALL_LETTERS"}
    return {"vocab.json": json.dumps(vocab, indent=1, sort_keys=True).encode()}


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 over every JSON file (split, name, contents); celeba images are not included."""
    digest = hashlib.sha256()
    for split, files in split_files(config).items():
        for path in files:
            digest.update(f"{split}\0{path.name}\0".encode())
            try:
                file_sha256(path, digest)
            except OSError as e:
                raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    return f"sha256:{digest.hexdigest()}"


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields every user of every file of each split; a user in two files of a split is an error."""
    task = _task(config)
    spec = schema(config)
    for split, files in split_files(config).items():
        where: dict[str, pathlib.Path] = {}
        for path in files:
            for user_id, examples in _users(path, config, task, spec):
                if user_id in where:
                    raise ValueError(f"{path}: user {user_id!r}: also in {where[user_id]} (split {split!r}); "
                                     "user ids must be unique within a split")
                where[user_id] = path
                for name, value in examples.items():
                    if value.shape[1:] != spec[name].shape:
                        raise ValueError(f"{path}: user {user_id!r}: {name} examples have shape {value.shape[1:]}, "
                                         f"expected {spec[name].shape} (from the first user)")
                yield split, user_id, examples
