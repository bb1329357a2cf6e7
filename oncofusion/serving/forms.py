"""Request bodies read strictly: every field named in errors, text that is not UTF-8 refused.

Starlette decodes a form field that is not UTF-8 as latin-1 without a word (a report in another
encoding became mojibake and was predicted on), and its size error does not name the field. This
parser keeps Starlette's multipart machinery and changes only those two decisions.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from oncofusion.contract import InvalidRequest


class FieldRefused(MultiPartException):
    """A multipart field refused for its size (413) or its encoding (400)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class StrictMultiPartParser(MultiPartParser):
    """:class:`MultiPartParser` that names the field over ``max_part_size`` and refuses non-UTF-8 text."""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + (end - start) > self.max_part_size:
            raise FieldRefused(f"field '{part.field_name}' is over this server's limit of "
                               f"{self.max_part_size // 1024} KiB", 413)
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError as e:
                raise FieldRefused(f"field '{part.field_name}' is not UTF-8 text (byte {e.start}): send it "
                                   "encoded as UTF-8", 400) from e
        super().on_part_end()


async def read_form(request: Request, max_field_bytes: int, max_files: int = 2, max_fields: int = 64) -> FormData:
    """The request's form (multipart or url-encoded), strictly parsed; an empty form for no body."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            parser = StrictMultiPartParser(request.headers, request.stream(), max_files=max_files,
                                           max_fields=max_fields, max_part_size=max_field_bytes)
            return await parser.parse()
        if content_type.startswith("application/x-www-form-urlencoded"):
            form = await request.form(max_files=0, max_fields=max_fields, max_part_size=max_field_bytes)
            bad = [k for k, v in form.items() if isinstance(v, str) and "\ufffd" in v]
            if bad:
                raise InvalidRequest(f"field '{bad[0]}' is not UTF-8 text: send it encoded as UTF-8")
            return form
    except FieldRefused as e:
        raise InvalidRequest(e.message, e.status) from e
    except MultiPartException as e:
        raise InvalidRequest(f"the form cannot be read: {e.message}") from e
    return FormData()


def json_object(text: Any, name: str) -> dict[str, Any]:
    """A form field holding a JSON object (``params``, ``info``); blank means ``{}``."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if not isinstance(text, str):
        raise InvalidRequest(f"'{name}' must be a JSON object, got a file")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"'{name}' is not valid JSON ({e.msg} at character {e.pos})") from e
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{name}' must be a JSON object like {{\"key\": value}}, got {type(value).__name__}")
    return value


def check_text_sizes(params: dict[str, Any], max_chars: int, name: str = "params") -> None:
    """Every text value in ``params`` (a report, a note) within ``max_chars``; the field is named."""
    for key, value in params.items():
        if isinstance(value, str) and len(value) > max_chars:
            raise InvalidRequest(f"'{name}.{key}' is {len(value):,} characters; this server accepts at most "
                                 f"{max_chars:,} (--conf max_text_chars)", 413)
