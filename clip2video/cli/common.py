"""The command-line layer shared by every entry point (train, infer_retrieval, sample_frame, search).

One place decides how a tool parses its flags (one-line errors, YAML defaults), which model flags exist and
what they may be (their choices come from the library's own constants), which named paths must exist, and
how an exception becomes an exit code and one line on stderr. The library below (``modules``,
``dataloaders``) never sees argparse.

Exit codes: 0 success, 1 bad data or weights (the line names the file), 2 bad flags, 3 training diverged,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from clip2video.modules.weights.spec import ModelSpec

logger = logging.getLogger("clip2video")

# The original's raw model flags; ``--variant`` names a Table-1 row instead.
MODEL_FLAGS = ("sim_type", "temporal_type", "temporal_proj", "center_type", "center_proj")
# Every flag that describes the model; giving any of them overrides a checkpoint's stored config.
MODEL_OVERRIDE_FLAGS = ("variant", *MODEL_FLAGS, "centerK", "center_weight", "cross_num_hidden_layers")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = PACKAGE_DIR / "configs"  # shipped configs (installed package)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line raised as ``UsageError``, not usage text + ``sys.exit``."""

    def error(self, message: str):
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------- config files
def resolve_config(path: str) -> Path:
    """A config path as given, else the same name among the shipped configs (``configs/train/x.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == "configs" else p
    for cand in (CONFIG_DIR / rel, PACKAGE_DIR.parent / "configs" / rel):  # installed, then the checkout's
        if cand.is_file():
            return cand
    raise UsageError(f"--config {path}: no such file")


def load_config(path: str | Path) -> dict[str, Any]:
    """The flag defaults of one config file with its ``base:`` chain applied.

    ``base: other.yaml`` (a path relative to the file that names it) makes ``other.yaml`` the starting point:
    the chain is followed to any depth, each file's keys overriding those of the files below it (a key set in
    a file replaces the base's value as a whole, mappings included). A chain that comes back to a file it
    already read, a base that does not exist and a file that is not a YAML mapping each end in one line
    naming the config given.
    """
    first = resolve_config(str(path))
    layers: list[dict[str, Any]] = []
    chain: list[Path] = []
    current = first
    while True:
        if current.resolve() in [c.resolve() for c in chain]:
            names = " → ".join(c.name for c in [*chain, current])
            raise UsageError(f"--config {path}: base chain loops: {names}")
        chain.append(current)
        where = "" if current == first else f" (base {current.name})"
        try:
            data = yaml.safe_load(current.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path}{where}: not valid YAML ({str(e).splitlines()[0]})") from None
        except OSError as e:
            raise UsageError(f"--config {path}{where}: cannot read {current} ({e.strerror or e})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {path}{where}: expected a mapping of flag: value")
        base = data.pop("base", None)
        layers.append(data)
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise UsageError(f"--config {path}{where}: base must be a file name, got {base!r}")
        parent = current.parent / base
        if not parent.is_file():
            raise UsageError(f"--config {path}: base {base!r} of {current.name} not found next to it")
        current = parent
    merged: dict[str, Any] = {}
    for layer in reversed(layers):  # the deepest base first, the file given last
        merged.update(layer)
    return merged


def parse_with_config(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``--config file.yaml`` supplies defaults; flags on the command line override them (timm style).

    The namespace also gets ``given_flags``: the flags set on the command line or by the config file, so
    that tools can tell "left at its default" from "asked for" (see :func:`model_flags_given`).
    A config may also carry ``annotations:``, the protocol's annotation files by name; with ``--data_root``
    they fill the annotation flags not given otherwise (:func:`apply_annotations`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    from_config: set[str] = set()
    annotations: dict[str, str] = {}
    valid = {a.dest for a in p._actions}
    if known.config:
        data = load_config(known.config)
        if "annotations" in data and "data_root" in valid:
            annotations = _check_annotations(known.config, data.pop("annotations"), valid)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise UsageError(f"--config {known.config}: unknown keys {', '.join(unknown)}")
        p.set_defaults(**data)
        from_config = set(data)
    args = p.parse_args(argv)
    if "data_root" in valid:
        from_config |= apply_annotations(args, annotations)
    args.given_flags = sorted(from_config | _flags_on_command_line(p, argv))
    return args


def _check_annotations(config: str, value: Any, valid: set[str]) -> dict[str, str]:
    """A config's ``annotations:`` mapping, checked: annotation flags of this tool → file names."""
    allowed = [f for f in ANNOTATION_FLAGS if f in valid]
    if not isinstance(value, dict):
        raise UsageError(f"--config {config}: annotations must be a mapping of flag: file name "
                         f"({', '.join(allowed)})")
    for flag, name in value.items():
        if flag not in allowed:
            raise UsageError(f"--config {config}: annotations: unknown flag {flag!r} (expected one of "
                             f"{', '.join(allowed)})")
        if not isinstance(name, str) or not name:
            raise UsageError(f"--config {config}: annotations: {flag} must be a file name, got {name!r}")
    return dict(value)


def apply_annotations(args: argparse.Namespace, annotations: Mapping[str, str]) -> set[str]:
    """``--data_root DIR``: each annotation flag the config names (``annotations: {val_csv: x.csv}``) and no
    flag sets becomes ``DIR/x.csv``; returns the flags so filled.

    This is how a protocol's file names live in its config while the shell scripts only pass the folder. A
    flag given on the command line (or directly in the config) wins; without ``--data_root`` the names are
    not used, so every annotation flag means what it always meant.
    """
    root = getattr(args, "data_root", None)
    if not root:
        return set()
    if not Path(root).is_dir():
        raise UsageError(f"--data_root {root}: " + ("not a folder" if Path(root).exists() else "no such folder"))
    if not annotations:
        raise UsageError(f"--data_root {root}: needs a --config that names the annotation files (annotations:)")
    filled = set()
    for flag, name in annotations.items():
        if getattr(args, flag, None) is None:
            setattr(args, flag, str(Path(root) / name))
            filled.add(flag)
    return filled


def _flags_on_command_line(p: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Dests of the options that appear in ``argv`` (``--flag`` or ``--flag=value``)."""
    by_option = {opt: a.dest for a in p._actions for opt in a.option_strings}
    given = set()
    for tok in argv:
        if tok.startswith("-"):
            name = tok.split("=", 1)[0]
            if name in by_option:
                given.add(by_option[name])
    return given


# ----------------------------------------------------------------------------------------------- data flags
ANNOTATION_FLAGS = ("train_csv", "val_csv", "data_path")  # the flags a config's ``annotations:`` may fill


def _data_flags() -> dict[str, dict[str, Any]]:
    """Every data flag a command may take: its one type and default, and the help it has unless a command
    words it for its own context (:func:`add_data_args`)."""
    from clip2video.dataloaders.video_io import DEFAULT_VIDEO_FPS

    return {
        "datatype": {},  # choices from the library: add_datatype_arg
        "val_datatype": {"help": "datatype of the validation set (default: --datatype)"},
        "data_root": {"default": None, "metavar": "DIR",
                      "help": "folder of the annotation files that --config names (annotations:); fills "
                              "--train_csv/--val_csv/--data_path not given otherwise"},
        "train_csv": {"default": None, "help": "MSR-VTT training video list (MSRVTT_train.9k.csv, ...)"},
        "val_csv": {"default": None, "help": "MSR-VTT test csv (JSFUSION 1k-A or *.full.csv)"},
        "data_path": {"default": None, "help": "MSRVTT_data.json, or the MSVD/VATEX annotation folder"},
        "features_path": {"default": None, "help": "folder of frame folders <video_id>/00000001.jpg"},
        "video_fps": {"type": float, "default": DEFAULT_VIDEO_FPS,
                      "help": "video files in --features_path (<video_id>.mp4 ...) are read directly, as if "
                              f"extracted at this rate (sample_frame.py --fps; default {DEFAULT_VIDEO_FPS:g})"},
        "split": {"default": "test", "help": "split list for MSVD/VATEX/generic (test, val, test1k5_sec)"},
        "train_split": {"default": "train", "help": "split list / split column value for training"},
        "val_split": {"default": None, "help": "validation split for MSVD/VATEX/generic (e.g. val); none and no "
                                               "--val_csv: no validation"},
        "max_words": {"type": int, "default": 32},
        "max_frames": {"type": int, "default": 12},
        "feature_framerate": {"type": int, "default": 1},
        "image_mode": {},  # choices from the library: add_image_mode_arg
        "batch_size_val": {"type": int, "default": 16},
        "num_thread_reader": {"type": int, "default": 2},
        "skip_missing": {"action": "store_true", "help": "drop listed videos without frames (logged)"},
    }


def add_data_args(g: argparse.ArgumentParser | argparse._ArgumentGroup, names: Sequence[str],
                  helps: Mapping[str, str | None] | None = None) -> None:
    """Add the data flags ``names`` (in that order) to ``g``.

    Each flag's type and default are declared once, in :func:`_data_flags`, so the commands that read the
    same data (training, evaluation, index building) cannot drift apart; ``helps`` rewords a flag's help for
    one command (the validation csv of training is not the test csv of evaluation).
    """
    table = _data_flags()
    helps = dict(helps or {})
    unknown = sorted((set(names) | set(helps)) - set(table))
    if unknown:
        raise ValueError(f"add_data_args: no data flag {', '.join(unknown)}")
    for name in names:
        spec = dict(table[name])
        if name in helps:
            spec["help"] = helps[name]
        if name in ("datatype", "val_datatype"):
            add_datatype_arg(g, f"--{name}", default="msrvtt" if name == "datatype" else None,
                             help=spec.get("help"))
        elif name == "image_mode":
            add_image_mode_arg(g)
        else:
            g.add_argument(f"--{name}", **spec)


# ----------------------------------------------------------------------------------------------- model flags
def add_model_args(p: argparse.ArgumentParser) -> None:
    """The original's model flags plus ``--variant`` and ``--mask_layout``, choices from the library."""
    from clip2video.modules.network.model import FLAG_CHOICES, VARIANTS
    from clip2video.modules.network.temporal import MASK_LAYOUTS

    g = p.add_argument_group("model")
    g.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="Table-1 row by name; overrides the raw flags below")
    g.add_argument("--sim_type", default="meanP", choices=FLAG_CHOICES["sim_type"])
    for name in MODEL_FLAGS[1:]:
        g.add_argument(f"--{name}", default="", choices=FLAG_CHOICES[name])
    g.add_argument("--centerK", type=int, default=5)
    g.add_argument("--center_weight", type=float, default=0.5)
    g.add_argument("--cross_num_hidden_layers", type=int, default=4)
    g.add_argument("--mask_layout", default=None, choices=list(MASK_LAYOUTS),
                   help="attention-mask layout of the temporal heads (default: original for released "
                        "checkpoints, what the checkpoint says for ours)")
    g.add_argument("--clip_path", default=None, help="CLIP weights: OpenAI's ViT-*.pt, an OpenAI-layout state dict, "
                   "open_clip's open_clip_pytorch_model.bin / .safetensors or an open_clip training checkpoint; "
                   "or OpenAI's name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px, or ViT-B-32, ...): downloaded "
                   "once into $CLIP2VIDEO_CACHE (default ~/.cache/clip) and checked against its published SHA-256")
    g.add_argument("--clip_model", default=None, metavar="NAME[:TAG]",
                   help="open_clip architecture of --clip_path (ViT-B-16, ViT-L-14-336, ViT-B-32-quickgelu, ...; "
                        ":TAG picks a pretrained tag's normalisation); needed when the file cannot tell its "
                        "activation (an open_clip file without open_clip_config.json). Without --clip_path, "
                        "NAME:TAG fetches open_clip's weights of that tag (Hugging Face hub and cache)")
    g.add_argument("--offline", action="store_true",
                   help="never download weights: a named --clip_path / --clip_model NAME:TAG must be in the cache")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Where the model comes from (a checkpoint, or CLIP weights with ``--zero_shot``) plus the model flags:
    the same set for evaluation, index building, queries and the server."""
    c = p.add_argument_group("checkpoint")
    c.add_argument("--checkpoint", default=None, help="folder of pytorch_model.bin.N, or a weight file")
    c.add_argument("--model_num", default=None, help="N of pytorch_model.bin.N")
    c.add_argument("--init_model", default=None, help="alias of --checkpoint with a file path")
    c.add_argument("--zero_shot", action="store_true",
                   help="no checkpoint: CLIP weights from --clip_path, heads initialised from CLIP")
    add_model_args(p)


def add_precision_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    from clip2video.modules.runtime.precision import PRECISIONS

    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))


def add_image_mode_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    from clip2video.dataloaders.frames import MODES

    p.add_argument("--image_mode", default="exact", choices=list(MODES),
                   help="frame preprocessing: exact = the original's PIL pixels; fast = quicker, not bit-exact")


def add_datatype_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str = "--datatype",
                     default: str | None = "msrvtt", help: str | None = None) -> None:
    from clip2video.dataloaders.annotations import DATATYPE_ALIASES, DATATYPES

    p.add_argument(flag, default=default, choices=[*DATATYPES, *DATATYPE_ALIASES],
                   metavar="{" + ",".join(DATATYPES) + "}", help=help)


def model_fields(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(variant, config fields) from parsed flags."""
    from clip2video.modules.network.model import VARIANTS, variant_of_flags

    if args.variant:
        name, fields = args.variant, dict(VARIANTS[args.variant])
    else:
        fields = {k: getattr(args, k) for k in MODEL_FLAGS}
        name = variant_of_flags(**fields)
    fields.update(center_k=args.centerK, center_weight=args.center_weight, cross_layers=args.cross_num_hidden_layers)
    return name, fields


def model_flags_given(args: argparse.Namespace) -> bool:
    """Whether the user described the model (then the flags win over a checkpoint's stored config).

    The same rule for every tool: a model flag set on the command line or in ``--config`` counts; a tool's
    own default does not.
    """
    return any(f in getattr(args, "given_flags", ()) for f in MODEL_OVERRIDE_FLAGS)


# Flags that say which model to use: given with an index, they must describe the index's model.
MODEL_SOURCE_FLAGS = ("checkpoint", "init_model", "model_num", "zero_shot", "clip_path", "clip_model", "mask_layout",
                      *MODEL_OVERRIDE_FLAGS)


def model_spec(args: argparse.Namespace, *, if_given: bool = False) -> ModelSpec | None:
    """The ``ModelSpec`` the parsed flags describe (the one way every tool turns flags into a model).

    With ``if_given``, None when no model flag was set on the command line or in ``--config`` (a query
    then uses the model its index records). A spec that names no weights is a usage error.
    """
    from clip2video.modules.weights.spec import ModelSpec

    if if_given and not set(getattr(args, "given_flags", ())) & set(MODEL_SOURCE_FLAGS):
        return None
    variant, fields = model_fields(args)
    ckpt = args.checkpoint or args.init_model
    if ckpt is None and args.zero_shot:
        if not args.clip_path and ":" not in (args.clip_model or ""):
            raise UsageError("--zero_shot needs --clip_path (a file, or a name such as ViT-B/32) or --clip_model "
                             "NAME:TAG")
        resolve_clip_flags(args)  # a name → the cached file (fetched unless --offline): the spec names a file
    spec = ModelSpec(
        checkpoint=args.checkpoint or args.init_model, model_num=args.model_num, zero_shot=bool(args.zero_shot),
        clip_path=args.clip_path, clip_model=args.clip_model, variant=variant,
        **{k: fields[k] for k in MODEL_FLAGS}, center_k=fields["center_k"], center_weight=fields["center_weight"],
        cross_layers=fields["cross_layers"], mask_layout=args.mask_layout, prefer_stored=not model_flags_given(args),
        max_words=int(getattr(args, "max_words", None) or 32), seed=getattr(args, "seed", None))
    try:
        spec.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return spec


# ----------------------------------------------------------------------------------------------- paths
PATH_FLAGS_FILES = ("clip_path", "val_csv", "train_csv")
PATH_FLAGS_ANY = ("checkpoint", "init_model", "data_path")
PATH_FLAGS_DIRS = ("features_path", "data_root")


def check_paths(args: argparse.Namespace, files: Iterable[str] = PATH_FLAGS_FILES,
                any_kind: Iterable[str] = PATH_FLAGS_ANY, dirs: Iterable[str] = PATH_FLAGS_DIRS) -> None:
    """Every named path that was given must exist: one line naming the flag and the path otherwise."""
    from clip2video.modules.weights.hub import known_names, openai_release

    for kind, names in (("file", files), ("file or folder", any_kind), ("folder", dirs)):
        for name in names:
            value = getattr(args, name, None)
            if not value:
                continue
            path = Path(value)
            ok = path.is_file() if kind == "file" else path.is_dir() if kind == "folder" else path.exists()
            if not ok and name == "clip_path" and openai_release(str(value)):
                continue  # a name: fetched when the model is built (resolve_clip_flags)
            if not ok:
                what = "not a file" if kind == "file" and path.exists() else (
                    "not a folder" if kind == "folder" and path.exists() else f"no such {kind}")
                if name == "clip_path" and not path.exists() and not path.suffix:  # meant as a name?
                    what += f", nor a CLIP name ({known_names()}; open_clip's: --clip_model NAME:TAG)"
                raise UsageError(f"--{name} {value}: {what}")


def resolve_clip_flags(args: argparse.Namespace) -> str:
    """The local CLIP file that ``--clip_path`` / ``--clip_model NAME:TAG`` designate, fetched first when they
    name weights (``--offline``: only from the cache); stored back in ``args.clip_path``, so that everything
    after (the model, an index's record of it) sees a file."""
    from clip2video.modules.weights.hub import resolve_clip_weights

    path = resolve_clip_weights(getattr(args, "clip_path", None), getattr(args, "clip_model", None),
                                offline=bool(getattr(args, "offline", False)))
    args.clip_path = str(path)
    return args.clip_path


def output_paths(output_dir: str | None) -> tuple[Path | None, Path | None]:
    """(folder for outputs, log file). The original's scripts pass a log-file path as --output_dir."""
    if not output_dir:
        return None, None
    p = Path(output_dir)
    if p.suffix in (".log", ".txt") or p.is_file():
        return p.parent, p
    return p, p / "log.txt"


# ----------------------------------------------------------------------------------------------- errors
_WORKER_RE = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")


def one_line(exc: BaseException) -> str:
    """The message a user needs, on one line.

    A DataLoader worker's exception arrives re-raised in the main process with its message replaced by
    "Caught X in DataLoader worker process N." plus the worker's traceback; the original message (which
    names the video and the file) is the last unindented ``Type: message`` line of that traceback.
    """
    text = str(exc)
    if _WORKER_RE.match(text):
        lines = text.rstrip().splitlines()
        for i in range(len(lines) - 1, 0, -1):
            m = _EXC_LINE.match(lines[i])
            if m and not lines[i].startswith(" "):
                return m.group(2).strip() or m.group(1)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first or type(exc).__name__


def exit_process(code: int) -> None:
    """End a finished command-line run with ``code`` without the interpreter's finalisation.

    After a run has written and closed its outputs, Python still spends about a second tearing down torch's
    thousands of modules and objects one by one (measured in ``benchmarks/README.md``): nothing a user needs.
    So the exit handlers run (log files flushed and closed, ``atexit`` work of libraries), the standard streams
    are flushed, and the process ends with ``os._exit``. Where another non-daemon thread is still alive the
    ordinary ``sys.exit`` is used, so no thread's work is cut short.
    """
    import atexit
    import os
    import threading

    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter would run first; includes logging.shutdown
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def run_main(prog: str, fn: Callable[[], int], codes: Sequence[tuple[type[BaseException], int]] = ()) -> int:
    """Run an entry point's body and map its exceptions to (exit code, one line on stderr).

    ``codes`` adds tool-specific exceptions (checked first). Errors of input data and weights are
    ``ValueError`` / ``OSError`` / ``RuntimeError`` subclasses throughout the library and exit with 1; a
    genuine bug (any other exception) keeps its traceback.
    """
    table = [*codes, (UsageError, 2), (ValueError, 1), (OSError, 1), (RuntimeError, 1)]
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - mapped below, re-raised when unknown
        for cls, code in table:
            if isinstance(e, cls):
                logger.debug("traceback", exc_info=True)
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                return code
        raise
