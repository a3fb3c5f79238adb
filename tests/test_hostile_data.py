"""Hostile inputs and damaged state in a dataset and a workdir (issue #16, the data side).

Every case ends in one DatasetFormatError line naming the file (exit code 2 and one stderr line
from `fedstream inspect`), or in a clear OSError for a planted symbolic link, with nothing lost:
link targets keep their bytes, an interrupted `preprocess --force` swap is rolled back. The slow
fuzz tests flip every bit of a small `index.npz` and edit `metadata.json` values at random; each
case must open correctly or be refused with a DatasetFormatError.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from fedstream.data.format import DatasetFormatError, FeatureSpec, success_marker
from fedstream.data.reader import FederatedDataset, read_index_arrays
from fedstream.data.writer import DatasetWriter, recover_interrupted_swap
from fedstream.io_safety import UnsafeFileError, create_exclusive, open_no_follow
from fedstream.training.client_store import ClientStateStore
from fedstream.training.lock import WorkdirLock
from fedstream.training.metrics_log import MetricsLog, truncate_jsonl
from tests.support import run_cli

SCHEMA = {"x": FeatureSpec("float32", (4,)), "y": FeatureSpec("int32", ())}
SIZES = [3, 0, 5, 2]
TARGET_TEXT = b"precious bytes\n"


def write_dataset(path: pathlib.Path, sizes=SIZES) -> pathlib.Path:
    rng = np.random.default_rng(0)
    with DatasetWriter(path, SCHEMA, records_per_shard=4) as writer:
        for i, n in enumerate(sizes):
            writer.add_client("train", f"c{i}", {"x": rng.normal(size=(n, 4)), "y": np.arange(n)})
    return path


@pytest.fixture
def dataset(tmp_path) -> pathlib.Path:
    return write_dataset(tmp_path / "ds")


def rewrite_metadata(path: pathlib.Path, edit, restamp: bool = True) -> None:
    """Edits metadata.json; with `restamp`, also records its new sha256 in _SUCCESS (a hostile user can)."""
    meta = json.loads((path / "metadata.json").read_text())
    edit(meta)
    data = json.dumps(meta).encode()
    (path / "metadata.json").write_bytes(data)
    if restamp:
        (path / "_SUCCESS").write_bytes(success_marker(data))


def one_error_line(*args) -> str:
    """Runs the CLI; asserts exit code 2 and exactly one stderr line; returns that line."""
    result = run_cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def index_members(n: int = len(SIZES)) -> dict[str, bytes]:
    return {"client_ids.npy": npy(np.array([f"c{i}" for i in range(n)])), "shard.npy": npy(np.zeros(n, np.int32)),
            "start.npy": npy(np.zeros(n, np.int64)), "count.npy": npy(np.zeros(n, np.int64))}


def write_zip(path: pathlib.Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


# ------------------------------------------------------------------------------------ index.npz bounds


def test_index_declaring_petabytes_is_refused_at_once(dataset):
    members = index_members()
    members["client_ids.npy"] = npy_header("<U8", (10**15,)) + b"\0" * 64
    write_zip(dataset / "train" / "index.npz", members)
    rewrite_metadata(dataset, lambda m: m["splits"]["train"].update(num_clients=10**15))
    t = time.perf_counter()
    line = one_error_line("inspect", dataset)
    assert time.perf_counter() - t < 5
    assert line == (f"fedstream: error: {dataset}/train/index.npz: unreadable client index (array 'client_ids': its "
                    "header declares 32,000,000,000,000,000 bytes of data, the member holds 64)")


def test_zip_bomb_index_is_refused_without_inflating(dataset):
    members = index_members()
    members["start.npy"] = npy_header("<i8", (len(SIZES),)) + bytes(8 * len(SIZES))
    members["count.npy"] = npy_header("<i8", (50_000_000,)) + bytes(400_000_000)  # 400 MB of zeros, ~400 KB deflated
    write_zip(dataset / "train" / "index.npz", members, zipfile.ZIP_DEFLATED)
    t = time.perf_counter()
    with pytest.raises(DatasetFormatError, match=r"train/index\.npz: unreadable client index \(array 'client_ids' "
                                                 r"is compressed; the format stores the index uncompressed"):
        FederatedDataset(dataset)
    assert time.perf_counter() - t < 2


def test_member_size_larger_than_the_file_is_refused(dataset):
    index = dataset / "train" / "index.npz"
    members = index_members()
    write_zip(index, members)
    data = bytearray(index.read_bytes())
    size = len(members["count.npy"]).to_bytes(4, "little")
    with zipfile.ZipFile(index) as zf:  # patch the central directory's sizes of 'count.npy' to claim 4 GB
        info = zf.getinfo("count.npy")
    central = data.rfind(b"PK\x01\x02" + bytes(0), 0)  # last central entry is count.npy (written last)
    assert data[central + 20:central + 24] == size and info.file_size == len(members["count.npy"])
    data[central + 20:central + 28] = (0xFFFFFFF0).to_bytes(4, "little") * 2
    index.write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match=r"index\.npz: unreadable client index \(array 'count' declares "
                                                 r"4,294,967,280 bytes in a [\d,]+-byte file\)"):
        FederatedDataset(dataset)


@pytest.mark.parametrize("damage, was", [
    ("encrypted", "RuntimeError"), ("method", "NotImplementedError"), ("header", "TokenError"),
    ("crc", "BadZipFile")])
def test_damaged_zip_internals_are_one_line(dataset, damage, was):
    """Bit flips that used to escape from inside NumPy's zip reader (`was`) are one DatasetFormatError."""
    index = dataset / "train" / "index.npz"
    data = bytearray(index.read_bytes())
    central = data.find(b"PK\x01\x02")  # first central directory entry
    if damage == "encrypted":
        data[central + 8] |= 0x01  # general purpose flag: encrypted
    elif damage == "method":
        data[central + 10] = 0x63  # compression method 99 (AES)
    elif damage == "header":
        at = data.find(b"'shape': (")
        data[at + 9] = ord("[")  # '(' -> '[': the header no longer tokenizes as NumPy expects
    else:
        at = data.find("c0".encode("utf-32-le"))
        assert at > 0
        data[at] ^= 0x01  # member data changed, CRC no longer matches
    index.write_bytes(bytes(data))
    line = one_error_line("inspect", dataset)
    assert line.startswith(f"fedstream: error: {dataset}/train/index.npz: unreadable client index"), line


def test_index_arrays_read_only_after_checks(dataset):
    arrays = read_index_arrays(dataset / "train" / "index.npz", len(SIZES))
    assert arrays["client_ids"].tolist() == ["c0", "c1", "c2", "c3"]
    assert arrays["count"].tolist() == SIZES
    with pytest.raises(DatasetFormatError, match="'client_ids' has 4 entries, metadata.json says 5 clients"):
        read_index_arrays(dataset / "train" / "index.npz", 5)


# --------------------------------------------------------------------- metadata.json against the records


def test_metadata_dtype_edit_is_caught_on_open_and_by_inspect(dataset):
    rewrite_metadata(dataset, lambda m: m["schema"]["features"][0].update(dtype="int32"), restamp=False)
    line = one_error_line("inspect", dataset, "--verify")
    assert line.startswith(f"fedstream: error: {dataset}/metadata.json: sha256 ")
    assert line.endswith("differs from the one recorded in _SUCCESS when the dataset was written (metadata.json "
                         "or _SUCCESS was edited or damaged; preprocess the dataset again)")


def test_metadata_size_edit_names_features_and_both_sizes(dataset):
    """With the digest forged too, a dtype or shape whose size differs from the records is still caught."""
    rewrite_metadata(dataset, lambda m: m["schema"]["features"][0].update(dtype="float64"))
    line = one_error_line("inspect", dataset)
    assert line == (f"fedstream: error: {dataset}/train/shard-00000.array_record: record 0 has 20 bytes, the schema "
                    "in metadata.json gives 36 (x float64[4] = 32 B, y int32[] = 4 B)")
    rewrite_metadata(dataset, lambda m: m["schema"]["features"][0].update(dtype="float32", shape=[3]))
    with pytest.raises(DatasetFormatError, match=r"record 0 has 20 bytes, the schema in metadata\.json gives 16 "
                                                 r"\(x float32\[3\] = 12 B, y int32\[\] = 4 B\)"):
        FederatedDataset(dataset)


def test_verify_checks_every_record_size(tmp_path):
    """A variable-length schema: record 0 decodes with the edited schema, a later one does not."""
    schema = {"t": FeatureSpec("int16", (None,))}
    with DatasetWriter(tmp_path / "ds", schema) as writer:
        writer.add_client("train", "a", {"t": [np.zeros(0, np.int16), np.arange(3, dtype=np.int16)]})
    rewrite_metadata(tmp_path / "ds", lambda m: m["schema"]["features"][0].update(dtype="int32"))
    FederatedDataset(tmp_path / "ds")  # record 0 is a zero-length sequence: fits both widths
    line = one_error_line("inspect", tmp_path / "ds", "--verify")
    assert "train/shard-00000.array_record: record 1 " in line and "t int32[n] = 4 B + 4 B per element" in line


def test_success_marker_is_written_and_old_empty_marker_accepted(dataset):
    marker = (dataset / "_SUCCESS").read_bytes()
    assert marker == success_marker((dataset / "metadata.json").read_bytes())
    (dataset / "_SUCCESS").write_bytes(b"")  # a dataset written before the digest: accepted unchecked
    assert FederatedDataset(dataset).client_sizes("train").tolist() == SIZES


# ------------------------------------------------------------------------------- symbolic links


@pytest.fixture
def target(tmp_path) -> pathlib.Path:
    path = tmp_path / "target.txt"
    path.write_bytes(TARGET_TEXT)
    return path


def test_planted_lock_link_is_refused_and_target_kept(tmp_path, target):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ".lock").symlink_to(target)
    with pytest.raises(UnsafeFileError, match=r"run/\.lock is a symbolic link; fedstream does not write through "
                                              r"links in a workdir \(remove it\)"):
        WorkdirLock(workdir).acquire()
    assert target.read_bytes() == TARGET_TEXT


def test_planted_metrics_links_never_touch_targets(tmp_path, target):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"round": 1, "kind": "train"}\n{"round": 5, "kind": "train"}\n')
    (workdir / "metrics.jsonl.tmp").symlink_to(target)
    truncate_jsonl(workdir / "metrics.jsonl", 2)
    assert target.read_bytes() == TARGET_TEXT
    assert not (workdir / "metrics.jsonl.tmp").exists()
    assert (workdir / "metrics.jsonl").read_text() == '{"round": 1, "kind": "train"}\n'
    (workdir / "metrics.jsonl").unlink()
    (workdir / "metrics.jsonl").symlink_to(target)
    with pytest.raises(UnsafeFileError, match="metrics.jsonl is a symbolic link"):
        MetricsLog(workdir, resume_round=0, tensorboard=False)
    assert target.read_bytes() == TARGET_TEXT


def test_planted_client_state_tmp_link_is_replaced_not_followed(tmp_path, target):
    store = ClientStateStore(tmp_path / "client_state", {"w": np.zeros(2, np.float32)}, num_clients=3)
    (tmp_path / "client_state" / "round-00000001.states.tmp").symlink_to(target)
    store.write(1, np.array([0, 2]), np.array([True, True]), {"w": np.ones((2, 2), np.float32)})
    assert target.read_bytes() == TARGET_TEXT
    np.testing.assert_array_equal(store.read(np.array([2]))["w"], np.ones((1, 2), np.float32))


def test_open_no_follow_refuses_fifo_and_links(tmp_path, target):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafeFileError, match="fifo is not a regular file"):
        open_no_follow(tmp_path / "fifo", "a")
    (tmp_path / "link").symlink_to(target)
    for mode in ("r", "w", "a", "r+b"):
        with pytest.raises(UnsafeFileError, match="link is a symbolic link"):
            open_no_follow(tmp_path / "link", mode)
    with create_exclusive(tmp_path / "link", "w") as f:  # a temporary name: the link itself is replaced
        f.write("new")
    assert target.read_bytes() == TARGET_TEXT and (tmp_path / "link").read_text() == "new"


@pytest.mark.parametrize("inner", ["metadata.json", "_SUCCESS", "train", "train/index.npz",
                                   "train/shard-00000.array_record"])
def test_links_inside_a_dataset_are_refused(dataset, tmp_path, inner):
    victim = dataset / inner
    moved = tmp_path / "elsewhere"
    shutil.move(victim, moved)
    victim.symlink_to(moved)
    line = one_error_line("inspect", dataset)
    assert line == (f"fedstream: error: {victim}: a symbolic link inside the dataset directory; fedstream refuses "
                    "links in a dataset (copy the file in, or preprocess again)")


def test_dataset_directory_itself_may_be_a_link(dataset, tmp_path):
    (tmp_path / "alias").symlink_to(dataset)
    assert FederatedDataset(tmp_path / "alias").client_sizes("train").tolist() == SIZES


# ------------------------------------------------------------------ interrupted preprocess --force swap


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_swap_killed_between_renames_is_rolled_back_on_open(dataset, capsys):
    old = dataset.with_name(f".ds.old-{dead_pid()}-0a1b2c3d")
    os.rename(dataset, old)  # the state after the first rename
    new_tmp = dataset.with_name(f".ds.tmp-{dead_pid()}-deadbeef")
    shutil.copytree(old, new_tmp)
    ds = FederatedDataset(dataset)
    assert ds.client_sizes("train").tolist() == SIZES
    assert not old.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedstream: {dataset} was missing after an interrupted replacement (preprocess --force killed "
                   f"between its two renames); restored the previous dataset from {old.name}"]
    write_dataset(dataset, sizes=[1, 1])  # the next writer removes the new dataset's stale temporary directory
    assert not new_tmp.exists()
    assert FederatedDataset(dataset).client_sizes("train").tolist() == [1, 1]


def test_swap_killed_after_second_rename_drops_the_old_copy(dataset, capsys):
    old = dataset.with_name(".ds.old-0a1b2c3d")  # the older name form (no pid): its writer is gone
    shutil.copytree(dataset, old)
    (old / "_SUCCESS").unlink()  # as if deletion had begun
    write_dataset(dataset, sizes=[2])
    assert not old.exists()
    assert "removed" in capsys.readouterr().err
    assert FederatedDataset(dataset).client_sizes("train").tolist() == [2]


def test_old_copy_of_a_running_writer_is_left_alone(dataset):
    old = dataset.with_name(f".ds.old-{os.getpid()}-0a1b2c3d")
    os.rename(dataset, old)
    recover_interrupted_swap(dataset)
    assert old.exists() and not dataset.exists()
    with pytest.raises(DatasetFormatError, match="no such dataset directory"):
        FederatedDataset(dataset)


def test_preprocess_after_a_killed_swap_finds_the_dataset_again(tmp_path):
    """`fedstream preprocess` after a kill between the renames: the previous dataset is back (nothing lost)."""
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.arange(40, dtype=np.float32).reshape(20, 2), y=np.arange(20) % 3)
    out = tmp_path / "data"
    first = run_cli("preprocess", "arrays", "--output", out, f"--config.path={npz}", "--config.num_clients=4")
    assert first.returncode == 0, first
    before = (out / "metadata.json").read_bytes()
    old = out.with_name(f".data.old-{dead_pid()}-0a1b2c3d")
    os.rename(out, old)
    again = run_cli("preprocess", "arrays", "--output", out, f"--config.path={npz}", "--config.num_clients=4")
    assert again.returncode == 0, again
    assert f"restored the previous dataset from {old.name}" in again.stderr
    assert not old.exists() and (out / "metadata.json").read_bytes() == before
    assert FederatedDataset(out).num_clients("train") == 4


# ---------------------------------------------------------------------------------------- slow fuzz

INTERESTING = [-1, 0, 1, 3, 4, 7, 2**31, 2**62, 2**63, 10**30, -2**63, 0.5, float("nan"), "", "float32", "int32",
               "float64", "uint8", "bool", "train", "../x", "train/shard-00000.array_record", [], [None], [2],
               [4, 1], {}, None, True, "x" * 10_000]


def _open_and_read(path: pathlib.Path) -> tuple:
    """Opens, reads every client and verifies; returns the ids and sizes seen."""
    ds = FederatedDataset(path)
    for i in range(ds.num_clients("train")):
        ds.get_client("train", i)
    ds.verify()
    return ds.client_ids("train").tolist(), ds.client_sizes("train").tolist()


@pytest.mark.slow
def test_fuzz_every_bit_flip_of_index(dataset, capsys):
    """Every single-bit flip of a split's index.npz: the index reads back unchanged (a flip in a field
    nothing checks, such as a timestamp) or opening is one DatasetFormatError naming the file."""
    index = dataset / "train" / "index.npz"
    original = index.read_bytes()
    want = FederatedDataset(dataset).client_ids("train").tolist(), SIZES
    outcomes = {"opened unchanged": 0, "refused": 0}
    for position in range(len(original)):
        for bit in range(8):
            data = bytearray(original)
            data[position] ^= 1 << bit
            index.write_bytes(bytes(data))
            try:
                ds = FederatedDataset(dataset)
            except DatasetFormatError as e:
                assert "train/index.npz" in str(e) and "\n" not in str(e), str(e)
                outcomes["refused"] += 1
                continue
            assert (ds.client_ids("train").tolist(), ds.client_sizes("train").tolist()) == want, (position, bit)
            outcomes["opened unchanged"] += 1
    with capsys.disabled():
        print(f"\nindex.npz single-bit flips: {sum(outcomes.values())} cases, {outcomes}")
    assert sum(outcomes.values()) == 8 * len(original)


@pytest.mark.slow
def test_fuzz_metadata_value_edits(dataset, tmp_path, capsys):
    """Random edits of metadata.json values (with and without a forged _SUCCESS digest): every case
    opens, reads and verifies, or is one DatasetFormatError naming a file of the dataset."""
    import random

    rng = random.Random(16)
    pristine = tmp_path / "pristine"
    shutil.copytree(dataset, pristine)
    original = json.loads((pristine / "metadata.json").read_text())

    def paths(node, prefix=()):
        yield prefix
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            yield from paths(value, prefix + (key,))

    all_paths = [p for p in paths(original) if p]
    outcomes = {"opened": 0, "refused": 0}
    cases = int(os.environ.get("FEDSTREAM_METADATA_FUZZ_CASES", "1500"))
    for _ in range(cases):
        shutil.rmtree(dataset)
        shutil.copytree(pristine, dataset)
        meta = json.loads(json.dumps(original))
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            path = rng.choice(all_paths)
            parent = meta
            try:
                for part in path[:-1]:
                    parent = parent[part]
                if rng.random() < 0.1:
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = copy.deepcopy(rng.choice(INTERESTING))
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit removed or replaced this path
        data = json.dumps(meta).encode()
        (dataset / "metadata.json").write_bytes(data)
        if rng.random() < 0.8:
            (dataset / "_SUCCESS").write_bytes(success_marker(data))
        try:
            _open_and_read(dataset)
        except DatasetFormatError as e:
            assert str(dataset) in str(e) and "\n" not in str(e), str(e)
            outcomes["refused"] += 1
            continue
        outcomes["opened"] += 1
    with capsys.disabled():
        print(f"\nmetadata.json value edits: {cases} cases, {outcomes}")
