"""Fuzzing the dataset format with hypothesis: writer, reader, decoder and the `arrays` recipe.

Every case must either work or fail with a clear error: a DatasetFormatError,
ValueError or ConfigError whose message names the file, split, client or key
(what the CLI prints as one line). Any other exception (a traceback from
inside NumPy or ArrayRecord) fails the test, and so does a hang: a watchdog
ends the process after HANG_SECONDS in one case, even inside C code.

FEDSTREAM_FUZZ_EXAMPLES sets the examples per test (default 60); the count of
cases that ran is printed at the end of the module (`pytest -s`).
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import io
import json
import os
import pathlib
import shutil
import tempfile
import zipfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from fedstream.config import ConfigError  # noqa: E402
from fedstream.data.format import (INDEX_FILE, METADATA_FILE, SUCCESS_FILE, DatasetFormatError,  # noqa: E402
                                   FeatureSpec, decode_examples, encode_examples, success_marker)
from fedstream.data.preprocessing import run_preprocess  # noqa: E402
from fedstream.data.reader import FederatedDataset  # noqa: E402
from fedstream.data.writer import DatasetWriter  # noqa: E402

# float64 -> float32 of a huge value gives inf (documented: floats are rounded to the schema's width).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
EXAMPLES = int(os.environ.get("FEDSTREAM_FUZZ_EXAMPLES", "60"))
HANG_SECONDS = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FEDSTREAM_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
CASES: collections.Counter = collections.Counter()

FIXED_DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "uint64", "bool"]
# Source arrays: the schema's dtypes plus ones that must be refused.
SOURCE_DTYPES = FIXED_DTYPES + ["complex64", "U3", "S3", "datetime64[s]", "timedelta64[ms]"]


@contextlib.contextmanager
def watchdog(seconds: int = HANG_SECONDS):
    """Ends the whole process with a traceback dump if the block runs longer than `seconds` (a hang)."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def clear_error(error: BaseException, *names: str) -> None:
    """Asserts `error` is one of the clear kinds and its message names one of `names`."""
    assert isinstance(error, (DatasetFormatError, ConfigError, ValueError)), repr(error)
    message = str(error)
    assert message and any(name in message for name in names), (message, names)


def outcome(test: str, fn, *names: str):
    """Runs fn(); returns its value, or None after checking the error is clear. Counts the case."""
    with watchdog():
        try:
            value = fn()
        except (DatasetFormatError, ConfigError, ValueError) as e:
            clear_error(e, *names)
            CASES[test, "refused"] += 1
            return None
    CASES[test, "worked"] += 1
    return value


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = sum(CASES.values())
    lines = [f"fuzz cases run: {total}"] + [f"  {test}: {kind} {n}" for (test, kind), n in sorted(CASES.items())]
    print("\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------- strategies

feature_specs = st.builds(
    lambda dtype, dims, variable: FeatureSpec(dtype, ((None,) if variable else ()) + tuple(dims)),
    st.sampled_from(FIXED_DTYPES), st.lists(st.integers(0, 3), max_size=2), st.booleans())
schemas = st.dictionaries(st.sampled_from(["x", "y", "t", "w"]), feature_specs, min_size=1, max_size=3)
def rarely(good, bad, one_in: int = 8):
    """`bad` one time in `one_in`, else `good` (hypothesis favours the first choice of sampled_from and the
    first branch of one_of, so a plain one_of would mostly draw the bad branch's simplest values)."""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda is_bad: bad if is_bad else good)


client_ids = rarely(
    st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"),
                      min_size=1, max_size=6),
              st.sampled_from(["a", "b", "client_00001"])),  # duplicates are likely
    st.one_of(st.text(st.characters(codec=None, exclude_categories=()), max_size=6),  # NUL, lone surrogates, ''
              st.binary(max_size=4), st.integers(-3, 3), st.none()))
split_names = rarely(st.sampled_from(["train", "test", "val-1"]),
                     st.sampled_from(["", ".hidden", "a/b", "_x", "..", METADATA_FILE]), one_in=15)


def source_array(draw, spec: FeatureSpec, n: int):
    """A column for `spec` with n examples: usually well-formed, sometimes not (dtype, shape, ragged)."""
    kind = draw(st.sampled_from(["good"] * 30 + ["dtype", "dtype", "shape", "scalar", "ragged", "object"]))
    rest = tuple(d for d in spec.shape if d is not None)
    if kind == "scalar":
        return draw(st.sampled_from([3, "text", None, b"\xff"]))
    if kind == "object":
        return np.array([object()] * max(n, 1), dtype=object)
    if kind == "ragged":
        return [[1, 2], [3]] * max(n, 1)
    dtype = spec.dtype if kind != "dtype" else draw(st.sampled_from(SOURCE_DTYPES))
    if spec.variable:
        inner = spec.shape[1:]
        if kind == "shape":
            inner = inner + (1,)
        return [draw(hnp.arrays(dtype, (draw(st.integers(0, 3)), *inner))) for _ in range(n)]
    shape = (n, *rest) if kind != "shape" else draw(st.sampled_from([(n,), (n, *rest, 1), (n + 1, *rest), ()]))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def writer_cases(draw):
    schema = draw(schemas)
    clients = []
    for _ in range(draw(st.integers(0, 6))):
        n = draw(st.integers(0, 4))
        examples = {name: source_array(draw, spec, n) for name, spec in schema.items()}
        if draw(st.sampled_from([False] * 19 + [True])):
            examples.pop(next(iter(examples)))  # a missing feature
        if draw(st.sampled_from([False] * 19 + [True])):
            examples["extra"] = np.zeros(n)
        clients.append((draw(split_names), draw(client_ids), examples))
    options = {"records_per_shard": draw(st.integers(1, 5)),
               "compression": draw(st.sampled_from(["uncompressed", "zstd:1", "snappy"]))}
    return schema, clients, options


def expected_column(spec: FeatureSpec, value):
    if spec.variable:
        return [np.asarray(v).astype(spec.dtype) for v in value]
    return np.asarray(value).astype(spec.dtype)


# ----------------------------------------------------------------------------------------------- writer


@FUZZ
@given(writer_cases())
def test_writer_accepts_or_refuses_each_client_clearly(case):
    schema, clients, options = case
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "ds"
        accepted: dict[tuple[str, str], dict] = {}
        with watchdog(), DatasetWriter(out, schema, **options) as writer:
            for split, client_id, examples in clients:
                try:
                    writer.add_client(split, client_id, examples)
                except ValueError as e:
                    clear_error(e, repr(client_id), repr(split))
                    CASES["writer client", "refused"] += 1
                    continue
                CASES["writer client", "worked"] += 1
                accepted[split, client_id] = examples
        with watchdog():
            ds = FederatedDataset(out)
            ds.verify()
        assert sorted(ds.splits) == sorted({split for split, _ in accepted})
        for (split, client_id), examples in accepted.items():
            got = ds.get_client(split, client_id)
            for name, spec in schema.items():
                want = expected_column(spec, examples[name])
                if spec.variable:
                    assert len(got[name]) == len(want)
                    for g, w in zip(got[name], want):
                        np.testing.assert_array_equal(g, w)
                else:
                    np.testing.assert_array_equal(got[name], want)
                    assert got[name].dtype == np.dtype(spec.dtype)


@FUZZ
@given(st.one_of(st.text(max_size=8), st.none(), st.integers(),
                 st.sampled_from(FIXED_DTYPES + ["complex64", "U3", "V4", "object", "(2,)f4", "M8", "<f8", ">i2"])),
       st.one_of(st.lists(st.one_of(st.integers(-2, 2**40), st.none(), st.floats(0, 3), st.booleans()), max_size=3),
                 st.integers(), st.none()))
@example("float32", [2**31, 2**31])
@example("float32", [None, None])
def test_feature_spec_refuses_clearly(dtype, shape):
    outcome("feature spec", lambda: FeatureSpec(dtype, shape), "dtype", "shape")


# -------------------------------------------------------------------------------------------- decoding


@FUZZ
@given(schemas, st.lists(st.binary(max_size=40), max_size=5))
@example({"t": FeatureSpec("int16", (None, 2))}, [b"\xff\xff\xff\xff" + b"\x00" * 8])  # huge length prefix
def test_decode_random_records(schema, records):
    outcome("decode random bytes", lambda: decode_examples(schema, records, source="SRC"), "SRC")


@FUZZ
@given(st.data())
def test_encode_decode_round_trip(data):
    schema = data.draw(schemas)
    n = data.draw(st.integers(0, 4))
    columns = {name: expected_column(spec, source_good(data, spec, n)) for name, spec in schema.items()}
    with watchdog():
        decoded = decode_examples(schema, encode_examples(schema, columns, n), source="rt")
    for name, spec in schema.items():
        if spec.variable:
            for g, w in zip(decoded[name], columns[name], strict=True):
                np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_array_equal(decoded[name], columns[name])
    CASES["encode/decode round trip", "worked"] += 1


def source_good(data, spec, n):
    if spec.variable:
        return [data.draw(hnp.arrays(spec.dtype, (data.draw(st.integers(0, 3)), *spec.shape[1:]))) for _ in range(n)]
    return data.draw(hnp.arrays(spec.dtype, (n, *spec.shape)))


# ---------------------------------------------------------------------------------------------- reader

BASE_SCHEMA = {"x": FeatureSpec("float32", (3,)), "t": FeatureSpec("int16", (None, 2)), "y": FeatureSpec("int32", ())}


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory):
    """Two splits, several shards, an empty client, variable-length and fixed features."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("fuzz") / "base"
    with DatasetWriter(out, BASE_SCHEMA, records_per_shard=6) as writer:
        for split, sizes in (("train", [3, 0, 7, 2, 5]), ("test", [1, 4, 2])):
            for i, n in enumerate(sizes):
                writer.add_client(split, f"client_{i}", {
                    "x": rng.normal(size=(n, 3)), "y": rng.integers(0, 10, n),
                    "t": [rng.integers(-5, 5, (int(k), 2)) for k in rng.integers(0, 4, n)]})
    return out


def read_everything(path: pathlib.Path, verify: bool = False) -> int:
    """Opens, reads every client by position and by id (and checks checksums); returns examples read."""
    ds = FederatedDataset(path)
    total = 0
    for split in ds.splits:
        for i, client_id in enumerate(ds.client_ids(split).tolist()):
            a = ds.get_client(split, i)
            b = ds.get_client(split, client_id)
            total += len(a["y"])
            assert len(a["y"]) == len(b["y"]) == ds.client_sizes(split)[i]
    if verify:
        ds.verify()
    return total


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def metadata_mutations(draw, metadata: bytes):
    kind = draw(st.sampled_from(["random", "truncate", "replace", "replace", "replace", "delete"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return metadata[: draw(st.integers(0, len(metadata) - 1))]
    tree = json.loads(metadata)
    paths = [p for p in _paths(tree) if p]
    path = draw(st.sampled_from(paths))
    parent = tree
    for part in path[:-1]:
        parent = parent[part]
    if kind == "delete":
        del parent[path[-1]]
    else:
        interesting = st.sampled_from([-1, 0, 1, 2**62, 2**63, 10**30, "", "train", "../x", [], {}, True, 0.5,
                                       "float32", "shard-00000.array_record", "test/shard-00000.array_record"])
        parent[path[-1]] = draw(st.one_of(interesting, json_values))
    return json.dumps(tree).encode()


INDEX_KEYS = ("client_ids", "shard", "start", "count")


@st.composite
def index_mutations(draw, index_bytes: bytes):
    kind = draw(st.sampled_from(["random", "truncate", "array", "array", "value", "value", "drop", "pickled"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "truncate":
        return index_bytes[: draw(st.integers(0, len(index_bytes) - 1))]
    with np.load(io.BytesIO(index_bytes)) as f:
        arrays = {k: f[k] for k in INDEX_KEYS}
    key = draw(st.sampled_from(INDEX_KEYS))
    n = len(arrays["client_ids"])
    if kind == "drop":
        del arrays[key]
    elif kind == "pickled":
        arrays[key] = np.array([object()] * n, dtype=object)
    elif kind == "array":
        dtype = draw(st.sampled_from(["int32", "int64", "uint64", "float64", "U4", "S4", "bool"]))
        shape = draw(st.sampled_from([(n,), (n + 1,), (max(n - 1, 0),), (n, 2), ()]))
        arrays[key] = draw(hnp.arrays(dtype, shape))
    else:
        i = draw(st.integers(0, n - 1))
        if key == "client_ids":
            value = draw(st.sampled_from(["", "client_0", "client_1", "\x00", "é", "a\x00"]))
            arrays[key] = arrays[key].astype("U16")
        else:
            value = draw(st.sampled_from([-1, 0, 1, 5, 2**31 - 1, 2**62, 2**63 - 1, -2**63]))
            arrays[key] = arrays[key].astype(np.int64)
        arrays[key][i] = value
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # allow_pickle=True by default: the reader must refuse object arrays
    return buffer.getvalue()


@st.composite
def shard_mutations(draw, data: bytes):
    kind = draw(st.sampled_from(["flip", "flip", "random", "truncate", "extend", "zeros"]))
    if kind == "flip":
        out = bytearray(data)
        for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                             min_size=1, max_size=64)):
            out[position] = value
        return bytes(out)
    if kind == "random":
        return draw(st.binary(min_size=len(data), max_size=len(data))) if len(data) < 4096 else (
            np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(len(data)))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=100)) * draw(st.sampled_from([1, 700]))
    return bytes(len(data))


def _copy(base: pathlib.Path, tmp: str) -> pathlib.Path:
    target = pathlib.Path(tmp) / "ds"
    shutil.copytree(base, target)
    return target


def _check_reader(test: str, path: pathlib.Path) -> None:
    """Reading every client works or fails clearly; then so does `verify` (sha256 of every shard)."""
    outcome(test, lambda: read_everything(path), str(path))
    outcome(test + " + verify", lambda: read_everything(path, verify=True), str(path))


@FUZZ
@given(st.data())
def test_reader_mutated_metadata(base_dataset, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = _copy(base_dataset, tmp)
        meta = path / METADATA_FILE
        meta.write_bytes(data.draw(metadata_mutations(meta.read_bytes())))
        if data.draw(st.booleans()):  # as if rewritten by a tool that records the new sha256: the deeper checks run
            (path / SUCCESS_FILE).write_bytes(success_marker(meta.read_bytes()))
        _check_reader("reader metadata.json", path)


@FUZZ
@given(st.data())
def test_reader_mutated_index(base_dataset, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = _copy(base_dataset, tmp)
        index = path / data.draw(st.sampled_from(["train", "test"])) / INDEX_FILE
        index.write_bytes(data.draw(index_mutations(index.read_bytes())))
        _check_reader("reader index.npz", path)


@FUZZ
@given(st.data(), st.booleans())
def test_reader_mutated_shard(base_dataset, data, fix_size_in_metadata):
    with tempfile.TemporaryDirectory() as tmp:
        path = _copy(base_dataset, tmp)
        shards = sorted(path.glob("*/shard-*.array_record"))
        shard = data.draw(st.sampled_from(shards))
        new = data.draw(shard_mutations(shard.read_bytes()))
        shard.write_bytes(new)
        if fix_size_in_metadata:  # as if the metadata had been rewritten to match (only the sha256 can tell)
            meta = json.loads((path / METADATA_FILE).read_text())
            for info in meta["splits"].values():
                for sh in info["shards"]:
                    if path / sh["file"] == shard:
                        sh["bytes"] = len(new)
            (path / METADATA_FILE).write_text(json.dumps(meta))
            (path / SUCCESS_FILE).write_bytes(success_marker((path / METADATA_FILE).read_bytes()))
        _check_reader("reader shard bytes", path)


@pytest.mark.parametrize("victim", [SUCCESS_FILE, METADATA_FILE, f"train/{INDEX_FILE}",
                                    "train/shard-00000.array_record", "test", "train"])
def test_reader_missing_files(base_dataset, tmp_path, victim):
    path = _copy(base_dataset, str(tmp_path))
    target = path / victim
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetFormatError, match=str(path)):
        read_everything(path, verify=True)
    CASES["reader missing file", "refused"] += 1


def test_reader_base_dataset_reads(base_dataset):
    assert read_everything(base_dataset, verify=True) == 3 + 7 + 2 + 5 + 1 + 4 + 2


# ----------------------------------------------------------------------------------------- arrays recipe


@st.composite
def npz_arrays(draw):
    """Usually a usable file (float features x, integer labels y, maybe client ids c), then perturbed."""
    n = draw(st.sampled_from([0, 1, 3, 8, 20, 20]))
    arrays = {}
    if draw(st.sampled_from([True, True, False])):
        arrays["x"] = draw(hnp.arrays(draw(st.sampled_from(["float32", "float64", "uint8", "bool"])),
                                      (n, *draw(st.lists(st.integers(1, 3), max_size=2)))))
        arrays["y"] = draw(hnp.arrays("int64", (n,), elements=st.integers(0, 4)))
        if draw(st.sampled_from([True, False])):
            id_dtype = draw(st.sampled_from(["int32", "int32", "U3", "S3"]))
            pool = {"int32": [1, 2, 3], "U3": ["a", "b", "é"], "S3": [b"a", b"b", b"cd"]}[id_dtype]
            arrays["c"] = draw(hnp.arrays(id_dtype, (n,),  # few distinct ids, or anything (non-UTF-8 bytes, ...)
                                          elements=None if draw(st.booleans()) else st.sampled_from(pool)))
    perturbed = draw(st.sampled_from([[], [], [], ["x"], ["y"], ["c"], ["w"], ["x", "w"]])) if arrays else draw(
        st.lists(st.sampled_from(["x", "y", "c", "w"]), unique=True, max_size=4))
    for key in perturbed:
        kind = draw(st.sampled_from(["good", "good", "length", "scalar", "object"]))
        if kind == "object":
            arrays[key] = np.array([object()] * max(n, 1), dtype=object)
            continue
        dtype = draw(st.sampled_from(SOURCE_DTYPES))
        if kind == "scalar":
            shape = ()
        else:
            length = n if kind == "good" else n + 1
            shape = (length, *draw(st.lists(st.integers(0, 3), max_size=2)))
        arrays[key] = draw(hnp.arrays(dtype, shape))
    return arrays


RECIPE_KNOBS = {  # key: (good values, bad values)
    "partitioner": (["iid", "dirichlet", "shards"], ["bogus"]),
    "num_clients": ([1, 2, 3], [0, -1, 10**9, "'many'"]),
    "alpha": ([0.1, 1.0, 1e9], [0.0, -1.0, 1e-300]),
    "client_key": (["", "c", "c"], ["x", "missing"]),
    "label_key": (["y"], ["c", "x", "missing"]),
    "features": (["", "x", "x,y"], ["x,c", "nope", ",,"]),
    "test_fraction": ([0.0, 0.3, 0.99], [1.0, -0.5]),
    "float_dtype": (["float32", "", "float16"], ["int32", "bogus"]),
    "min_examples": ([0, 1], [5, -1]),
    "shards_per_client": ([1, 2], [0]),
    "seed": ([0, 7], [-1]),
}


@st.composite
def recipe_overrides(draw):
    """A few knobs set, each to a bad value one time in ten."""
    out = {}
    for key, (good, bad) in RECIPE_KNOBS.items():
        if draw(st.integers(0, 2)) == 0 or key == "num_clients":
            # (hypothesis favours the first choice of sampled_from, and 0 of integers)
            out[key] = draw(st.sampled_from(bad if draw(st.sampled_from([False] * 9 + [True])) else good))
    return out


def _write_npz(path: pathlib.Path, arrays: dict, corruption: str, cut: int, draw_bytes: bytes) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    raw = buffer.getvalue()
    if corruption == "truncate":
        raw = raw[: cut % max(len(raw), 1)]
    elif corruption == "random":
        raw = draw_bytes
    elif corruption == "not-npy-member":
        extra = io.BytesIO()
        with zipfile.ZipFile(extra, "w") as z:
            z.writestr("x.npy", b"\x93NUMPY garbage")
            z.writestr("notes.txt", "hello")
        raw = extra.getvalue()
    path.write_bytes(raw)


@FUZZ
@given(npz_arrays(), recipe_overrides(), st.sampled_from(["none"] * 8 + ["truncate", "random", "not-npy-member"]),
       st.integers(0, 10**6), st.binary(max_size=200))
@example({"x": np.zeros((3, 2)), "c": np.array([b"\xff", b"a", b"\xff"])}, {"client_key": "c"}, "none", 0, b"")
@example({"x": np.zeros((3, 2)), "c": np.array(["a\x00b", "a", ""])}, {"client_key": "c"}, "none", 0, b"")
@example({"x": np.zeros((7, 2)), "y": np.arange(7)}, {"partitioner": "dirichlet", "num_clients": 10**9,
                                                      "min_examples": 0}, "none", 0, b"")
@example({"x": np.full((4, 1), 1e300), "y": np.array([2**63 - 1, 0, 1, 2], np.int64)}, {}, "none", 0, b"")
def test_arrays_recipe(arrays, overrides, corruption, cut, random_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        npz = pathlib.Path(tmp) / "in.npz"
        _write_npz(npz, arrays, corruption, cut, random_bytes)
        args = [f"path={npz}"] + [f"{k}={v!r}" if isinstance(v, str) and not v.startswith("'") else f"{k}={v}"
                                  for k, v in overrides.items()]
        out = pathlib.Path(tmp) / "out"
        keys = [str(npz), "config.", "num_clients", "split", "client", "partitioner", "alpha", "min_examples",
                "shards", "float_dtype", "test_fraction", "seed", "examples"]
        written = outcome("arrays recipe", lambda: run_preprocess("arrays", out, args, progress=None), *keys)
        if written is not None:
            ds = FederatedDataset(written)
            total = sum(int(ds.client_sizes(s).sum()) for s in ds.splits)
            lengths = {len(a) for a in arrays.values() if a.ndim}
            assert total in lengths or (total == 0 and not ds.splits) or not lengths, (total, lengths)
