"""Request bodies: the image in a multipart form, and a header-only check against the limits."""
from __future__ import annotations

import io
import warnings

from .inspector import HttpError, ServiceConfig

# the formats a camera or a line PC sends; anything else is refused before a decoder runs
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM")


def image_from_multipart(body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """The image file of a ``multipart/form-data`` body (RFC 7578), and its file name.

    Takes the part named ``image`` (else ``file``, else the first part with a file name, else a
    single part). Parts are cut at the boundary with a byte search (fast on large files); each
    part's headers are read with :mod:`email` (the standard library's MIME parser), which also
    parses whole bodies that are not cut as RFC 7578 says (bare LF line ends).
    """
    parts = _split_multipart(body, content_type)
    if parts is None:
        parts = _parse_multipart_email(body, content_type)
    if not parts:
        raise HttpError(400, "multipart body without parts (missing or wrong boundary?)")
    pick = (next((p for p in parts if p[0] == "image"), None) or next((p for p in parts if p[0] == "file"), None)
            or next((p for p in parts if p[1]), None) or (parts[0] if len(parts) == 1 else None))
    if pick is None:
        names = ", ".join(str(p[0]) for p in parts) or "none"
        raise HttpError(400, f"no image in the multipart body: send the file as field 'image' (fields seen: {names})")
    return pick[2], pick[1]


def _header_params(content_type: str):
    from email import policy
    from email.parser import BytesHeaderParser

    return BytesHeaderParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n")


def _split_multipart(body: bytes, content_type: str) -> list | None:
    """[(field name, file name, payload)] or None when the body is not in the strict form."""
    from email import policy
    from email.parser import BytesHeaderParser

    boundary = _header_params(content_type).get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise HttpError(400, "multipart Content-Type without a boundary parameter")
    delim = b"\r\n--" + boundary.encode("latin-1", "replace")
    segments = (b"\r\n" + body).split(delim)
    if len(segments) < 3:
        return None
    parts = []
    for seg in segments[1:]:
        if seg.startswith(b"--"):  # the closing delimiter
            return parts
        head, sep, payload = seg.partition(b"\r\n\r\n")
        if not sep:
            return None
        h = BytesHeaderParser(policy=policy.HTTP).parsebytes(head.lstrip(b" \t").removeprefix(b"\r\n") + b"\r\n\r\n")
        parts.append((h.get_param("name", header="content-disposition"), h.get_filename(), payload))
    return None  # no closing delimiter: truncated


def _parse_multipart_email(body: bytes, content_type: str) -> list:
    from email import policy
    from email.parser import BytesParser

    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\nMIME-Version: 1.0\r\n\r\n"
    try:
        msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's problem
        raise HttpError(400, f"cannot parse the multipart body ({exc})") from exc
    if not msg.is_multipart() or msg.defects:
        raise HttpError(400, "malformed multipart body (wrong boundary, or cut short?)")
    parts = []
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        if isinstance(payload, (bytes, bytearray)):
            parts.append((part.get_param("name", header="content-disposition"), part.get_filename(), bytes(payload)))
    return parts


def probe_image(data: bytes, config: ServiceConfig, name: str) -> tuple[int, int, str]:
    """Read only the header: format and size, against the limits (no pixel is decoded here)."""
    from PIL import Image

    if not data:
        raise HttpError(400, f"{name}: empty body; send the image file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise HttpError(413, f"{name}: image dimensions too large ({exc})", "too_large") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for non-images
        raise HttpError(415, f"{name}: not an image in a supported format ({', '.join(ACCEPTED_FORMATS)}); "
                             f"{len(data)} bytes starting {data[:8]!r}", "unsupported_media_type") from exc
    w, h = img.size
    fmt = img.format
    img.close()
    if w * h > config.max_pixels:
        raise HttpError(413, f"{name}: image is {w} x {h} pixels ({w * h / 1e6:.1f} MP); this service accepts "
                             f"at most {config.max_pixels / 1e6:.1f} MP (--max-pixels)", "too_large")
    if config.expect_size and (w, h) != tuple(config.expect_size):
        ew, eh = config.expect_size
        raise HttpError(422, f"{name}: image is {w} x {h} pixels; this station expects {ew} x {eh} (--expect-size)",
                        "unprocessable")
    if min(w, h) < config.min_side:
        raise HttpError(422, f"{name}: image is {w} x {h} pixels, too small to inspect (minimum side "
                             f"{config.min_side})", "unprocessable")
    return w, h, fmt

