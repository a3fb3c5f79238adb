"""TensorBoard event files written by a run are readable by TensorBoard: scalars per round, hparams once,
the run's plot as an image, no step twice after a resume; and no TensorFlow is imported for them.

Needs the `tensorboard` package (the tensorboard extra, also in the test extra); skipped without it.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="needs the tensorboard package (pip install -e '.[test]')")
from tensorboard.compat.proto import event_pb2  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from fedstream.cli import main  # noqa: E402
from fedstream.config import flatten, load_config, validate_train_config  # noqa: E402
from fedstream.data.preprocessing import run_preprocess  # noqa: E402
from fedstream.training import tensorboard_writer  # noqa: E402
from fedstream.training.metrics_log import MetricsLog  # noqa: E402
from fedstream.training.simulation import Callback  # noqa: E402
from fedstream.training.train import simulation_from_config  # noqa: E402

HPARAMS_TAG = "_hparams_/session_start_info"


def read_events(logdir):
    """({tag: {step: value}} of every scalar, [hparams dict of each session_start_info event])."""
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0,
                                                                         event_accumulator.SCALARS: 0})
    acc.Reload()
    scalars, hparams = {}, []
    for tag in acc.Tags()["scalars"]:  # TF1-style summaries
        scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    for tag in acc.Tags()["tensors"]:  # tf.summary (TF2) stores scalars as tensors
        if tag == HPARAMS_TAG:
            continue
        scalars[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
    if HPARAMS_TAG in acc.Tags()["tensors"]:
        content = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")[HPARAMS_TAG])
        values = {k: getattr(v, v.WhichOneof("kind")) for k, v in content.session_start_info.hparams.items()}
        hparams = [values for _ in acc.Tensors(HPARAMS_TAG)]
    return scalars, hparams


def test_metrics_log_scalars_and_hparams_round_trip(tmp_path):
    log = MetricsLog(tmp_path, resume_round=0)
    assert log.tensorboard_enabled
    log.write(1, "train", {"loss": 2.5, "accuracy": 0.25, "clients": 10})
    log.write(2, "train", {"loss": 2.0, "accuracy": 0.5, "clients": 10})
    log.write(2, "eval", {"accuracy": 0.75})
    config = load_config("digits_fedavg", "fedstream.pipelines")
    assert log.write_hparams(flatten(config.to_dict()))
    log.close()
    scalars, hparams = read_events(tmp_path / "tensorboard")
    assert scalars["train/loss"] == {1: 2.5, 2: 2.0}
    assert scalars["train/clients"] == {1: 10.0, 2: 10.0}
    assert scalars["eval/accuracy"] == {2: 0.75}
    assert len(hparams) == 1
    assert hparams[0]["client.learning_rate"] == pytest.approx(0.1)
    assert hparams[0]["model.name"] == "mlp"
    assert hparams[0]["model.hidden"] == "[200, 200]"  # sequences as JSON text

    resumed = MetricsLog(tmp_path, resume_round=2)
    assert not resumed.write_hparams(flatten(config.to_dict()))  # once per run: not again on resume
    resumed.close()
    assert len(read_events(tmp_path / "tensorboard")[1]) == 1


def raw_events(logdir):
    """Every event in the event files of `logdir`, file after file, as stored (no reader-side purging)."""
    return [event_pb2.Event.FromString(record) for path in tensorboard_writer.event_files(logdir)
            for record in tensorboard_writer.read_records(path)]


def scalar_steps(logdir):
    """{tag: [step of each stored scalar value, in file order]} (duplicates kept)."""
    steps = {}
    for event in raw_events(logdir):
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_writer_is_a_clu_metric_writer_without_tensorflow(tmp_path):
    """In a fresh interpreter: MetricsLog writes scalars, hparams and an image, and TensorFlow stays unimported."""
    code = (
        "import sys, numpy as np\n"
        "from fedstream.training.metrics_log import MetricsLog\n"
        "from fedstream.training import tensorboard_writer as tw\n"
        "log = MetricsLog(sys.argv[1], resume_round=0)\n"
        "assert log.tensorboard_enabled and isinstance(log._tb, tw.MetricWriter)\n"
        "assert tw.MetricWriter.__name__ == 'MetricWriter' and 'write_scalars' in tw.MetricWriter.__abstractmethods__\n"
        "log.write(1, 'train', {'loss': 1.5})\n"
        "log.write_hparams({'seed': 0})\n"
        "log._tb.write_images(1, {'img': np.zeros((4, 5, 3), np.uint8)})\n"
        "log.close()\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    assert acc.Tags()["scalars"] == ["train/loss"] and acc.Tags()["images"] == ["img"]


def test_images_are_png_that_tensorboard_reads(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    gray = rng.random((2, 5, 6, 1))  # floats in [0, 1], two images
    writer = tensorboard_writer.EventWriter(tmp_path)
    writer.write_images(3, {"rgb": rgb, "gray": gray})
    writer.write_texts(3, {"note": "hello"})
    writer.write_histograms(3, {"weights": rng.normal(size=100)}, num_buckets={"weights": 10})
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["gray/image/0", "gray/image/1", "rgb"]
    image = acc.Images("rgb")[0]
    assert (image.step, image.width, image.height) == (3, 9, 7)
    assert image.encoded_image_string.startswith(b"\x89PNG\r\n\x1a\n")
    pil = pytest.importorskip("PIL.Image")  # a dependency of tensorboard: decode the PNG back
    import io

    assert np.array_equal(np.asarray(pil.open(io.BytesIO(image.encoded_image_string))), rgb)
    decoded = np.asarray(pil.open(io.BytesIO(acc.Images("gray/image/1")[0].encoded_image_string)))
    assert np.array_equal(decoded, np.rint(gray[1, ..., 0] * 255).astype(np.uint8))
    assert "note" in acc.Tags()["tensors"] and "weights" in acc.Tags()["tensors"]
    with pytest.raises(NotImplementedError):
        tensorboard_writer.EventWriter(tmp_path / "v").write_videos(0, {"v": np.zeros((1, 2, 2, 2, 3))})


def test_purge_drops_later_steps_and_a_cut_record(tmp_path):
    log = MetricsLog(tmp_path, resume_round=0)
    for r in (1, 2, 3):
        log.write(r, "train", {"loss": float(r)})
    log.close()
    [path] = tensorboard_writer.event_files(tmp_path / "tensorboard")
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00")  # a record cut by a kill
    resumed = MetricsLog(tmp_path, resume_round=2)
    resumed.write(3, "train", {"loss": 30.0})
    resumed.close()
    assert scalar_steps(tmp_path / "tensorboard") == {"train/loss": [1, 2, 3]}
    starts = [e.step for e in raw_events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert starts == [3]  # the new segment tells a live TensorBoard to forget steps >= 3
    assert not list((tmp_path / "tensorboard").glob(".*"))  # no temporary file left
    MetricsLog(tmp_path, resume_round=0).close()  # a restart from scratch: nothing of the old run is kept
    assert scalar_steps(tmp_path / "tensorboard") == {}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-round digits run with an evaluation after every round: (workdir, data path)."""
    root = tmp_path_factory.mktemp("tb")
    data = run_preprocess("digits", root / "digits", progress=None)
    workdir = root / "run"
    assert main(["train", "digits_fedavg", "--workdir", str(workdir), "--config.num_rounds=3", "--config.eval.every=1",
                 f"--config.data.path={data}"]) == 0
    return workdir, data


def test_run_event_files_hold_every_round(run):
    workdir, _ = run
    scalars, _ = read_events(workdir / "tensorboard")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for kind in ("train", "eval"):
        for name in ("loss", "accuracy"):
            expected = {r["round"]: r[name] for r in records if r["kind"] == kind}
            assert sorted(expected) == [1, 2, 3]
            got = scalars[f"{kind}/{name}"]
            assert sorted(got) == [1, 2, 3], (kind, name, got)
            for step, value in expected.items():
                assert got[step] == pytest.approx(value, rel=1e-6), (kind, name, step)
    assert sorted(scalars["train/examples"]) == [1, 2, 3]


def test_run_writes_hparams_once_even_after_resume(run):
    workdir, data = run
    assert main(["train", "digits_fedavg", "--workdir", str(workdir), "--config.num_rounds=4", "--config.eval.every=1",
                 f"--config.data.path={data}"]) == 0  # resumes after round 3
    scalars, hparams = read_events(workdir / "tensorboard")
    assert len(hparams) == 1
    assert hparams[0]["num_rounds"] == 3 and hparams[0]["data.path"] == str(data)
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]


class _StopAfter(Callback):
    """Stops a run (as a kill would) once round `round_index` has written its metrics."""

    def __init__(self, round_index: int) -> None:
        self.round_index = round_index

    def on_round_end(self, round_index, metrics, saved, checkpointer) -> None:
        if round_index == self.round_index:
            raise KeyboardInterrupt


def test_resume_writes_each_step_once(tmp_path, digits):
    """4 rounds, checkpoints every 2, stopped after round 3 (its events written, no checkpoint), resumed
    from round 2 to 4: each scalar holds steps 1..4 exactly once in the files, the plot image is at 4."""
    overrides = ["num_rounds=4", "eval.every=1", "checkpoint.every=2", f"data.path={digits}"]
    config = load_config("digits_fedavg", "fedstream.pipelines", overrides)
    validate_train_config(config)
    workdir = tmp_path / "run"
    simulation = simulation_from_config(config, workdir, callbacks=(_StopAfter(3),), log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        simulation.run(4)
    assert scalar_steps(workdir / "tensorboard")["train/loss"] == [1, 2, 3]
    assert main(["train", "digits_fedavg", "--workdir", str(workdir), *(f"--config.{o}" for o in overrides)]) == 0
    steps = scalar_steps(workdir / "tensorboard")
    for tag in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy"):
        assert sorted(steps[tag]) == [1, 2, 3, 4], (tag, steps[tag])
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scalars, hparams = read_events(workdir / "tensorboard")
    assert scalars["train/loss"] == pytest.approx({r["round"]: r["loss"] for r in records if r["kind"] == "train"})
    assert len(hparams) == 1
    images = [(e.step, v.tag) for e in raw_events(workdir / "tensorboard") for v in e.summary.value
              if v.WhichOneof("value") == "image"]
    assert images == [(4, "plots/metrics")]  # drawn when a run finishes (the stopped one did not); needs matplotlib
