"""CLIP weights by name: OpenAI's published files and open_clip's pretrained tags, downloaded once into a cache.

Two kinds of name are understood, as the tools people already use understand them:

* **OpenAI's releases** (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14``, ``ViT-L/14@336px``, also spelt the open_clip way,
  ``ViT-B-32``, ``ViT-L-14-336``, with or without ``-quickgelu``): OpenAI's ``clip`` package downloads
  ``<base>/<sha256>/<file>.pt`` and checks the file against the SHA-256 that its own URL carries. The same
  is done here, with only the standard library (``urllib``) so that no dependency is added, into
  :func:`cache_dir` (``~/.cache/clip``, the folder OpenAI's and open_clip's loaders use, so a file either of
  them downloaded is found; ``CLIP2VIDEO_CACHE`` moves it). ``CLIP2VIDEO_OPENAI_URL`` replaces the base URL
  (a mirror, or a loopback server in the tests).
* **open_clip's pretrained tags** (``--clip_model ViT-B-32:laion2b_s34b_b79k``) go through open_clip's own
  registry and its Hugging Face hub download, so the hub's cache (``HF_HOME`` / ``HF_HUB_CACHE``) and
  ``HF_HUB_OFFLINE`` apply exactly as they do for open_clip itself.

A download goes to a temporary name in the cache folder and is renamed only once complete and verified, so
nothing half-written ever sits under the final name. The temporary name is stable (it carries the expected
hash), so an interrupted transfer is resumed with an HTTP ``Range`` request, in the same run (a few retries)
or the next one; a server that ignores ``Range`` gets a clean restart. A file whose SHA-256 is not the
published one is removed and refused. Processes that start together (``torchrun``) take a lock on the cache
folder, so one downloads and the others then find the file. ``offline=True`` (``--offline``) never touches
the network: a missing file is one error naming it and where to put it.
"""

from __future__ import annotations

import http.client
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clip2video.fileio import TMP_PREFIX, sha256_file

logger = logging.getLogger(__name__)

CACHE_ENV = "CLIP2VIDEO_CACHE"  # replaces the default cache folder of OpenAI's files
OPENAI_URL_ENV = "CLIP2VIDEO_OPENAI_URL"  # replaces OpenAI's base URL
OPENAI_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
# OpenAI's name → (SHA-256 of the published file, its file name): the URL table of OpenAI's ``clip`` package.
OPENAI_RELEASES: dict[str, tuple[str, str]] = {
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
# open_clip's architecture name of each release (it also publishes them as its ``:openai`` tags)
OPEN_CLIP_SPELLING = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                      "ViT-L/14@336px": "ViT-L-14-336"}
HF_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's file name on the hub when a tag names none
RETRIES = 3  # further attempts after a transfer broke off mid-file
CHUNK = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not for the whole file


class WeightsNameError(ValueError):
    """A name that designates no weights (unknown release, architecture or tag)."""


class DownloadError(OSError):
    """Weights that could not be fetched (offline, unreachable, refused, interrupted): one line naming the
    file, where it comes from and where to put it by hand."""


class ChecksumMismatch(ValueError):
    """A downloaded or cached file whose SHA-256 is not the published one (the file has been removed)."""


# ----------------------------------------------------------------------------------------------- names
def cache_dir() -> Path:
    """The folder OpenAI's files are kept in: ``$CLIP2VIDEO_CACHE``, else ``~/.cache/clip``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clip").expanduser()


def openai_release(name: str) -> str | None:
    """OpenAI's own name (``ViT-L/14@336px``) for any accepted spelling of a release, else None."""
    key = name.strip().lower().removesuffix("-quickgelu")
    for official, spelt in OPEN_CLIP_SPELLING.items():
        if key in (official.lower(), spelt.lower(), OPENAI_RELEASES[official][1].lower().removesuffix(".pt")):
            return official
    return None


def openai_url(name: str) -> str:
    sha, filename = OPENAI_RELEASES[name]
    return f"{os.environ.get(OPENAI_URL_ENV, OPENAI_BASE_URL).rstrip('/')}/{sha}/{filename}"


def known_names() -> str:
    """The accepted names, for error messages."""
    return ", ".join(OPENAI_RELEASES)


# ----------------------------------------------------------------------------------------------- resolving
def resolve_clip_weights(path: str | os.PathLike | None, model_name: str | None = None, *, offline: bool = False,
                         progress: bool = True) -> Path:
    """The local file that ``--clip_path`` / ``--clip_model`` designate, fetched first when they name one.

    An existing file always wins (a file called ``ViT-B-32`` in the working folder is that file). Otherwise
    an OpenAI release name is fetched into :func:`cache_dir`; with no path, ``model_name`` ``NAME:TAG`` is
    fetched through open_clip's registry and hub. Anything else is returned unchanged, for the reader to
    report as a missing file.
    """
    if path is not None and str(path) != "":
        if Path(path).is_file():
            return Path(path)
        release = openai_release(str(path))
        return fetch_openai(release, offline=offline, progress=progress) if release else Path(path)
    if model_name and ":" in model_name:
        return fetch_open_clip(model_name, offline=offline)
    raise WeightsNameError("no CLIP weights: give --clip_path (a file, or a name: " + known_names()
                          + ") or --clip_model NAME:TAG (an open_clip pretrained tag)")


def fetch_openai(name: str, *, offline: bool = False, progress: bool = True) -> Path:
    """OpenAI's release ``name`` (any accepted spelling) as a verified file in :func:`cache_dir`."""
    official = openai_release(name)
    if official is None:
        raise WeightsNameError(f"{name}: not an OpenAI CLIP release (known: {known_names()})")
    sha, filename = OPENAI_RELEASES[official]
    hint = (f"the same weights are on the Hugging Face hub as open_clip's tag: --clip_model "
            f"{OPEN_CLIP_SPELLING[official]}:openai")
    return download(openai_url(official), cache_dir() / filename, sha, offline=offline, progress=progress,
                    hint=hint)


# ----------------------------------------------------------------------------------------------- download
def partial_path(dest: Path, sha256: str) -> Path:
    """Where the download of ``dest`` grows: hidden, and tied to the expected hash, so that a later run
    resumes only a transfer of the same file."""
    return dest.with_name(f"{TMP_PREFIX}{dest.name}.{sha256[:16]}.part")


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the cache folder itself (no lock file to leave behind), where the OS has one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the temporary name still keeps the final one whole
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: waiting for another process downloading into this folder", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def download(url: str, dest: str | os.PathLike, sha256: str, *, offline: bool = False, progress: bool = True,
             retries: int = RETRIES, hint: str = "") -> Path:
    """``dest``, downloaded from ``url`` unless already there, with the SHA-256 ``sha256``; see the module doc.

    Raises:
        ChecksumMismatch: the file (downloaded, or found under ``dest``) is not the published one; removed.
        DownloadError: offline and missing, unreachable, refused by the server, or still incomplete after
            ``retries`` resumed attempts (the partial file is kept for the next run to resume).
    """
    dest = Path(dest)
    if offline:  # the cache is only read: nothing created, nothing locked
        if dest.is_file() and _verified(dest, sha256, f"run without --offline to download it again from {url}"):
            return dest
        raise DownloadError(f"{dest.name} is not in the cache and --offline is set: download {url} and put it "
                            f"at {dest}, or pass --clip_path FILE")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{dest.parent}: cannot create the weights cache ({e.strerror or e}); set "
                            f"{CACHE_ENV} to a writable folder") from None
    with _folder_lock(dest.parent):
        if dest.exists() and not dest.is_file():
            raise DownloadError(f"{dest}: exists and is not a regular file")
        if dest.is_file() and _verified(dest, sha256, None):
            return dest
        part = partial_path(dest, sha256)
        resumed = _transfer(url, part, dest, progress=progress, retries=retries, hint=hint)
        got = sha256_file(part)
        if got != sha256 and resumed:  # the kept partial may have come from a damaged earlier transfer
            logger.warning("%s: SHA-256 mismatch after resuming; downloading the whole file again", dest.name)
            part.unlink()
            _transfer(url, part, dest, progress=progress, retries=retries, hint=hint)
            got = sha256_file(part)
        if got != sha256:
            part.unlink()
            raise ChecksumMismatch(f"{url}: the downloaded file's SHA-256 {got[:12]}… is not the published "
                                   f"{sha256[:12]}…; refused and removed (a damaged transfer or a wrong mirror)")
        os.replace(part, dest)
        logger.info("%s: downloaded from %s, SHA-256 verified", dest, url)
        return dest


def _verified(path: Path, sha256: str, refuse: str | None) -> bool:
    """Whether the file at ``path`` has the published hash; if not it is removed, and then ``refuse`` (what
    to do instead) makes that an error, None a warning before downloading it again."""
    got = sha256_file(path)
    if got == sha256:
        return True
    path.unlink()
    if refuse:
        raise ChecksumMismatch(f"{path}: SHA-256 {got[:12]}… is not the published {sha256[:12]}… (removed); {refuse}")
    logger.warning("%s: SHA-256 %s… is not the published %s…: removed, downloading it again", path, got[:12],
                   sha256[:12])
    return False


def _transfer(url: str, part: Path, dest: Path, *, progress: bool, retries: int, hint: str) -> bool:
    """Fill ``part`` with the whole body of ``url``, resuming what is there; True if any byte was resumed
    rather than fetched in one go from the start."""
    resumed = False
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - https or a configured base
        except urllib.error.HTTPError as e:
            e.close()  # its body (an error page) is not read
            if e.code == 416 and have:  # nothing after what we have: the partial is the whole file
                return True
            if e.code >= 500 and attempt < retries:
                _pause(attempt, f"{url}: HTTP {e.code}")
                continue
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; cannot download {dest.name}"
                                + (f" ({hint})" if hint else "") + f", or put the file at {dest}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            if attempt < retries and have:
                _pause(attempt, f"{url}: {reason}")
                continue
            raise DownloadError(f"cannot reach {url} ({reason}): no network? Put {dest.name} at {dest} (or set "
                                f"{CACHE_ENV}), or pass --clip_path FILE" + (f"; {hint}" if hint else "")) from None
        with response:
            start = 0
            if have and response.status == 206:
                start = _range_start(response.headers.get("Content-Range", ""))
            if start != have:  # the server sent the whole file (or another range): start over cleanly
                have = 0
            resumed = resumed or have > 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            done = _copy_body(response, part, have, total, progress, dest.name)
        if total is None or done >= total:
            return resumed
        if attempt < retries:
            _pause(attempt, f"{url}: connection closed at {done} of {total} bytes")
    raise DownloadError(f"{url}: the transfer kept breaking off ({retries + 1} attempts); the partial file {part} "
                        f"is kept and the next run resumes it, or put {dest.name} at {dest}")


def _range_start(content_range: str) -> int:
    """First byte of ``Content-Range: bytes START-END/TOTAL`` (-1 when unreadable)."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _copy_body(response, part: Path, have: int, total: int | None, progress: bool, label: str) -> int:
    """Append the body to ``part`` (truncated first when ``have`` is 0); the bytes it holds afterwards."""
    from tqdm import tqdm

    with open(part, "ab" if have else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
            disable=None if progress else True, dynamic_ncols=True) as bar:  # None: only on a terminal
        while True:
            try:
                block = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:  # reset or timed out mid-body: resumed later
                logger.debug("%s: read failed (%s)", label, e)
                break
            if not block:
                break
            out.write(block)
            bar.update(len(block))
        return out.tell()


def _pause(attempt: int, why: str) -> None:
    wait = 0.5 * (attempt + 1)
    logger.warning("%s; retrying in %.1f s", why, wait)
    time.sleep(wait)


# ----------------------------------------------------------------------------------------------- open_clip
def _hub_location(model_name: str) -> tuple[dict, str, str]:
    """(open_clip's pretrained config, hub repository, file name) of ``NAME:TAG``, checked against open_clip's
    registry."""
    from open_clip.factory import get_model_config
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    arch, _, tag = model_name.partition(":")
    if get_model_config(arch) is None:
        raise WeightsNameError(f"--clip_model {model_name}: open_clip has no architecture {arch!r} "
                              "(see open_clip.list_models())")
    cfg = dict(get_pretrained_cfg(arch, tag))
    if not cfg:
        tags = list_pretrained_tags_by_model(arch)
        raise WeightsNameError(f"--clip_model {model_name}: open_clip has no pretrained tag {tag!r} for {arch}"
                              f" (tags: {', '.join(tags) or 'none'})")
    repo, filename = os.path.split(cfg.get("hf_hub", "").rstrip())
    return cfg, repo, filename or HF_WEIGHTS


def _safe_alternative(filename: str) -> str | None:
    """The ``.safetensors`` file open_clip prefers to ``filename`` on the hub."""
    if filename == HF_WEIGHTS:
        return "open_clip_model.safetensors"
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors"
    return None


def fetch_open_clip(model_name: str, *, offline: bool = False) -> Path:
    """open_clip's weights for ``NAME:TAG``, from the Hugging Face cache or downloaded by open_clip into it."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg, repo, filename = _hub_location(model_name)
    where = f"{repo}/{filename}" if repo else cfg.get("url", "")
    if offline:
        if repo:
            for name in (_safe_alternative(filename), filename):
                got = try_to_load_from_cache(repo, name) if name else None
                if isinstance(got, str) and Path(got).is_file():
                    return Path(got)
        raise DownloadError(f"--clip_model {model_name}: --offline and open_clip's weights {where} are not in the "
                            f"Hugging Face cache {constants.HF_HUB_CACHE}: run once without --offline (or `hf "
                            f"download {repo} {filename}`), or pass --clip_path FILE")
    from open_clip.pretrained import download_pretrained

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # the hub's retry warnings would bury the one line below
    try:
        got = download_pretrained(cfg)
    except Exception as e:  # noqa: BLE001 - the hub's and open_clip's failures become one clear line
        why = " ".join(str(e).split()).rpartition("Last error: ")[2].split(". ")[0][:200] or type(e).__name__
        raise DownloadError(f"--clip_model {model_name}: open_clip's weights {where} are not in the Hugging Face "
                            f"cache {constants.HF_HUB_CACHE} and could not be downloaded ({why}); with no network, "
                            "put them there (`hf download` on another machine, then copy the cache) or pass "
                            "--clip_path FILE") from None
    finally:
        hub_log.setLevel(level)
    if not got or not Path(got).is_file():
        raise DownloadError(f"--clip_model {model_name}: open_clip gave no weight file for {where}")
    logger.info("--clip_model %s: %s", model_name, got)
    return Path(got)
