"""TensorBoard event files written by a run are readable by TensorBoard: scalars per round, hparams once.

Needs the tensorboard extra (clu.metric_writers imports TensorFlow); skipped without it.
"""

import inspect
import json

import pytest

pytest.importorskip("clu.metric_writers", reason="needs the tensorboard extra (pip install -e '.[tensorboard]')")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from fedstream.cli import main  # noqa: E402
from fedstream.config import flatten, load_config  # noqa: E402
from fedstream.data.preprocessing import run_preprocess  # noqa: E402
from fedstream.training.metrics_log import MetricsLog  # noqa: E402

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


def _hparams_hook_present():
    from fedstream.training import train

    return "write_hparams" in inspect.getsource(train)


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


@pytest.mark.skipif(not _hparams_hook_present(), reason="train.py does not call MetricsLog.write_hparams yet")
def test_run_writes_hparams_once_even_after_resume(run):
    workdir, data = run
    assert main(["train", "digits_fedavg", "--workdir", str(workdir), "--config.num_rounds=4", "--config.eval.every=1",
                 f"--config.data.path={data}"]) == 0  # resumes after round 3
    scalars, hparams = read_events(workdir / "tensorboard")
    assert len(hparams) == 1
    assert hparams[0]["num_rounds"] == 3 and hparams[0]["data.path"] == str(data)
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
