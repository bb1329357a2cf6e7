"""Nothing that identifies a patient reaches the server log.

Stock MONAI Label logs every request's parameters ("Infer Request: {...}": a patient name and MRN
sent as parameters appeared in the log, a 900 KB report grew it by 900 KB), label infos, and file
paths whose folder names carry patient names. :class:`PrivacyFilter`, on every handler, blanks the
messages known to carry parameters and replaces paths under the datastore by ``<datastore>``; the
request line the guard logs (id, model, image id, status, time) is what remains.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

#: stock MONAI Label messages that print request parameters, infos or uploaded file objects
PARAMETER_MESSAGES = (
    "Infer Request", "Active Learning Request", "Next sample:", "Label Info:", "Saving Label for Image",
    "Save Label params", "Image: ", "Request Files", "WSI Infer Request", "Result:", "Initializing App from",
    "Train Request", "Scoring Request", "Batch Infer Request", "Uncompress:", "Session ID:",
)


class PrivacyFilter(logging.Filter):
    """Redact parameter dumps and datastore paths from every record (message and traceback)."""

    def __init__(self, roots: Iterable[str | os.PathLike]):
        super().__init__()
        spelled = {str(r).rstrip("/") for r in roots if str(r).strip("/")}
        spelled |= {os.path.realpath(r) for r in spelled}
        alternatives = "|".join(re.escape(r) for r in sorted(spelled, key=len, reverse=True))
        # a root and whatever path follows it, up to a quote, a space, a ';' or ',' (log separators)
        self._paths = re.compile(rf"(?:{alternatives})(?:/[^\s'\";,]*)?") if alternatives else None

    def redact(self, text: str) -> str:
        return self._paths.sub("<datastore>", text) if self._paths else text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in PARAMETER_MESSAGES if message.startswith(p)), None)
        record.msg = f"{prefix.rstrip(': ')}: <redacted>" if prefix else self.redact(message)
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_privacy_filter(roots: Iterable[str | os.PathLike]) -> PrivacyFilter:
    """Put one :class:`PrivacyFilter` on every handler of every logger configured so far."""
    privacy = PrivacyFilter(roots)
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, PrivacyFilter) for f in handler.filters):
            handler.addFilter(privacy)
    return privacy
