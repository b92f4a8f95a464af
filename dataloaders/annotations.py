"""Annotation parsers: one per dataset format, all producing the same two small structures.

* :class:`RetrievalSet` — an evaluation set: caption rows × video columns, in exactly the order the original
  CLIP2Video evaluation used (docs/original-behaviours.md, "Evaluation protocols"), plus the original's
  grouping of videos into evaluation batches (:meth:`RetrievalSet.video_batches`), which matters under the
  ``original`` mask layout.
* :class:`PairSet` — a training set: (video_id, caption) pairs.

One parser per annotation format feeding one generic dataset follows timm's ``create_dataset`` split of
responsibilities. Every problem with an input file is a one-line ``ValueError``/``FileNotFoundError``
naming the file (or the flag) and what is wrong; nothing is silently dropped except where the original
protocol drops (VATEX's "folder with more than 5 frames" rule), and that is logged with a count.

Formats:

* MSR-VTT (``msrvtt``, ``msrvttfull``): ``MSRVTT_data.json`` (``sentences[].video_id/caption``) + csv splits.
  ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``) is the 1k-A single-caption protocol;
  ``MSRVTT_{test,val}.full.csv`` / ``MSRVTT_train.{9k,7k,full}.csv`` list ``video_id`` only and take their
  captions from the json.
* MSVD (``msvd``): a folder with ``raw-captions.pkl`` (video id → list of token lists) and
  ``{train,val,test}_list.txt``.
* VATEX (``vatexEnglish``, alias ``vatex``): a folder with ``vatex_data.json`` (id → ``{"enCap": [...]}``)
  and ``{train,val,test,test1k5_sec}_list.txt``.
* ``generic``: one CSV (header ``video_id,caption[,split]``) or JSONL file (same keys) for one's own data.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .video_io import list_video_files

logger = logging.getLogger(__name__)

DATATYPES = ("msrvtt", "msrvttfull", "msvd", "vatexEnglish", "generic")
DATATYPE_ALIASES = {"vatex": "vatexEnglish"}
MSVD_SPLITS = ("train", "val", "test")
VATEX_SPLITS = ("train", "val", "test", "test1k5_sec")
#: The original VATEX loader keeps only frame folders with MORE than this many files.
VATEX_MIN_FILES_EXCLUSIVE = 5


# ----------------------------------------------------------------------------------------------- structures


@dataclass
class RetrievalSet:
    """An evaluation set: similarity rows are ``captions``, columns are ``video_ids``.

    Attributes:
        name: datatype and split, for logs.
        video_ids: columns, in the original's order.
        captions: rows, in annotation order (each video's captions contiguous for multi-caption sets).
        caption_video: int64 (n_captions,), the column of each caption's video.
        multi_caption: True for the multi-caption protocols (ranks use caption groups for V2T).
    """

    name: str
    video_ids: list[str]
    captions: list[str]
    caption_video: np.ndarray
    multi_caption: bool

    def __post_init__(self) -> None:
        self.caption_video = np.asarray(self.caption_video, dtype=np.int64)
        if len(self.caption_video) != len(self.captions):
            raise ValueError(f"{self.name}: {len(self.captions)} captions but {len(self.caption_video)} video indices")
        if self.multi_caption and len(self.captions) and np.any(np.diff(self.caption_video) < 0):
            raise ValueError(f"{self.name}: a video's captions must be contiguous and in column order")

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def cut_off_points(self) -> list[int]:
        """Row index of each video's last caption (the original's ``cut_off_points`` minus 1)."""
        if not self.multi_caption:
            return list(range(len(self.captions)))
        last = np.full(len(self.video_ids), -1, dtype=np.int64)
        last[self.caption_video] = np.arange(len(self.captions))
        return last.tolist()

    def video_batches(self, batch_size_val: int) -> list[list[int]]:
        """Columns grouped as the original's evaluation batches grouped videos.

        Single caption: chunks of ``batch_size_val`` pairs in csv order. Multi-caption: the original iterated
        captions in chunks of ``batch_size_val`` and encoded, per chunk, the videos whose LAST caption falls in
        it. Under the ``original`` mask layout a video's vector depends on its batch-mates
        (docs/original-behaviours.md, "Mask layout"), so these groups are needed to reproduce the released
        numbers. Chunks without such a video are omitted.
        """
        if batch_size_val < 1:
            raise ValueError(f"batch_size_val must be >= 1, got {batch_size_val}")
        if not self.multi_caption:
            n = len(self.video_ids)
            return [list(range(s, min(s + batch_size_val, n))) for s in range(0, n, batch_size_val)]
        groups: dict[int, list[int]] = {}
        for col, row in enumerate(self.cut_off_points):
            groups.setdefault(row // batch_size_val, []).append(col)
        return [groups[k] for k in sorted(groups)]

    def rows(self) -> list[tuple[str, str]]:
        """(video_id, caption) per row, for inspection and comparison with the original's ``text_rows``."""
        return [(self.video_ids[v], c) for v, c in zip(self.caption_video.tolist(), self.captions, strict=True)]


@dataclass
class PairSet:
    """A training set: one (video_id, caption) pair per sample; ``video_ids`` distinct, first-appearance order."""

    pairs: list[tuple[str, str]]
    video_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.video_ids:
            self.video_ids = list(OrderedDict.fromkeys(v for v, _ in self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)


# ------------------------------------------------------------------------------------------------ file helpers


def normalize_datatype(datatype: str) -> str:
    """Canonical datatype name (``vatex`` → ``vatexEnglish``); ValueError listing the choices otherwise."""
    dt = DATATYPE_ALIASES.get(datatype, datatype)
    if dt not in DATATYPES:
        raise ValueError(f"--datatype {datatype!r} is not one of {', '.join(DATATYPES)} (or 'vatex')")
    return dt


def _need_file(path: str | os.PathLike | None, flag: str, what: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"{flag} is required ({what})")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p}: no such file ({what})")
    return p


def _need_dir(path: str | os.PathLike | None, flag: str, what: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"{flag} is required ({what})")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {p}: no such folder ({what})")
    return p


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a csv file as dicts, after checking the header has the ``required`` columns."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header) or 'empty'})")
        reader.fieldnames = header
        rows = [{k: (v if v is not None else "") for k, v in r.items()} for r in reader]
    for i, r in enumerate(rows):
        for c in required:
            if r.get(c) is None or str(r[c]).strip() == "":
                raise ValueError(f"{path}: row {i + 2} has an empty {c!r}")
    return rows


def _read_list(path: Path) -> list[str]:
    """Video ids of a ``*_list.txt`` file: one per line, stripped, blank lines ignored."""
    with open(path, encoding="utf-8") as f:
        ids = [ln.strip() for ln in f]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"{path}: no video ids")
    return ids


def _load_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _msrvtt_captions(json_path: Path, video_ids: set[str]) -> OrderedDict[str, list[str]]:
    """Captions of the wanted videos from ``MSRVTT_data.json``, videos in order of first appearance."""
    data = _load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise ValueError(f"{json_path}: expected an object with a 'sentences' list (MSRVTT_data.json)")
    caps: OrderedDict[str, list[str]] = OrderedDict()
    for i, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or "video_id" not in s or "caption" not in s:
            raise ValueError(f"{json_path}: sentences[{i}] lacks 'video_id' or 'caption'")
        if s["video_id"] in video_ids:
            caps.setdefault(s["video_id"], []).append(str(s["caption"]))
    return caps


def _check_all_captioned(listed: list[str], caps: dict[str, list[str]], list_file: Path, cap_file: Path) -> None:
    missing = [v for v in listed if not caps.get(v)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{cap_file}: no caption for {len(missing)} video(s) listed in {list_file}: "
                         f"{', '.join(missing[:3])}{more}")


def _msvd_captions(pkl: Path) -> dict[str, list[str]]:
    with open(pkl, "rb") as f:
        raw = pickle.load(f)  # noqa: S301 - the dataset's own annotation file
    if not isinstance(raw, dict):
        raise ValueError(f"{pkl}: expected a dict video_id -> list of token lists, got {type(raw).__name__}")
    out: dict[str, list[str]] = {}
    for vid, caps in raw.items():
        if not isinstance(caps, (list, tuple)) or not all(isinstance(c, (list, tuple)) for c in caps):
            raise ValueError(f"{pkl}: captions of {vid!r} are not a list of token lists")
        out[str(vid)] = [" ".join(str(t) for t in c) for c in caps]
    return out


def _vatex_captions(path: Path) -> dict[str, list[str]]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object video_id -> {{'enCap': [...]}}")
    out: dict[str, list[str]] = {}
    for vid, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("enCap"), list):
            raise ValueError(f"{path}: entry {vid!r} has no 'enCap' list")
        out[vid] = [str(c) for c in entry["enCap"]]
    return out


def _split_file(folder: Path, split: str, splits: tuple[str, ...], flag: str) -> Path:
    if split not in splits:
        raise ValueError(f"split {split!r} is not one of {', '.join(splits)} for {flag} {folder}")
    return _need_file(folder / f"{split}_list.txt", "split list", f"the {split} video ids")


def _frame_dirs(features_path: str | os.PathLike) -> set[str]:
    """Ids with a frame folder or a video file (read directly) under ``features_path``."""
    root = _need_dir(features_path, "--features_path", "folder of frame folders or video files")
    with os.scandir(root) as it:
        dirs = {e.name for e in it if e.is_dir()}
    return dirs | set(list_video_files(root))


def _unusable_files(video_ids: list[str], features_path) -> dict[str, str]:
    """{id: reason} for listed ids read from a video file (no frame folder) that cannot give frames.

    A demux pass per file (no decoding), so ``skip_missing`` drops bad files before a run starts instead of
    stopping it halfway.
    """
    from .frames import check_video_file

    root = Path(features_path)
    files = list_video_files(root)
    bad = {}
    for v in video_ids:
        if v in files and not (root / v).is_dir():
            reason = check_video_file(files[v], framerate=1, max_frames=1)
            if reason is not None:
                bad[v] = reason
    return bad


def _filter_missing(video_ids: list[str], features_path, skip_missing: bool, what: str) -> list[str]:
    """Non-VATEX rule: every listed video needs its frame folder or video file, unless ``skip_missing`` (then
    logged; with it, unreadable video files are dropped and counted too)."""
    if features_path is None:
        return video_ids
    present = _frame_dirs(features_path)
    missing = [v for v in video_ids if v not in present]
    n_listed = len(video_ids)
    if skip_missing:
        bad = _unusable_files([v for v in video_ids if v in present], features_path)
        if bad:
            logger.warning("%s: dropped %d of %d listed videos whose video file is unusable, e.g. %s", what,
                           len(bad), len(video_ids), next(iter(bad.values())))
            video_ids = [v for v in video_ids if v not in bad]
    if missing and not skip_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"--features_path {features_path}: no frame folder for {what} video "
                                f"{missing[0]!r}{more} (nor a video file); pass skip_missing (--skip_missing) to "
                                "drop such videos")
    if missing:
        logger.warning("%s: dropped %d of %d listed videos without a frame folder or video file under %s", what,
                       len(missing), n_listed, features_path)
        gone = set(missing)
        return [v for v in video_ids if v not in gone]
    return video_ids


def _vatex_filter(video_ids: list[str], features_path, what: str) -> list[str]:
    """VATEX rule of the original: keep listed videos whose folder exists and holds > 5 files (logged)."""
    if features_path is None:
        return video_ids
    root = _need_dir(features_path, "--features_path", "folder of frame folders")
    present = _frame_dirs(root)
    kept = []
    for v in video_ids:
        if v in present and not (root / v).is_dir():
            kept.append(v)  # a video file: read directly (its frame count is checked when it is read)
        elif v in present:
            with os.scandir(root / v) as it:
                if sum(1 for _ in it) > VATEX_MIN_FILES_EXCLUSIVE:
                    kept.append(v)
    if len(kept) < len(video_ids):
        logger.warning("%s: dropped %d of %d listed videos whose frame folder is missing or holds <= %d files "
                       "(the original VATEX protocol)", what, len(video_ids) - len(kept), len(video_ids),
                       VATEX_MIN_FILES_EXCLUSIVE)
    if not kept:
        raise ValueError(f"--features_path {features_path}: none of the {len(video_ids)} {what} videos has a frame "
                         f"folder with more than {VATEX_MIN_FILES_EXCLUSIVE} files")
    return kept


def _grouped(name: str, order: list[str], caps: dict[str, list[str]]) -> RetrievalSet:
    """Multi-caption set: columns in ``order``, each video's captions contiguous, in annotation order."""
    captions: list[str] = []
    cv: list[int] = []
    for col, v in enumerate(order):
        captions.extend(caps[v])
        cv.extend([col] * len(caps[v]))
    return RetrievalSet(name, list(order), captions, np.asarray(cv, dtype=np.int64), multi_caption=True)


# ------------------------------------------------------------------------------------------------- generic


def _read_generic(path: Path) -> list[dict[str, str]]:
    """Rows of a generic annotation file: CSV with a header, or JSONL (by extension ``.jsonl``/``.json``)."""
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}: line {n} is not a JSON object")
                for k in ("video_id", "caption"):
                    if k not in obj or str(obj[k]).strip() == "":
                        raise ValueError(f"{path}: line {n} has no {k!r}")
                rows.append({k: str(v) for k, v in obj.items()})
        if not rows:
            raise ValueError(f"{path}: no annotation rows")
        return rows
    rows = _read_csv(path, ("video_id", "caption"))
    if not rows:
        raise ValueError(f"{path}: no annotation rows")
    return rows


def _generic_rows(data_path, split: str | None) -> tuple[Path, list[tuple[str, str]]]:
    path = _need_file(data_path, "--data_path", "generic CSV/JSONL annotations with video_id,caption[,split]")
    rows = _read_generic(path)
    if split is not None and any("split" in r for r in rows):
        rows = [r for r in rows if r.get("split", "").strip() == split]
        if not rows:
            raise ValueError(f"{path}: no rows with split == {split!r}")
    return path, [(r["video_id"].strip(), r["caption"]) for r in rows]


# ------------------------------------------------------------------------------------------------- parsers


class DatasetParser:
    """The annotation format of one dataset, serving both the evaluation and the training side.

    A subclass reads its files once in :meth:`videos` (the listed videos that pass the dataset's frame-folder
    rule, in the original's column order, with their captions); :meth:`eval_set` and :meth:`train_set` only
    arrange that listing, so the two sides can never disagree on which videos and captions a split holds.
    Formats whose two sides read different files (MSR-VTT) override the methods instead.
    """

    datatype: str = ""

    def videos(self, *, data_path, features_path, split: str, skip_missing: bool
               ) -> tuple[str, list[str], dict[str, list[str]]]:
        """(set name, video ids in column order, captions per video)."""
        raise NotImplementedError

    def eval_set(self, *, data_path, features_path=None, val_csv=None, split: str = "test",
                 skip_missing: bool = False) -> RetrievalSet:
        name, order, caps = self.videos(data_path=data_path, features_path=features_path, split=split,
                                        skip_missing=skip_missing)
        return _grouped(name, order, caps)

    def train_set(self, *, data_path, features_path=None, train_csv=None, split: str = "train",
                  skip_missing: bool = False) -> PairSet:
        _, order, caps = self.videos(data_path=data_path, features_path=features_path, split=split,
                                     skip_missing=skip_missing)
        return PairSet([(v, c) for v in order for c in caps[v]])


class MsrvttParser(DatasetParser):
    """``msrvtt``: evaluation is the 1k-A protocol (``MSRVTT_JSFUSION_test.csv``, one caption per video);
    training reads a video list (``MSRVTT_train.9k.csv`` ...) and the captions of ``MSRVTT_data.json``."""

    datatype = "msrvtt"

    def eval_set(self, *, data_path=None, features_path=None, val_csv=None, split: str = "test",
                 skip_missing: bool = False) -> RetrievalSet:
        csv_path = _need_file(val_csv, "--val_csv", "MSR-VTT 1k-A pairs, e.g. MSRVTT_JSFUSION_test.csv")
        with open(csv_path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if "sentence" not in [h.strip() for h in header]:
            raise ValueError(f"{csv_path}: missing column sentence (header: {','.join(header)}); --datatype msrvtt "
                             f"expects MSRVTT_JSFUSION_test.csv, use --datatype msrvttfull for a video_id list")
        rows = _read_csv(csv_path, ("video_id", "sentence"))
        if not rows:
            raise ValueError(f"{csv_path}: no rows")
        vids = [r["video_id"].strip() for r in rows]
        caps = [r["sentence"] for r in rows]
        uniq = list(OrderedDict.fromkeys(vids))
        keep = set(_filter_missing(uniq, features_path, skip_missing, "MSR-VTT 1k-A"))
        if len(keep) < len(uniq):
            pairs = [(v, c) for v, c in zip(vids, caps, strict=True) if v in keep]
            vids, caps = [v for v, _ in pairs], [c for _, c in pairs]
        return RetrievalSet(f"msrvtt:{csv_path.name}", vids, caps, np.arange(len(vids), dtype=np.int64), False)

    @staticmethod
    def _listed(csv_path: Path, json_path: Path, features_path, skip_missing: bool, what: str
                ) -> tuple[OrderedDict[str, list[str]], set[str]]:
        """(captions of the listed videos in json order, the listed videos that have frames)."""
        listed = list(OrderedDict.fromkeys(r["video_id"].strip() for r in _read_csv(csv_path, ("video_id",))))
        if not listed:
            raise ValueError(f"{csv_path}: no video ids")
        caps = _msrvtt_captions(json_path, set(listed))
        _check_all_captioned(listed, caps, csv_path, json_path)
        return caps, set(_filter_missing(listed, features_path, skip_missing, what))

    def train_set(self, *, data_path, features_path=None, train_csv=None, split: str = "train",
                  skip_missing: bool = False) -> PairSet:
        csv_path = _need_file(train_csv, "--train_csv", "MSR-VTT training video list, e.g. MSRVTT_train.9k.csv")
        json_path = _need_file(data_path, "--data_path", "MSRVTT_data.json")
        _, keep = self._listed(csv_path, json_path, features_path, skip_missing, "MSR-VTT train")
        # json sentence order, as CLIP4Clip's unfolded training loader
        data = _load_json(json_path)
        return PairSet([(s["video_id"], str(s["caption"])) for s in data["sentences"] if s["video_id"] in keep])


class MsrvttFullParser(MsrvttParser):
    """``msrvttfull``: evaluation on a video list (``MSRVTT_{test,val}.full.csv``) with every json caption
    (multi-caption); training as ``msrvtt``."""

    datatype = "msrvttfull"

    def eval_set(self, *, data_path, features_path=None, val_csv=None, split: str = "test",
                 skip_missing: bool = False) -> RetrievalSet:
        csv_path = _need_file(val_csv, "--val_csv", "MSR-VTT video list, e.g. MSRVTT_test.full.csv")
        json_path = _need_file(data_path, "--data_path", "MSRVTT_data.json")
        caps, keep = self._listed(csv_path, json_path, features_path, skip_missing, "MSR-VTT full")
        # columns: first appearance in the json sentences (not csv order), as the original's dict insertion
        order = [v for v in caps if v in keep]
        return _grouped(f"msrvttfull:{csv_path.name}", order, caps)


class MsvdParser(DatasetParser):
    """``msvd``: ``raw-captions.pkl`` + ``{split}_list.txt``; every listed video needs its frame folder."""

    datatype = "msvd"

    def videos(self, *, data_path, features_path, split, skip_missing):
        folder = _need_dir(data_path, "--data_path", "MSVD folder with raw-captions.pkl and *_list.txt")
        list_file = _split_file(folder, split, MSVD_SPLITS, "--data_path")
        listed = list(OrderedDict.fromkeys(_read_list(list_file)))
        pkl = _need_file(folder / "raw-captions.pkl", "--data_path", "MSVD captions")
        caps = _msvd_captions(pkl)
        _check_all_captioned(listed, caps, list_file, pkl)
        order = _filter_missing(listed, features_path, skip_missing, f"MSVD {split}")
        return f"msvd:{split}", order, caps


class VatexParser(DatasetParser):
    """``vatexEnglish``: ``vatex_data.json`` + ``{split}_list.txt``; the original's > 5 files rule drops
    videos (logged) instead of requiring every folder."""

    datatype = "vatexEnglish"

    def videos(self, *, data_path, features_path, split, skip_missing):
        folder = _need_dir(data_path, "--data_path", "VATEX folder with vatex_data.json and *_list.txt")
        list_file = _split_file(folder, split, VATEX_SPLITS, "--data_path")
        listed = list(OrderedDict.fromkeys(_read_list(list_file)))
        order = _vatex_filter(listed, features_path, f"VATEX {split}")
        cap_file = _need_file(folder / "vatex_data.json", "--data_path", "VATEX captions")
        caps = _vatex_captions(cap_file)
        _check_all_captioned(order, caps, list_file, cap_file)
        return f"vatexEnglish:{split}", order, caps


class GenericParser(DatasetParser):
    """``generic``: one CSV/JSONL file of (video_id, caption[, split]) rows. Evaluation is single-caption
    (rows in file order) when every video has one caption, multi-caption otherwise; training keeps file order."""

    datatype = "generic"

    def eval_set(self, *, data_path, features_path=None, val_csv=None, split: str = "test",
                 skip_missing: bool = False) -> RetrievalSet:
        path, pairs = _generic_rows(data_path, split)
        grouped: OrderedDict[str, list[str]] = OrderedDict()
        for v, c in pairs:
            grouped.setdefault(v, []).append(c)
        order = _filter_missing(list(grouped), features_path, skip_missing, f"{path.name}")
        if all(len(c) == 1 for c in grouped.values()):
            keep = set(order)
            kept = [(v, c) for v, c in pairs if v in keep]
            return RetrievalSet(f"generic:{path.name}", [v for v, _ in kept], [c for _, c in kept],
                                np.arange(len(kept), dtype=np.int64), multi_caption=False)
        return _grouped(f"generic:{path.name}", order, grouped)

    def train_set(self, *, data_path, features_path=None, train_csv=None, split: str = "train",
                  skip_missing: bool = False) -> PairSet:
        path, pairs = _generic_rows(data_path, split)
        keep = set(_filter_missing(list(OrderedDict.fromkeys(v for v, _ in pairs)), features_path, skip_missing,
                                   path.name))
        return PairSet([(v, c) for v, c in pairs if v in keep])


# ------------------------------------------------------------------------------------------------- provenance

#: What each evaluation datatype measures (result files record it next to the set's name).
PROTOCOLS = {
    "msrvtt": "MSR-VTT single-caption protocol: the csv's caption-video pairs (1k-A: MSRVTT_JSFUSION_test.csv)",
    "msrvttfull": "MSR-VTT multi-caption protocol: every json caption of the listed videos (MSRVTT_test.full.csv)",
    "msvd": "MSVD multi-caption protocol: every caption of the split's videos",
    "vatexEnglish": "VATEX multi-caption protocol: the English captions of the split's videos (HGR: test; "
                    "random 1k5: test1k5_sec)",
    "generic": "generic annotation file: single-caption when every video has one caption, else multi-caption",
}


def annotation_files(datatype: str, *, data_path=None, csv_path=None, split: str = "test",
                     train: bool = False) -> list[Path]:
    """The annotation files a split is read from (for result files, which record their hashes).

    Args:
        datatype: one of :data:`DATATYPES`.
        data_path: the datatype's ``--data_path``.
        csv_path: MSR-VTT's split csv (``--val_csv`` for evaluation, ``--train_csv`` for training).
        split: the MSVD/VATEX list, or the generic file's split value.
        train: the training side (MSR-VTT training reads the json as well as the csv).
    """
    dt = normalize_datatype(datatype)
    if dt in ("msrvtt", "msrvttfull"):
        files = [csv_path] if dt == "msrvtt" and not train else [csv_path, data_path]
        return [Path(f) for f in files if f]
    if dt == "generic":
        return [Path(data_path)] if data_path else []
    folder = Path(data_path) if data_path else None
    if folder is None:
        return []
    captions = folder / ("raw-captions.pkl" if dt == "msvd" else "vatex_data.json")
    return [captions, folder / f"{split}_list.txt"]


def read_caption_file(path: str | os.PathLike) -> list[str]:
    """Captions of a UTF-8 text file, one per line (a query bank); blank lines are skipped.

    Raises:
        FileNotFoundError: no such file. ValueError: not UTF-8 (the line is named) or no caption at all.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file (query bank: UTF-8 text, one caption per line)")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{p}: line {line} is not UTF-8 text (query bank: UTF-8, one caption per line)") from None
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"{p}: no captions (query bank: UTF-8 text, one caption per line)")
    return captions


def load_caption_bank(datatype: str, *, data_path, split: str) -> tuple[list[str], list[Path]]:
    """Every caption of a training split, read from the annotation files themselves, and those files.

    ``split`` is what selects the split for the datatype: the list name for MSVD/VATEX (``train``), the split
    value of a generic file, or the video-list csv for MSR-VTT (``MSRVTT_train.9k.csv``). All listed videos'
    captions are kept, whether or not their frames exist (a bank needs captions only).
    """
    dt = normalize_datatype(datatype)
    if dt in ("msrvtt", "msrvttfull"):
        pairs = parser_for(dt).train_set(data_path=data_path, train_csv=split)
        files = annotation_files(dt, data_path=data_path, csv_path=split, train=True)
    else:
        pairs = parser_for(dt).train_set(data_path=data_path, split=split)
        files = annotation_files(dt, data_path=data_path, split=split, train=True)
    captions = [c for _, c in pairs.pairs]
    if not captions:
        raise ValueError(f"query bank {split!r} of {', '.join(map(str, files))}: no captions")
    return captions, files


#: One parser per datatype (:data:`DATATYPES`); look one up with :func:`parser_for`.
PARSERS: dict[str, DatasetParser] = {p.datatype: p for p in (MsrvttParser(), MsrvttFullParser(), MsvdParser(),
                                                               VatexParser(), GenericParser())}


def parser_for(datatype: str) -> DatasetParser:
    """The parser of a datatype (aliases accepted); ValueError listing the choices otherwise."""
    return PARSERS[normalize_datatype(datatype)]


# ------------------------------------------------------------------------------------------------- public API


def load_eval_set(
    datatype: str,
    *,
    data_path: str | os.PathLike | None,
    features_path: str | os.PathLike | None = None,
    val_csv: str | os.PathLike | None = None,
    split: str = "test",
    skip_missing: bool = False,
) -> RetrievalSet:
    """Evaluation set of one protocol, rows and columns in the original's order.

    Args:
        datatype: one of :data:`DATATYPES` (``vatex`` accepted for ``vatexEnglish``).
        data_path: MSR-VTT: ``MSRVTT_data.json`` (unused by 1k-A); MSVD/VATEX: the annotation folder;
            generic: the CSV/JSONL file.
        features_path: folder of frame folders. VATEX drops videos whose folder is missing or holds ≤ 5 files
            (the original protocol); other datasets require every folder (see ``skip_missing``).
        val_csv: MSR-VTT csv: ``MSRVTT_JSFUSION_test.csv`` (``msrvtt``) or ``MSRVTT_{test,val}.full.csv``
            (``msrvttfull``).
        split: MSVD ``train/val/test``; VATEX ``train/val/test/test1k5_sec``; generic: value of the ``split``
            column when the file has one.
        skip_missing: drop (and log) listed videos without a frame folder instead of raising.

    Raises:
        ValueError / FileNotFoundError: one line naming the file or flag and the problem.
    """
    return parser_for(datatype).eval_set(data_path=data_path, features_path=features_path, val_csv=val_csv,
                                         split=split, skip_missing=skip_missing)


def load_train_set(
    datatype: str,
    *,
    data_path: str | os.PathLike | None,
    features_path: str | os.PathLike | None = None,
    train_csv: str | os.PathLike | None = None,
    split: str = "train",
    skip_missing: bool = False,
) -> PairSet:
    """Training pairs: every caption of every listed video is one (video_id, caption) sample.

    Args:
        datatype: one of :data:`DATATYPES`.
        data_path: as in :func:`load_eval_set` (MSR-VTT: ``MSRVTT_data.json``).
        features_path: when given, videos are checked against it (VATEX: the > 5 files rule; others: a
            missing folder is an error unless ``skip_missing``).
        train_csv: MSR-VTT ``MSRVTT_train.9k.csv`` / ``7k`` / ``train.full.csv`` (a ``video_id`` column).
        split: list to read for MSVD/VATEX, ``split`` column value for generic files.
        skip_missing: drop (and log) videos without a frame folder instead of raising.
    """
    return parser_for(datatype).train_set(data_path=data_path, features_path=features_path, train_csv=train_csv,
                                          split=split, skip_missing=skip_missing)


__all__ = [
    "DATATYPES",
    "PARSERS",
    "PROTOCOLS",
    "DatasetParser",
    "MSVD_SPLITS",
    "PairSet",
    "RetrievalSet",
    "VATEX_SPLITS",
    "annotation_files",
    "load_caption_bank",
    "load_eval_set",
    "load_train_set",
    "normalize_datatype",
    "parser_for",
    "read_caption_file",
]
