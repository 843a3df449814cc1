"""Images out of a request: a multipart form (one file per image) or the raw body (one image).

Accepted: ``multipart/form-data`` whose file parts are ``image/*`` or ``application/octet-stream`` (or
untyped), or a raw body typed ``image/*`` or ``application/octet-stream``. Any other media type is 415.
The bytes are not decoded here: :func:`runtime.image_io.load_image` does that (and refuses bombs,
truncated and foreign files with its one-line reason).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ApiError

RAW_TYPES = ("application/octet-stream",)
MULTIPART = "multipart/form-data"
MAX_LABEL = 100


@dataclass(frozen=True)
class Upload:
    """One uploaded image: the form ``field`` it came in (``""`` for a raw body), a ``label`` for messages
    (its file name, else the field), and its encoded bytes."""

    field: str
    label: str
    data: bytes


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _is_image_type(media: str) -> bool:
    return media.startswith("image/") or media in RAW_TYPES


def _label(filename: str | None, field: str) -> str:
    name = os.path.basename((filename or "").replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable())[:MAX_LABEL]
    return name or field or "upload"


async def read_images(request, max_images: int) -> list[Upload]:
    """The images of ``request`` (a Starlette request), in order; 415 for other media, 422 for none or
    more than ``max_images``."""
    media = _media_type(request.headers.get("content-type"))
    if media == MULTIPART:
        uploads = await _read_form(request, max_images)
    elif _is_image_type(media):
        uploads = [Upload("", "upload", await request.body())]
    else:
        shown = media or "none"
        raise ApiError(415, f"unsupported media type {shown!r}: send multipart/form-data, image/* or "
                            "application/octet-stream", "unsupported_media_type")
    if not uploads:
        raise ApiError(422, "no image in the request (send a file part, or the image as the body)", "no_image")
    if len(uploads) > max_images:
        raise ApiError(422, f"{len(uploads)} images in one request; at most {max_images}", "too_many_images")
    return uploads


async def _read_form(request, max_images: int) -> list[Upload]:
    from starlette.datastructures import UploadFile

    form = await request.form(max_files=max_images + 1, max_fields=32)
    try:
        uploads = []
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                continue  # plain form fields are ignored (parameters go in the query string)
            media = _media_type(value.content_type)
            if media and not _is_image_type(media):
                raise ApiError(415, f"form part {field!r} is {media!r}, not an image", "unsupported_media_type")
            uploads.append(Upload(field, _label(value.filename, field), await value.read()))
        return uploads
    finally:
        await form.close()


def one_image(uploads: list[Upload]) -> Upload:
    """The only image of a request that takes one; 422 for more."""
    if len(uploads) != 1:
        raise ApiError(422, f"this endpoint takes one image, got {len(uploads)}", "too_many_images")
    return uploads[0]


def image_pair(uploads: list[Upload]) -> tuple[Upload, Upload]:
    """The two images of a comparison: form fields ``a`` and ``b``, else the first two files."""
    by_field = {u.field: u for u in uploads}
    if "a" in by_field and "b" in by_field:
        return by_field["a"], by_field["b"]
    if len(uploads) != 2:
        raise ApiError(422, f"compare takes two images (form fields 'a' and 'b'), got {len(uploads)}",
                       "invalid_parameter")
    return uploads[0], uploads[1]
