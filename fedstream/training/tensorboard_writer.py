"""TensorBoard event files without TensorFlow: a `clu.metric_writers.MetricWriter` on the `tensorboard` package.

`clu.metric_writers.SummaryWriter` goes through `tf.summary` and so imports
TensorFlow (1.6 GB of install, 2 s of import). The `tensorboard` package
alone has everything needed to write what TensorBoard reads: the `Event` and
`Summary` protos (`tensorboard.compat.proto`), the record framing with its
masked CRC32C (`tensorboard.summary.writer.record_writer.RecordWriter`) and
the plugins' own summary protos (hparams, histograms, text). `EventWriter`
puts those together; it needs neither TensorFlow nor a background thread:

- scalars as `Summary.Value.simple_value` (read by TensorBoard's scalar dashboard and
  `event_accumulator.Scalars`),
- images as PNG `Summary.Image` values (encoded here with zlib, no imaging library),
- hparams through the hparams plugin's `hparams_pb` (the `session_start_info` summary),
- histograms and text through those plugins' protos; videos and audio are not supported.

Each writer owns one new file, `events.out.tfevents.<time>.<host>.<pid>.<n>`
(TensorBoard's naming), opened without following links (`fedstream.io_safety`);
records are written synchronously and `flush` pushes them to the OS.

Resume: `purge_after(logdir, step)` rewrites the event files already in a
directory without the events of steps after `step` (what a checkpoint does not
cover), the way `metrics.jsonl` is cut back; a writer created with
`restart_step=step + 1` then starts its file with a `SessionLog.START` event at
that step, which tells a TensorBoard that had already loaded the dropped events
to forget every step from there on.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pathlib
import socket
import struct
import time
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from fedstream.io_safety import create_exclusive, open_no_follow


def _clu_interface() -> Any:
    """clu's `metric_writers.interface` module (the `MetricWriter` ABC).

    `import clu.metric_writers` imports TensorFlow: the package's `__init__` imports its
    `tf.summary` writer. Where that import fails, the interface module, which needs only
    abc, typing, numpy and jax, is loaded from clu's installed file under a private name,
    so `EventWriter` is a `MetricWriter` either way.
    """
    try:
        from clu.metric_writers import interface

        return interface
    except ImportError:
        pass
    clu_spec = importlib.util.find_spec("clu")
    if clu_spec is None or clu_spec.origin is None:
        raise ImportError("clu is not installed")
    path = pathlib.Path(clu_spec.origin).parent / "metric_writers" / "interface.py"
    spec = importlib.util.spec_from_file_location("fedstream.training._clu_metric_writer_interface", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


interface = _clu_interface()
MetricWriter = interface.MetricWriter

# The `tensorboard` package is imported inside the functions: importing this module never needs it.
EVENT_FILE_PREFIX = "events.out.tfevents."
_PURGE_TMP = ".fedstream-purge.tmp"
_counter = itertools.count()


def available() -> bool:
    """Whether the `tensorboard` package (the `tensorboard` extra) is installed."""
    try:
        from tensorboard.compat.proto import event_pb2  # noqa: F401
        from tensorboard.summary.writer import record_writer  # noqa: F401
    except ImportError:
        return False
    return True


class EventWriter(MetricWriter):
    """Writes TensorBoard event files into `logdir` (created if needed) through the `tensorboard` package.

    `restart_step`: when given, the file starts with a `SessionLog.START` event at
    that step (a resumed run: readers drop what they hold from that step on).
    """

    def __init__(self, logdir: str | os.PathLike, *, restart_step: int | None = None) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"{EVENT_FILE_PREFIX}{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_counter)}"
        self.path = self.logdir / name
        self._file = create_exclusive(self.path, "wb")
        self._records = RecordWriter(self._file)
        self._write_event(event_pb2.Event(file_version="brain.Event:2"))
        if restart_step is not None:
            self._write_event(event_pb2.Event(step=int(restart_step),
                                              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self.flush()

    # --- MetricWriter ----------------------------------------------------------------------------------------

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None) -> None:
        """Writes tensors with optional `SummaryMetadata` protos (or their serialized bytes) per tag."""
        from tensorboard.util import tensor_util

        summary_pb2 = self._summary_pb2
        out = []
        for tag, value in values.items():
            meta = (metadata or {}).get(tag)
            if isinstance(meta, bytes):
                meta = summary_pb2.SummaryMetadata.FromString(meta)
            out.append(summary_pb2.Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(np.asarray(value)),
                                                 metadata=meta))
        self._write_summary(step, out)

    def write_scalars(self, step: int, scalars: Mapping[str, interface.Scalar]) -> None:
        """One `simple_value` per tag at `step`."""
        self._write_summary(step, [self._summary_pb2.Summary.Value(tag=tag, simple_value=float(np.asarray(value)))
                                   for tag, value in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, interface.Array]) -> None:
        """Images of shape [H, W, C] or [N, H, W, C] (C = 1, 3 or 4; uint8, or floats in [0, 1]) as PNG.

        N > 1 images of a tag go under `tag/image/i`, as `tf.summary.image` (TF1) names them.
        """
        summary_pb2 = self._summary_pb2
        out = []
        for tag, value in images.items():
            batch = np.asarray(value)
            if batch.ndim == 3:
                batch = batch[None]
            if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
                raise ValueError(f"image {tag!r}: expected [H, W, C] or [N, H, W, C] with C in (1, 3, 4), "
                                 f"got shape {batch.shape}")
            for i, image in enumerate(batch):
                height, width, channels = image.shape
                encoded = summary_pb2.Summary.Image(height=height, width=width, colorspace=channels,
                                                    encoded_image_string=encode_png(image))
                out.append(summary_pb2.Summary.Value(tag=tag if len(batch) == 1 else f"{tag}/image/{i}",
                                                     image=encoded))
        self._write_summary(step, out)

    def write_videos(self, step: int, videos: Mapping[str, interface.Array]) -> None:
        """Not supported (TensorBoard has no video dashboard; clu's TF writer skips them too)."""
        raise NotImplementedError("fedstream's TensorBoard writer does not write videos")

    def write_audios(self, step: int, audios: Mapping[str, interface.Array], *, sample_rate: int) -> None:
        """Not supported."""
        raise NotImplementedError("fedstream's TensorBoard writer does not write audio")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Text snippets for TensorBoard's text dashboard (its plugin's string tensors)."""
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.util import tensor_util

        summary_pb2 = self._summary_pb2
        self._write_summary(step, [
            summary_pb2.Summary.Value(tag=tag, metadata=text_metadata.create_summary_metadata(display_name=tag,
                                                                                              description=""),
                                      tensor=tensor_util.make_tensor_proto(np.asarray(text.encode("utf-8"),
                                                                                      dtype=object)))
            for tag, text in texts.items()])

    def write_histograms(self, step: int, arrays: Mapping[str, interface.Array],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        """Histograms through the histogram plugin's `histogram_pb` (30 buckets unless `num_buckets` says)."""
        from tensorboard.plugins.histogram import summary_v2 as histogram

        out = []
        for tag, value in arrays.items():
            buckets = (num_buckets or {}).get(tag, 30)
            out.extend(histogram.histogram_pb(tag, np.asarray(value, dtype=np.float64), buckets=buckets).value)
        self._write_summary(step, out)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's hyperparameters (bool, int, float or str values) as the hparams plugin's session start."""
        from tensorboard.plugins.hparams import summary_v2 as hparams_summary

        summary = hparams_summary.hparams_pb(dict(hparams), start_time_secs=int(time.time()))
        self._write_summary(0, list(summary.value))

    def flush(self) -> None:
        """Pushes the written records to the operating system."""
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    # --- internals --------------------------------------------------------------------------------------------

    def _write_summary(self, step: int, values: list[Any]) -> None:
        if values:
            self._write_event(self._event_pb2.Event(step=int(step),
                                                    summary=self._summary_pb2.Summary(value=values)))

    def _write_event(self, event: Any) -> None:
        if not event.wall_time:
            event.wall_time = time.time()
        self._records.write(event.SerializeToString())


def encode_png(image: np.ndarray) -> bytes:
    """An [H, W, C] image (C = 1, 3 or 4; uint8, or floats in [0, 1]) as PNG bytes (8-bit, no filtering)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]  # gray, RGB, RGBA
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * channels)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
    """The records of a TFRecord/event file in order; stops at a record cut short (a killed writer)
    or one whose length does not match its checksum. Never opens through a symbolic link."""
    for payload, _ in _framed_records(path):
        yield payload


def _framed_records(path: str | os.PathLike) -> Iterator[tuple[bytes, bytes]]:
    """(payload, the whole framed record as stored) of each record of `read_records`."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with open_no_follow(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + 12 <= len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        end = offset + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(data):
            return
        yield data[offset + 12:offset + 12 + length], data[offset:end]
        offset = end


def event_files(logdir: str | os.PathLike) -> list[pathlib.Path]:
    """The event files directly in `logdir` (none if it does not exist), in name order."""
    logdir = pathlib.Path(logdir)
    if not logdir.is_dir():
        return []
    return sorted(p for p in logdir.iterdir() if p.name.startswith(EVENT_FILE_PREFIX) and not p.is_symlink()
                  and p.is_file())


def purge_after(logdir: str | os.PathLike, last_step: int) -> int:
    """Rewrites the event files in `logdir` without the events of steps after `last_step`; returns how many
    events were dropped from the files that are kept.

    Events without a step (the file-version header) are kept. With `last_step <= 0` the files are removed
    altogether: nothing of a run that never reached a checkpoint is kept, and the restarted run writes
    its hparams again. Each file is rewritten to a temporary name and renamed over the original, so a
    crash leaves either the old or the new file; a file left without summaries is deleted.
    """
    from tensorboard.compat.proto import event_pb2

    dropped = 0
    for path in event_files(logdir):
        if last_step <= 0:
            path.unlink()
            continue
        kept: list[bytes] = []
        changed, has_summaries = False, False
        for record, framed in _framed_records(path):
            try:
                event = event_pb2.Event.FromString(record)
            except Exception:  # noqa: BLE001 - a damaged record: drop it with the rest of the file
                changed = True
                break
            if event.step > last_step:
                changed = True
                dropped += 1
                continue
            has_summaries = has_summaries or event.HasField("summary")
            kept.append(framed)  # copied as stored, checksums included
        if not changed and path.stat().st_size == sum(len(r) for r in kept):
            continue
        if not has_summaries:
            path.unlink()
            continue
        tmp = path.with_name(_PURGE_TMP)  # no "tfevents" in the name: TensorBoard never reads a leftover
        with create_exclusive(tmp, "wb") as f:
            f.write(b"".join(kept))
        os.replace(tmp, path)
    return dropped
