"""Request bodies: the image in a multipart form, and a header-only check against the limits.
Both raise the core's outcomes (:mod:`.outcomes`): :class:`BadImage` and its kinds."""

from __future__ import annotations

import io
import warnings

from ..runtime.images import decode_cost
from .config import ServiceConfig
from .outcomes import BadImage, TooLarge, Unsupported, WrongSize

# the formats a camera or a line PC sends; anything else is refused before a decoder runs
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM")


MAX_PART_HEAD = 8192  # bytes of one part's headers


def image_from_multipart(body: bytes, content_type: str, max_parts: int = 16) -> tuple[bytes, str | None]:
    """The image file of a ``multipart/form-data`` body (RFC 7578), and its file name.

    Takes the part named ``image`` (else ``file``, else the first part with a file name, else a
    single part). Parts are cut at the boundary with a byte search, CR LF line ends first, then
    bare LF ones; each part's headers (at most 8 KiB) are read with :mod:`email`. Bounded: parts are
    counted with one byte search before any header is parsed, and a body with more than
    ``max_parts`` is refused (20,000 empty fields took 7 s of parsing before this bound).
    """
    boundary = _boundary(content_type)
    parts = _split_multipart(body, boundary, max_parts, b"\r\n")
    if parts is None:
        parts = _split_multipart(body, boundary, max_parts, b"\n")
    if parts is None:
        raise BadImage("malformed multipart body (wrong boundary, or cut short?)")
    if not parts:
        raise BadImage("multipart body without parts (missing or wrong boundary?)")
    pick = (
        next((p for p in parts if p[0] == "image"), None)
        or next((p for p in parts if p[0] == "file"), None)
        or next((p for p in parts if p[1]), None)
        or (parts[0] if len(parts) == 1 else None)
    )
    if pick is None:
        names = ", ".join(str(p[0]) for p in parts) or "none"
        raise BadImage(f"no image in the multipart body: send the file as field 'image' (fields seen: {names})")
    return pick[2], pick[1]


def _boundary(content_type: str) -> bytes:
    from email import policy
    from email.parser import BytesHeaderParser

    if len(content_type) > MAX_PART_HEAD:
        raise BadImage("multipart Content-Type header too long")
    h = BytesHeaderParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    )
    boundary = h.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise BadImage("multipart Content-Type without a boundary parameter")
    if len(boundary) > 200:  # RFC 2046: at most 70 characters
        raise BadImage("multipart boundary longer than 200 characters")
    return boundary.encode("latin-1", "replace")


def _split_multipart(body: bytes, boundary: bytes, max_parts: int, eol: bytes) -> list | None:
    """[(field name, file name, payload)], or None when the body is not in this line-end form.
    ``eol``: CR LF (RFC 7578), or a bare LF (as some hand-made clients send)."""
    delim = eol + b"--" + boundary
    opens = body.startswith(b"--" + boundary)  # no preamble: the first delimiter has no line end
    count = body.count(delim) + opens
    if count > max_parts + 1:  # the closing delimiter is one more than the parts
        raise BadImage(f"multipart body with {count - 1} parts or more; at most {max_parts} are accepted")
    if count < 2:
        return None
    view = memoryview(body)
    pos = -len(eol) if opens else body.find(delim)
    parts: list[tuple] = []
    while True:
        start = pos + len(delim)
        if body.startswith(b"--", start):  # the closing delimiter
            return parts
        nxt = body.find(delim, start)
        if nxt < 0:
            return None  # no closing delimiter: truncated
        part = _part(view[start:nxt], eol)
        if part is None:
            return None
        parts.append(part)
        pos = nxt


def _part(seg: memoryview, eol: bytes) -> tuple | None:
    """(field name, file name, payload) of one part: what follows its delimiter up to the next."""
    from email import policy
    from email.parser import BytesHeaderParser

    i, limit = 0, min(len(seg), MAX_PART_HEAD)
    while i < limit and seg[i] in (0x20, 0x09):  # transport padding after the delimiter
        i += 1
    if seg[i : i + len(eol)] != eol:
        return None
    i += len(eol)
    if seg[i : i + len(eol)] == eol:  # a part without headers
        head, start = b"", i + len(eol)
    else:
        window = bytes(seg[i : i + MAX_PART_HEAD + 2 * len(eol)])
        j = window.find(eol + eol)
        if j < 0 or j > MAX_PART_HEAD:
            if len(seg) - i > MAX_PART_HEAD:
                raise BadImage(f"multipart part headers longer than {MAX_PART_HEAD} bytes")
            return None
        head, start = window[:j], i + j + 2 * len(eol)
    h = BytesHeaderParser(policy=policy.HTTP).parsebytes(head + eol + eol)
    return h.get_param("name", header="content-disposition"), h.get_filename(), bytes(seg[start:])


def probe_image(data: bytes, config: ServiceConfig, name: str) -> tuple[int, int, str | None]:
    """Read only the header: format and size, against the limits (no pixel is decoded here)."""
    from PIL import Image

    if not data:
        raise BadImage(f"{name}: empty body; send the image file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"{name}: image dimensions too large ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for non-images
        raise Unsupported(
            f"{name}: not an image in a supported format ({', '.join(ACCEPTED_FORMATS)}); "
            f"{len(data)} bytes starting {data[:8]!r}"
        ) from exc
    w, h = img.size
    fmt, mode = img.format, img.mode
    img.close()
    if w * h > config.max_pixels:
        raise TooLarge(
            f"{name}: image is {w} x {h} pixels ({w * h / 1e6:.1f} MP); this service accepts "
            f"at most {config.max_pixels / 1e6:.1f} MP (--max-pixels)"
        )
    cost = decode_cost(mode, w, h, fmt)
    if cost > config.max_decode_bytes:
        raise TooLarge(
            f"{name}: decoding this {w} x {h} {fmt} image ({mode}) would need {cost / 1e6:.2f} MB; "
            f"this service decodes at most {config.max_decode_bytes / 1e6:.2f} MB an image "
            f"(4 bytes a pixel at --max-pixels)"
        )
    if config.expect_size and (w, h) != tuple(config.expect_size):
        ew, eh = config.expect_size
        raise WrongSize(f"{name}: image is {w} x {h} pixels; this station expects {ew} x {eh} (--expect-size)")
    if min(w, h) < config.min_side:
        raise WrongSize(f"{name}: image is {w} x {h} pixels, too small to inspect (minimum side {config.min_side})")
    return w, h, fmt
