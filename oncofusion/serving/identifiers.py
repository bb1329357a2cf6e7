"""Image ids, label tags and session ids are identifiers, never paths.

Stock MONAI Label joins these strings onto its datastore folder, so ``../../x`` wrote files outside it
and an absolute path was read from anywhere on the server. Every id the server receives passes
:func:`check_identifier` before any file is touched.
"""

from __future__ import annotations

import re

from oncofusion.contract import InvalidRequest

#: letters, digits and ``. _ + -`` (file stems, DICOM UIDs); no separator, no leading dot, no control
#: character; at most 200 characters
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+\-]{0,199}")


def is_identifier(value: str) -> bool:
    return isinstance(value, str) and IDENTIFIER.fullmatch(value) is not None


def check_identifier(value: str, what: str) -> str:
    """``value`` when it is a plain identifier; else a 400 that says what an identifier is.

    The refused value is not echoed when it looks like a path: the answer must not confirm that a
    server path exists or repeat it into a log.
    """
    if is_identifier(value):
        return value
    shown = "" if not isinstance(value, str) or "/" in value or "\\" in value else f" {value[:40]!r}"
    raise InvalidRequest(
        f"{what}{shown} is not an identifier: use the id the server lists (letters, digits, '.', '_', '+', "
        f"'-'; no path)"
    )
