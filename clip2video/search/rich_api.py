"""The server's rich queries: query arithmetic in ``GET /api/search`` and image uploads in ``POST /api/search``.

``POST /api/search`` takes ``multipart/form-data`` (what a browser's ``FormData`` and ``curl -F`` send):

- ``image``: one or more image files (at most ``max_upload_files``, each at most ``max_upload_bytes`` and
  ``max_image_pixels``; JPEG, PNG, BMP or WebP judged by their content, not by name or declared type);
- ``q`` (optional): a query in the arithmetic of ``query_parse.py``, whose image parts name uploaded files by
  their file name (``"2:a dog" + photo.jpg - snow`` with ``photo.jpg`` uploaded); without ``q`` the query is
  the sum of the uploaded images; an upload that ``q`` does not use is refused, as is an image part naming no
  upload. Nothing a request says is ever read from the server's disk: clip parts are refused here;
- ``k`` (optional), as for ``GET``.

The body is read with a bound on its size (``Content-Length`` is checked first, the stream is counted as it
arrives) and parsed by a small strict parser (:func:`parse_form`): known field names only, a bounded number of
parts, one line naming the problem otherwise (HTTP 400). Image and arithmetic queries run one at a time per
encoder thread through their own ``QueryBatcher`` (``max_batch`` 1: a bad image fails only its own request),
with their own small bound on waiting requests, since each may hold its uploads in memory (503 beyond).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException

from clip2video.dataloaders.frames import FrameError
from clip2video.search.batcher import BatcherClosed, BusyError, QueryBatcher
from clip2video.search.limits import ServerLimits, strict_int
from clip2video.search.query_parse import Part, QueryParseError, parse_query
from clip2video.search.query_vectors import QueryEncoder, QueryInputError, check_image

FORM_FIELDS = ("q", "k", "image")
MAX_PART_HEADER_BYTES = 8192
FIELD_SLACK_BYTES = 65536  # room for the text fields and part headers on top of the images


def bad_request(message: str) -> HTTPException:
    return HTTPException(400, message)


# ----------------------------------------------------------------------------------------------- multipart
@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # upload name → bytes, in upload order


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    """``form-data; name="q"; filename="a b.jpg"`` → (``form-data``, {name: q, filename: a b.jpg})."""
    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            if rest[i:].strip():
                raise bad_request(f"malformed header parameter {rest[i:i + 40]!r}")
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            # as browsers write it (HTML's form encoding): no backslash escapes; ", CR and LF as %22, %0D, %0A
            end = rest.find('"', i + 1)
            if end < 0:
                raise bad_request("unterminated quoted header parameter")
            val, i = rest[i + 1:end], end + 1
            for esc, ch in (("%22", '"'), ("%0D", "\r"), ("%0A", "\n")):
                val = val.replace(esc, ch)
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            val, i = rest[i:end].strip(), end
        if key in params:
            raise bad_request(f"header parameter {key!r} given twice")
        params[key] = val
    return head.strip().lower(), params


def form_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; 400 for anything else."""
    kind, params = _header_params(content_type or "")
    if kind != "multipart/form-data":
        raise bad_request("POST /api/search takes multipart/form-data (fields q, k and image files); "
                          f"got {kind or 'no content type'!r}")
    b = params.get("boundary", "")
    if not 1 <= len(b) <= 70 or not b.isascii():
        raise bad_request("multipart/form-data without a valid boundary")
    return b.encode("ascii")


def _upload_name(filename: str, n: int) -> str:
    """The name a query uses for an upload: the file name without any folder a client sent with it."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name or f"image{n}"


def parse_form(body: bytes, boundary: bytes, *, max_files: int, max_file_bytes: int,
               max_field_chars: int) -> Form:
    """A ``multipart/form-data`` body (RFC 7578) → its fields and files; 400 with one line when it is not one.

    Strict: the body starts with the first delimiter and ends with the closing one; every part has a
    ``Content-Disposition: form-data`` with a known ``name``; ``q`` and ``k`` at most once and not files;
    ``image`` parts are files (a ``filename``), at most ``max_files`` with distinct names.
    """
    dash = b"--" + boundary
    if not body.startswith(dash):
        raise bad_request("multipart body does not start with its boundary")
    form = Form()
    pos, parts = len(dash), 0
    while True:
        if body[pos:pos + 2] == b"--":
            if body[pos + 2:].strip(b"\r\n"):
                raise bad_request("data after the closing multipart boundary")
            return form
        if body[pos:pos + 2] != b"\r\n":
            raise bad_request("malformed multipart boundary line")
        parts += 1
        if parts > max_files + 2:
            raise bad_request(f"too many parts in the form (at most {max_files} images, q and k)")
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + MAX_PART_HEADER_BYTES)
        if head_end < 0:
            raise bad_request("multipart part without a header end (or headers over 8 KiB)")
        headers: dict[str, str] = {}
        for line in body[pos + 2:head_end].split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                raise bad_request("malformed multipart part header")
            headers[name.strip().decode("latin-1").lower()] = value.strip().decode("utf-8", "replace")
        end = body.find(b"\r\n" + dash, head_end + 4)
        if end < 0:
            raise bad_request("multipart body without its closing boundary")
        data = body[head_end + 4:end]
        pos = end + 2 + len(dash)
        kind, params = _header_params(headers.get("content-disposition", ""))
        name = params.get("name")
        if kind != "form-data" or name is None:
            raise bad_request("multipart part without Content-Disposition: form-data; name=...")
        if name not in FORM_FIELDS:
            raise bad_request(f"unknown form field {name[:60]!r}; the fields are q, k and image")
        if name == "image":
            if "filename" not in params:
                raise bad_request("the image field must be a file upload")
            if len(form.files) >= max_files:
                raise bad_request(f"more than {max_files} images uploaded")
            if len(data) > max_file_bytes:
                raise bad_request(f"uploaded image {params['filename'][:100]!r} is {len(data)} bytes; the limit is "
                                  f"{max_file_bytes}")
            up = _upload_name(params["filename"], len(form.files) + 1)
            if up in form.files:
                raise bad_request(f"two uploaded images are named {up[:100]!r}")
            form.files[up] = data
        else:
            if "filename" in params:
                raise bad_request(f"form field {name} must be text, not a file")
            if name in form.fields:
                raise bad_request(f"form field {name} given twice")
            if len(data) > 4 * max_field_chars:
                raise bad_request(f"form field {name} is over {max_field_chars} characters")
            try:
                form.fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request(f"form field {name} is not UTF-8 text") from None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (400) as soon as it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        size = strict_int(declared.strip(), 18)  # the one integer parser (limits.py)
        if size is None:
            raise bad_request("malformed Content-Length")
        if size > max_bytes:
            raise bad_request(f"request body of {size} bytes; the limit is {max_bytes}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise bad_request(f"request body over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------------------------------------- queries
def parse_q(q: str) -> list[Part]:
    """``q`` as query arithmetic; 400 with the parser's line when malformed."""
    try:
        return parse_query(q)
    except QueryParseError as e:
        raise bad_request(f"q: {e}") from None


class RichSearch:
    """Image and arithmetic queries over an index: encoded off the event loop, bounded like text queries."""

    def __init__(self, index, limits: ServerLimits):
        self.limits = limits
        self._index = index
        self._encoder: QueryEncoder | None = None
        self._last: tuple[Any, QueryEncoder] | None = None  # (index generation, its encoder)
        self.reading = 0  # POST bodies being read (they hold memory before they are queued)
        self.batcher = QueryBatcher(self._run, max_concurrent=limits.max_concurrent_encodes,
                                    max_waiting=limits.max_rich_waiting, max_batch=1)

    @property
    def encoder(self) -> QueryEncoder:
        if self._encoder is None:
            self._encoder = QueryEncoder(self._index, max_image_pixels=self.limits.max_image_pixels)
        return self._encoder

    def encoder_for(self, index) -> QueryEncoder:
        """The encoder of one index generation (a server follows new generations: ``live.py``)."""
        if index is self._index:
            return self.encoder
        last = self._last
        if last is None or last[0] is not index:
            last = self._last = (index, QueryEncoder(index, max_image_pixels=self.limits.max_image_pixels))
        return last[1]

    def _run(self, items: list[tuple[list[Part], dict[str, bytes]]], ks: list[int], target: Any = None) -> list[Any]:
        encoder = self.encoder if target is None else self.encoder_for(target.index)
        return [encoder.search(parts, k, uploads) for (parts, uploads), k in zip(items, ks, strict=True)]

    def capacity_left(self) -> int:
        return self.limits.max_concurrent_encodes + self.limits.max_rich_waiting - self.batcher.in_flight \
            - self.reading

    async def answer(self, parts: list[Part], k: int, uploads: dict[str, bytes] | None,
                     target: Any = None) -> list[Any]:
        """Hits of parsed parts; ``uploads`` None for a ``GET`` (no image parts then). ``target``: the index
        generation a server request leased (``live.Served``), searched instead of the one given at start."""
        if uploads is None:
            named = [p for p in parts if p.kind in ("image", "clip")]
            if named:
                raise bad_request(f"{named[0].kind}:{named[0].value[:100]}: GET takes texts and like: parts; upload "
                                  "images with POST /api/search (multipart/form-data)")
            uploads = {}
        try:
            return await self.batcher.submit((parts, uploads), k, target)
        except (BusyError, BatcherClosed) as e:
            raise HTTPException(503, str(e)) from None
        except (QueryInputError, QueryParseError, FrameError) as e:
            raise bad_request(str(e)) from None

    def shutdown(self) -> None:
        self.batcher.shutdown()


#: a rich query's answer about QB-Norm: never applied (the bank holds captions; arithmetic, images and clips are
#: not one), so that every ``/api/search`` answer has the same keys
NO_QB = {"enabled": False, "applied": False}


def rich_routes(rich: RichSearch, live, limits: ServerLimits, *, parse_k: Callable, hit_json: Callable,
                ms_since: Callable[[float], float]) -> APIRouter:
    """``POST /api/search`` (``app.py`` passes the index it serves (``live.LiveIndex``: a request searches the
    generation it leased, with that generation's record cache), its ``k`` parser and result formatter)."""
    r = APIRouter()
    max_body = limits.max_upload_files * limits.max_upload_bytes + 4 * limits.max_query_chars + FIELD_SLACK_BYTES

    @r.post("/api/search")
    async def search_upload(request: Request):
        t0 = time.perf_counter()
        boundary = form_boundary(request.headers.get("content-type"))
        if rich.capacity_left() <= 0:
            raise HTTPException(503, "busy: too many image queries are being read, encoded or waiting; retry shortly")
        rich.reading += 1
        try:
            body = await read_body(request, max_body)
        finally:
            rich.reading -= 1
        form = parse_form(body, boundary, max_files=limits.max_upload_files, max_file_bytes=limits.max_upload_bytes,
                          max_field_chars=limits.max_query_chars)
        del body
        for name in ("q", "k"):
            if name in form.fields and name in request.query_params:
                raise bad_request(f"{name} given both in the URL and in the form")
        k = parse_k(form.fields.get("k", request.query_params.get("k")), limits)
        for name, data in form.files.items():
            try:
                check_image(data, name, max_bytes=limits.max_upload_bytes, max_pixels=limits.max_image_pixels)
            except QueryInputError as e:
                raise bad_request(str(e)) from None
        q = form.fields.get("q", request.query_params.get("q", ""))
        if "\x00" in q:
            raise bad_request("q contains a NUL character")
        if len(q) > limits.max_query_chars:
            raise bad_request(f"q is {len(q)} characters long; the limit is {limits.max_query_chars}")
        if q.strip():
            parts = parse_q(q)
            used = {p.value for p in parts if p.kind == "image"}
            missing = sorted(used - set(form.files))
            if missing:
                raise bad_request(f"image:{missing[0][:100]}: no uploaded image of that name")
            unused = [n for n in form.files if n not in used]
            if unused:
                raise bad_request(f"uploaded image {unused[0][:100]!r} is not used by q; name it there as "
                                  f"\"image:{unused[0][:100]}\" or leave q out")
        elif form.files:
            parts = [Part(1.0, "image", n) for n in form.files]
        else:
            raise bad_request("give q or upload an image")
        with live.use() as g:
            hits = await rich.answer(parts, k, form.files, g)
            return {"query": q, "parts": [p.to_dict() for p in parts], "k": k, "took_ms": ms_since(t0),
                    "qb_norm": NO_QB, "results": [hit_json(h, g.extra) for h in hits]}

    return r


__all__ = ["NO_QB", "Form", "RichSearch", "form_boundary", "parse_form", "parse_q", "read_body", "rich_routes"]
