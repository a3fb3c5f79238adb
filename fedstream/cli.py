"""The `fedstream` command: preprocess, inspect, train, eval, config, plot, list.

    fedstream preprocess RECIPE --output DIR [--force] [--config.key=value ...]
                         [--runner DirectRunner|FlinkRunner|SparkRunner|DataflowRunner --beam-option KEY=VALUE ...]
    fedstream inspect DIR [--verify] [--digest] [--labels | --no-labels] [--label-key FEATURE] [--label-sample N]
    fedstream train [PIPELINE] --workdir DIR [--config.key=value ...]
    fedstream eval [PIPELINE] --workdir DIR [--split SPLIT] [--step N] [--config.key=value ...]
    fedstream config [PIPELINE] [--workdir DIR] [--json] [--config.key=value ...]
    fedstream plot WORKDIR [WORKDIR ...] --output FILE.png|.svg|.pdf [--metric NAME ...] [--x round|time|simulated_time]
    fedstream plot --data DIR --output FILE.png|.svg|.pdf [--split SPLIT] [--max-clients N] [--label-key FEATURE]
    fedstream list [recipes|pipelines|models|algorithms|optimizers ...] [--algorithm NAME]

RECIPE and PIPELINE are names (resolved in `preprocess/` and `pipelines/`)
or paths to `.py` files with a `get_config()`. A workdir that holds a run
supplies its stored config, so PIPELINE may be left out to resume or evaluate it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import textwrap
from typing import Any, Iterator, Sequence


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.k=v` / `--config.k v` items from the other arguments."""
    rest, overrides = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--config."):
            if "=" in item:
                overrides.append(item[len("--config."):])
            elif i + 1 < len(items):
                overrides.append(f"{item[len('--config.'):]}={items[i + 1]}")
                i += 1
            else:
                raise SystemExit(f"fedstream: {item} needs a value")
        else:
            rest.append(item)
        i += 1
    return rest, overrides


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value else None
    except ValueError:
        raise SystemExit(f"fedstream: environment variable {name}={value!r} is not an integer") from None


def init_distributed(args: argparse.Namespace) -> None:
    """Joins a multi-process JAX run when asked to; must run before any other JAX call."""
    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if not args.distributed and any(v is None for v in explicit):
        raise SystemExit("fedstream: a multi-process run needs --coordinator-address, --num-processes and "
                         "--process-id together (or --distributed on a cluster JAX detects)")
    import jax

    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)


# --- the parser: one sub-command each, with a description and examples for --help -------------------------------
_OVERRIDES_HELP = ("Any config key can be overridden with --config.KEY=VALUE (e.g. --config.client.learning_rate=0.05); "
                   "an unknown key or a value of the wrong type is refused, naming the key.")


_TRACEBACK_HELP = ("on an error, print the full Python traceback instead of one line (by default an unexpected "
                  "error's traceback is written to a file, WORKDIR/errors/ or the temp dir, and the line names it)")


def _sub(sub: Any, name: str, help_text: str, description: str, examples: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=textwrap.fill(description, 100),
                            epilog="examples:\n" + examples,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    # SUPPRESS: a sub-command's default must not overwrite `fedstream --traceback COMMAND`
    parser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=_TRACEBACK_HELP)
    return parser


def _version() -> str:
    """The installed version of fedstream (its `__version__`, the single source of the package's version)."""
    from fedstream import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `fedstream` command."""
    parser = argparse.ArgumentParser(
        prog="fedstream", description=__doc__.split("\n\n")[0].strip('"'),
        epilog="Run 'fedstream COMMAND --help' for a command's options. An error prints one line and exits with "
               "status 2 (130 for Ctrl-C); --traceback prints the full traceback instead, and FEDSTREAM_DEBUG=1 lets "
               "the exception propagate.")
    parser.add_argument("--traceback", action="store_true", help=_TRACEBACK_HELP)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _sub(sub, "preprocess", "convert a dataset into the fedstream format, once",
             "Run a recipe once into a dataset directory (client-contiguous ArrayRecord shards, index, metadata). "
             "Rerunning onto a complete output with the same recipe, config and input is a no-op. "
             "Recipe knobs are --config.KEY=VALUE; 'fedstream list recipes' shows the recipes.",
             "  fedstream preprocess digits --output data/digits --config.num_clients=50 --config.alpha=0.2\n"
             "  fedstream preprocess arrays --output data/mine --config.path=mine.npz --config.partitioner=dirichlet")
    p.add_argument("recipe", help="recipe name (e.g. digits, synthetic, arrays) or path to a recipe .py")
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument("--force", action="store_true", help="rewrite a complete output directory")
    p.add_argument("--source", help="an already-downloaded upstream file or directory for recipes that download "
                                    "(the same as --config.source=...)")
    p.add_argument("--compression", default="uncompressed",
                   help="shard compression: uncompressed (fastest to read, default), snappy, zstd:1, zstd:3, ...")
    p.add_argument("--runner", choices=("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner",
                                        "PortableRunner", "PrismRunner"),
                   help="run on Apache Beam with this runner (pip install 'fedstream[beam]'; recipes tabular with "
                        "--config.client_key, arrays, grouped; see docs/beam.md); default: one process")
    p.add_argument("--beam-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a Beam pipeline option, repeatable (e.g. direct_num_workers=4, "
                        "flink_master=HOST:8081); needs --runner")
    t = _sub(sub, "train", "run or resume an experiment",
             "Train the experiment PIPELINE in WORKDIR, or resume it from its last checkpoint. A resume starts "
             "from the run's stored config plus this command's overrides (PIPELINE may be left out; if given, it "
             "must agree with the run on every key that changes results); a run that has done its num_rounds "
             "says so and exits (extend it with --config.num_rounds=N). Only one run may use a workdir at a time. "
             "A config that is invalid, or that differs from the run's in a key that changes results, is refused "
             "before any work starts. " + _OVERRIDES_HELP,
             "  fedstream train digits_fedavg --workdir checkpoints/digits\n"
             "  fedstream train digits_fedavg --workdir checkpoints/adam --config.server.optimizer=adam "
             "--config.server.learning_rate=0.01\n"
             "  fedstream train --workdir checkpoints/adam --config.num_rounds=400   # resume and extend the run")
    t.add_argument("pipeline", nargs="?",
                   help="pipeline name (e.g. digits_fedavg) or path to a config .py (optional when resuming)")
    t.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics); resumed if it exists")
    t.add_argument("--debug", action="store_true",
                   help="run each round eagerly, client by client, so that print() and pdb work inside an "
                        "algorithm's hooks (results equal the compiled round's to float rounding; slow)")
    t.add_argument("--resume-last-good", action="store_true",
                   help="if the latest checkpoint is corrupted, move it to WORKDIR/corrupted_checkpoints/ and "
                        "resume from the newest intact one (default: stop with an error naming it)")
    d = t.add_argument_group("multi-process (one command per host; see docs/multihost.md)")
    d.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with the cluster's auto-detected settings "
                        "(TPU pods, SLURM, Open MPI, ...)")
    d.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="host:port of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    d.add_argument("--num-processes", type=int, default=_env_int("FEDSTREAM_NUM_PROCESSES"),
                   help="number of processes (env FEDSTREAM_NUM_PROCESSES)")
    d.add_argument("--process-id", type=int, default=_env_int("FEDSTREAM_PROCESS_ID"),
                   help="this process's id, 0..num_processes-1 (env FEDSTREAM_PROCESS_ID)")
    e = _sub(sub, "eval", "evaluate a saved checkpoint on any split",
             "Evaluate checkpoint STEP (default: the latest) of the run in WORKDIR on a split of its dataset and "
             "print loss and accuracy (example-weighted and client mean). The config is the run's own, stored in "
             "the checkpoint, with any --config overrides on top; or give the run's pipeline and overrides. Only "
             "num_rounds, data_threads, eval.*, checkpoint.* and data.path (a moved dataset) may differ from the "
             "run's. The workdir is only read, so a running training is not disturbed.",
             "  fedstream eval --workdir checkpoints/digits\n"
             "  fedstream eval --workdir checkpoints/digits --split train --step 100 --json\n"
             "  fedstream eval digits_fedavg --workdir checkpoints/digits --config.data.path=data/digits")
    e.add_argument("pipeline", nargs="?", help="the run's pipeline name or config .py (default: the stored config)")
    e.add_argument("--workdir", required=True, help="the run's directory")
    e.add_argument("--split", help="split to evaluate (default: config.data.test_split)")
    e.add_argument("--step", type=int, help="checkpoint step = rounds completed (default: the latest kept)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g = _sub(sub, "plot", "plot metrics of runs to compare them, or a dataset's labels over clients",
             "Plot train/eval metrics from the metrics.jsonl of one or more workdirs into one file: a panel per "
             "metric, a line per run (labelled with the workdir name), eval points marked with their round. Or, "
             "with --data DIR, a dataset's label distribution over clients (stacked bars of each client's label "
             "counts, clients sorted by size) and a histogram of examples per client. The --output extension "
             "picks the format: .png, .svg or .pdf. Needs matplotlib (pip install 'fedstream[plot]').",
             "  fedstream plot checkpoints/sgd checkpoints/adam --output compare.png\n"
             "  fedstream plot checkpoints/sgd checkpoints/adam --output time.pdf --metric eval/accuracy --x time\n"
             "  fedstream plot --data data/digits --output labels.svg --split train")
    g.add_argument("workdirs", nargs="*", metavar="WORKDIR", help="run directories holding metrics.jsonl")
    g.add_argument("--output", required=True, help="file to write: .png, .svg or .pdf")
    g.add_argument("--data", metavar="DIR", help="plot this dataset's label distribution and client sizes instead "
                                                 "of runs")
    g.add_argument("--split", help="with --data: the split (default: train, else the first)")
    g.add_argument("--max-clients", type=int, metavar="N",
                   help="with --data: at most N client bars, evenly spaced in size order (default: 100)")
    g.add_argument("--label-key", metavar="FEATURE",
                   help="with --data: the integer label feature (default: the recipe's label_key, else y)")
    g.add_argument("--metric", action="append", default=[],
                   help="KIND/NAME (train/loss, eval/accuracy, train/examples_per_second, ...) or a bare NAME for "
                        "every kind that has it; repeatable (default: train and eval loss and accuracy)")
    g.add_argument("--x", choices=("round", "time", "simulated_time"), default="round",
                   help="x axis: round, training time (cumulative round_seconds), or simulated_time (runs on the "
                        "simulated clock, config clock.enabled)")
    i = _sub(sub, "inspect", "summarise a preprocessed dataset",
             "Print a dataset's splits, clients, examples, features, client-size quantiles and disk size, and "
             "how its labels are spread over clients: classes per client and a skew measure, the mean "
             "total-variation distance of a client's label distribution from its split's, next to the same "
             "measure for an IID split of the same client sizes. Labels are read for splits of up to 512 MiB "
             "of shards unless --labels or --no-labels says otherwise. --digest prints a per-split content "
             "digest that does not depend on shard sizes, chunking or compression.",
             "  fedstream inspect data/digits\n  fedstream inspect data/digits --verify --digest\n"
             "  fedstream inspect data/emnist --labels --label-sample 1000")
    i.add_argument("path", help="dataset directory")
    i.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    i.add_argument("--labels", action=argparse.BooleanOptionalAction, default=None,
                   help="read the labels of every split (--no-labels: of none; default: of splits of at most "
                        "512 MiB)")
    i.add_argument("--label-key", metavar="FEATURE",
                   help="the integer label feature (default: the recipe's label_key, else y)")
    i.add_argument("--label-sample", type=int, metavar="N",
                   help="summarise the labels of N clients per split, drawn at random (seed 0), instead of all")
    i.add_argument("--digest", action="store_true",
                   help="print each split's content digest (sha256 over clients sorted by id; reads all data)")
    c = _sub(sub, "config", "print the resolved config of a pipeline or a run",
             "Print the full config that 'fedstream train' would run: the pipeline's get_config() with the "
             "--config overrides applied (or, with --workdir of an existing run, the run's stored config plus the "
             "overrides, as a resume would use it), validated. Printed in ml_collections' text form, or as JSON.",
             "  fedstream config digits_fedavg --config.algorithm.name=fedprox "
             "--config.algorithm.options.proximal_weight=0.1\n"
             "  fedstream config --workdir checkpoints/digits --json")
    c.add_argument("pipeline", nargs="?", help="pipeline name or path to a config .py (optional with --workdir)")
    c.add_argument("--workdir", help="a run directory: start from the run's stored config")
    c.add_argument("--json", action="store_true", help="print JSON instead of the ml_collections text form")
    ls = _sub(sub, "list", "list recipes, pipelines, models, algorithms and optimizers",
              "List what can be named: recipes (preprocess), pipelines (train, eval), models (model.name), "
              "algorithms (algorithm.name) and optimizers (client.optimizer, server.optimizer), each with a "
              "one-line description. --algorithm NAME prints one algorithm's options (algorithm.options.KEY) "
              "with their type, default and doc.",
              "  fedstream list\n  fedstream list models algorithms\n  fedstream list --algorithm dp_fedavg")
    ls.add_argument("sections", nargs="*", metavar="SECTION",
                    help="any of recipes, pipelines, models, algorithms, optimizers (default: all)")
    ls.add_argument("--algorithm", metavar="NAME",
                    help="print the options of this algorithm (a registered name, module:attribute or "
                         "path/to/file.py:attribute)")
    return parser
# --- end of the parser ---------------------------------------------------------------------------------------------


def _is_tensorstore_error(e: BaseException | None) -> bool:
    """A TensorStore I/O error: a ValueError whose text starts with a status code ("OUT_OF_RANGE: ...")."""
    import re

    return isinstance(e, ValueError) and re.match(r"[A-Z][A-Z_]+: ", str(e)) is not None


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """TensorStore, in its own thread, handing a result to an asyncio loop that Orbax already closed."""
    import threading
    import traceback

    e = unraisable.exc_value
    return (isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and unraisable.object is None
            and threading.current_thread() is not threading.main_thread()
            and any(f.name == "call_soon_threadsafe" for f in traceback.extract_tb(unraisable.exc_traceback)))


def _quiet_checkpoint_thread_errors() -> None:
    """Drops the other reports of a failed asynchronous checkpoint save; the main thread re-raises the
    error as one `CheckpointWriteError` line ("fedstream: error: could not write a checkpoint ...").

    They are: Orbax's logs of the traceback and of the failure from its writer threads; asyncio's "Future/Task exception was
    never retrieved" for the save's other TensorStore writes that failed too; and "Event loop is closed"
    tracebacks that TensorStore reports (through `sys.unraisablehook`, from its own threads) when those
    writes finish after Orbax closed the save's event loop.
    """
    import logging

    import absl.logging  # noqa: F401 - creates the 'absl' logger (its caller lookup skips absl's frames) first

    def keep(record: logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname.replace(os.sep, "/"):
            return True
        # A background save that failed: its traceback, and the one-line reports of its threads and commit.
        failed_save = record.levelno >= logging.ERROR and any(
            text in record.getMessage() for text in ("raised an exception", "Failed to run"))
        return not (record.exc_info or failed_save)

    def keep_asyncio(record: logging.LogRecord) -> bool:
        message = str(record.msg)
        never_retrieved = message.startswith(("Future exception was never retrieved",
                                              "Task exception was never retrieved"))
        return not (never_retrieved and record.exc_info and _is_tensorstore_error(record.exc_info[1]))

    if not any(getattr(f, "fedstream_quiet", False) for f in logging.getLogger("asyncio").filters):
        keep.fedstream_quiet = keep_asyncio.fedstream_quiet = True  # type: ignore[attr-defined]
        for name in ("absl", ""):
            logging.getLogger(name).addFilter(keep)
        logging.getLogger("asyncio").addFilter(keep_asyncio)
    if getattr(sys.unraisablehook, "fedstream_quiet", False):  # an earlier main() in this process
        return
    previous = sys.unraisablehook

    def unraisablehook(unraisable: Any) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    unraisablehook.fedstream_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = unraisablehook


def run_config(pipeline: str | None, workdir: str | None, overrides: Sequence[str]) -> tuple[Any, int | None]:
    """The validated config a train (or config) command runs, and the rounds its workdir has done (None: new run).

    A workdir that holds a run gives its stored config plus `overrides`
    (`evaluate_cmd.resume_config`; the pipeline, if given, must agree with it);
    otherwise the pipeline's config plus `overrides`. Reads no data and starts
    no JAX backend, so it runs before a multi-process run is joined.
    """
    from fedstream.config import ConfigError, load_config, validate_train_config
    from fedstream.training.evaluate_cmd import read_run_config, resume_config

    stored = read_run_config(workdir) if workdir else None
    if pipeline is None and stored is None:
        raise ConfigError(f"{workdir} holds no run to resume (no readable checkpoint); give a PIPELINE to start one"
                          if workdir else "give a PIPELINE, or --workdir of an existing run")
    config = load_config(pipeline, "fedstream.pipelines", overrides) if pipeline else None
    if stored is not None:
        config = resume_config(stored[1], config, overrides, workdir)
    validate_train_config(config)
    return config, (stored[0] if stored else None)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types `main` reports as their message alone (no traceback file).

    Bad input (config, dataset, recipe arguments, a user's pipeline file), the
    filesystem refusing (OSError: a read-only or full disk, a file where a
    directory belongs or the reverse), a busy workdir, a missing extra, a
    diverged run, a corrupted checkpoint or a failed save.
    """
    from fedstream.config import ConfigError
    from fedstream.data.format import DatasetFormatError
    from fedstream.data.writer import DatasetWriteError
    from fedstream.training.checkpoint import CheckpointCorrupted, CheckpointWriteError
    from fedstream.training.lock import WorkdirLockedError
    from fedstream.training.plot import MissingExtraError
    from fedstream.training.train import TrainingDiverged

    return (ConfigError, DatasetFormatError, OSError, ValueError, WorkdirLockedError, MissingExtraError,
            TrainingDiverged, CheckpointCorrupted, CheckpointWriteError, DatasetWriteError)


def one_line(text: str, limit: int = 600) -> str:
    """`text` as one line: its first non-empty line, cut to `limit` characters, "[...]" marking what was left out."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > limit:
        return first[:limit] + " [...]"
    return first + (" [...]" if len(lines) > 1 else "")


def write_traceback(error: BaseException, workdir: str | os.PathLike | None, command: str = "") -> pathlib.Path | None:
    """Writes `error`'s full traceback to `WORKDIR/errors/traceback-<UTC time>.txt` (an existing workdir
    directory), else to `fedstream-traceback-<UTC time>-<pid>.txt` in the system temp dir; returns the file,
    or None if neither could be written.

    The file is created anew: never through a symlink, never over an existing file.
    """
    import datetime
    import tempfile
    import traceback

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    text = f"fedstream {command} failed at {stamp} (UTC)\n\n{text}"
    places = []
    if workdir is not None and os.path.isdir(workdir) and not os.path.islink(workdir):
        places.append((pathlib.Path(workdir) / "errors", f"traceback-{stamp}.txt"))
    places.append((pathlib.Path(tempfile.gettempdir()), f"fedstream-traceback-{stamp}-{os.getpid()}.txt"))
    for directory, name in places:
        try:
            directory.mkdir(exist_ok=True)
            if directory.is_symlink():
                continue
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def report_error(error: BaseException, args: argparse.Namespace) -> int:
    """The CLI's one line for `error` on stderr (exit status 2), or its full traceback with --traceback.

    Expected errors (`_expected_errors`) print their message; any other
    exception prints its type and message plus the path of a file holding
    its full traceback (`write_traceback`).
    """
    if getattr(args, "traceback", False):
        import traceback

        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        return 2
    if isinstance(error, _expected_errors()):
        line = one_line(str(error)) or type(error).__name__
        more = " (rerun with --traceback for the rest)" if line.endswith(" [...]") else ""
        print(f"fedstream: error: {line}{more}", file=sys.stderr)
        return 2
    workdir = getattr(args, "workdir", None) if args.command == "train" else None
    path = write_traceback(error, workdir, args.command)
    message = one_line(str(error))
    where = (f"full traceback in {path}" if path is not None else "no traceback file could be written")
    print(f"fedstream: error: {type(error).__name__}{': ' + message if message else ''} ({where}; "
          "rerun with --traceback to print it)", file=sys.stderr)
    return 2


@contextlib.contextmanager
def stop_between_rounds(enabled: bool = True) -> Iterator[Any]:
    """A `Callback` that turns Ctrl-C during the rounds into a stop at the end of the current round.

    Once rounds have started, the first SIGINT only asks to stop: the round
    finishes, its checkpoint is written, and KeyboardInterrupt is raised from
    the round's end (`main` then prints where to resume). Interrupting a round's
    compiled computation from the signal handler itself could leave the
    process to crash on exit. A second Ctrl-C stops at once; so does one before
    the first round starts. Disabled (the default handler stays) in a
    multi-process run, whose processes must stop at the same round, and
    outside the main thread, where no signal handler can be installed.
    """
    import signal
    import threading

    from fedstream.training.simulation import Callback

    class StopBetweenRounds(Callback):
        def __init__(self) -> None:
            self.in_rounds = self.requested = False

        def handle(self, signum: int, frame: Any) -> None:
            if self.requested or not self.in_rounds:
                raise KeyboardInterrupt
            self.requested = True
            print("fedstream: Ctrl-C: stopping once this round and its checkpoint are done (Ctrl-C again to stop "
                  "now)", flush=True)

        def on_round_start(self, round_index: int) -> None:
            self.in_rounds = True

        def on_round_end(self, round_index: int, metrics: Any, saved: bool, checkpointer: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt

    stopper = StopBetweenRounds()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stopper
        return
    previous = signal.signal(signal.SIGINT, stopper.handle)
    try:
        yield stopper
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted_line(args: argparse.Namespace) -> str:
    """What a Ctrl-C'd command says: for `train`, the round its latest checkpoint holds and how to resume."""
    if args.command != "train":
        return f"fedstream: {args.command} interrupted"
    try:
        from fedstream.training.evaluate_cmd import read_run_config

        stored = read_run_config(args.workdir)
    except Exception:  # noqa: BLE001 - the line must come out whatever the workdir holds
        stored = None
    if stored is None:
        return ("fedstream: interrupted before the first checkpoint was saved; rerun the same command to start "
                "the run again")
    done = int(stored[0])
    return f"fedstream: interrupted after round {done}; rerun the same command to resume from round {done}"


def _own_source_dirs() -> tuple[str, ...]:
    """Directories whose code's warnings are fedstream's own: the package, its recipes and pipelines."""
    import importlib.util

    dirs = []
    for name in ("fedstream", "fedstream.recipes", "fedstream.pipelines"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.join(os.path.realpath(location), ""))
    return tuple(dirs)


@contextlib.contextmanager
def fedstream_warnings(stream: Any = None) -> Iterator[None]:
    """While the command runs, fedstream's own warnings print as one line, `fedstream: warning: <message>`,
    each distinct message once; other libraries' warnings keep Python's format.

    "Own" is by the file the warning is attributed to (`warnings.warn`'s stacklevel): code in the
    fedstream package, its recipes or its pipelines. The previous `warnings.showwarning` is restored
    on exit, so the Python API (and test runners' capture) sees ordinary warnings.
    """
    import warnings

    own = _own_source_dirs()
    previous = warnings.showwarning
    seen: set[str] = set()

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if not own or not os.path.realpath(filename).startswith(own):
            previous(message, category, filename, lineno, file, line)
            return
        text = f"fedstream: warning: {message}"
        if text in seen:
            return
        seen.add(text)
        print(text, file=file or stream or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedstream` console script.

    Every failure ends as one line on stderr and exit status 2; Ctrl-C as one
    line and 130 (`train` names the round to resume from). `--traceback`
    prints the full traceback instead; with FEDSTREAM_DEBUG set the exception
    propagates. Errors are caught here only: the Python API raises them.
    """
    debug = bool(os.environ.get("FEDSTREAM_DEBUG"))
    if not debug:
        _quiet_checkpoint_thread_errors()
    args_list, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not overrides and all(a == "--traceback" for a in args_list):
        # A bare `fedstream`: the whole help rather than argparse's one-line usage error; still a usage
        # error (no COMMAND), so on stderr with argparse's status 2.
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(args_list)
    if overrides and args.command in ("inspect", "plot", "list"):
        raise SystemExit(f"fedstream {args.command} takes no --config overrides")
    try:
        with fedstream_warnings():
            return run_command(args, overrides)
    except KeyboardInterrupt:
        if debug:
            raise
        print(interrupted_line(args), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's edge: one line whatever it was
        if debug:
            raise
        return report_error(e, args)


def run_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """Runs the parsed command; raises whatever fails (`main` turns it into one line)."""
    from fedstream.config import ConfigError

    if args.command == "preprocess":
        from fedstream.data.preprocessing import run_preprocess

        if args.source:
            overrides.append(f"source={args.source}")
        if args.runner:
            from fedstream.data.beam import run_preprocess_beam

            run_preprocess_beam(args.recipe, args.output, overrides, runner=args.runner,
                                beam_options=args.beam_option, force=args.force, compression=args.compression)
        elif args.beam_option:
            raise ConfigError("--beam-option needs --runner (e.g. --runner DirectRunner)")
        else:
            run_preprocess(args.recipe, args.output, overrides, force=args.force, compression=args.compression)
    elif args.command == "train":
        if os.path.lexists(args.workdir) and not os.path.isdir(args.workdir):
            raise ConfigError(f"--workdir {args.workdir} exists and is not a directory")
        config, done = run_config(args.pipeline, args.workdir, overrides)
        if done is not None and done >= int(config.num_rounds):
            print(f"fedstream: the run in {args.workdir} is finished: {done} rounds done (num_rounds "
                  f"{config.num_rounds}); to train further, add --config.num_rounds=N with N > {done}")
            return 0
        from fedstream.training.train import train

        init_distributed(args)
        distributed = args.distributed or args.num_processes is not None
        with stop_between_rounds(enabled=not distributed) as stopper:
            train(config, args.workdir, resume_last_good=args.resume_last_good, validated=True, debug=args.debug,
                  callbacks=(stopper,))
    elif args.command == "eval":
        import json

        from fedstream.config import load_config
        from fedstream.training.evaluate_cmd import evaluate_checkpoint, format_result

        config = load_config(args.pipeline, "fedstream.pipelines", overrides) if args.pipeline else None
        quiet = (lambda _: None) if args.json else print
        result = evaluate_checkpoint(config, args.workdir, split=args.split, step=args.step, log=quiet,
                                     overrides=overrides if config is None else ())
        print(json.dumps(result, sort_keys=True) if args.json else format_result(result, args.workdir))
    elif args.command == "config":
        import json

        config, _ = run_config(args.pipeline, args.workdir, overrides)
        print(json.dumps(config.to_dict(), indent=2, default=list) if args.json else str(config).rstrip())
    elif args.command == "plot":
        from fedstream.training.plot import plot_data, plot_runs

        if args.data is not None:
            if args.workdirs or args.metric or args.x != "round":
                raise ConfigError("fedstream plot --data DIR plots a dataset; give no WORKDIR, --metric or --x "
                                  "with it")
            written, notes = plot_data(args.data, args.output, split=args.split, label_key=args.label_key,
                                       **({} if args.max_clients is None else {"max_clients": args.max_clients}))
            for note in notes:
                print(f"fedstream: {note}")
            print(f"wrote {written}")
        else:
            if args.split is not None or args.label_key is not None or args.max_clients is not None:
                raise ConfigError("--split, --max-clients and --label-key go with --data DIR")
            print(f"wrote {plot_runs(args.workdirs, args.output, metrics=args.metric, x=args.x)}")
    elif args.command == "list":
        from fedstream.catalog import SECTIONS, algorithm_options_text, catalog

        unknown = [s for s in args.sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
        if args.algorithm:
            if args.sections:
                print(catalog(tuple(args.sections)) + "\n")
            print(algorithm_options_text(args.algorithm))
        else:
            print(catalog(tuple(args.sections) or SECTIONS))
    else:
        from fedstream.data.inspect import describe_dataset
        from fedstream.data.reader import FederatedDataset

        if args.label_sample is not None and args.label_sample < 1:
            raise ConfigError(f"--label-sample must be >= 1, got {args.label_sample}")
        labels = True if args.labels is None and args.label_sample is not None else args.labels
        if args.verify:  # first: the summary reads records, and a damaged shard is best named by its sha256
            FederatedDataset(args.path).verify()
        print(describe_dataset(args.path, labels=labels, label_key=args.label_key, label_sample=args.label_sample,
                               digest=args.digest))
        if args.verify:
            print("verify: all shard checksums match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
