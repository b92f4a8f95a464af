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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

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


def parse_with_config(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``--config file.yaml`` supplies defaults; flags on the command line override them (timm style).

    The namespace also gets ``given_flags``: the flags set on the command line or by the config file, so
    that tools can tell "left at its default" from "asked for" (see :func:`model_flags_given`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    from_config: set[str] = set()
    if known.config:
        path = resolve_config(known.config)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {path}: expected a mapping of flag: value")
        base = data.pop("base", None)  # one config may extend another: ``base: msrvtt_9k.yaml``
        if base is not None:
            parent = path.parent / base
            if not parent.is_file():
                raise UsageError(f"--config {path}: base {base!r} not found next to it")
            inherited = yaml.safe_load(parent.read_text()) or {}
            inherited.pop("base", None)
            data = {**inherited, **data}
        valid = {a.dest for a in p._actions}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise UsageError(f"--config {path}: unknown keys {', '.join(unknown)}")
        p.set_defaults(**data)
        from_config = set(data)
    args = p.parse_args(argv)
    args.given_flags = sorted(from_config | _flags_on_command_line(p, argv))
    return args


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


# ----------------------------------------------------------------------------------------------- paths
PATH_FLAGS_FILES = ("clip_path", "val_csv", "train_csv")
PATH_FLAGS_ANY = ("checkpoint", "init_model", "data_path")
PATH_FLAGS_DIRS = ("features_path",)


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
