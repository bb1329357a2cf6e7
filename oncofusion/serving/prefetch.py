"""Decode a study's volume when a client asks for the study, before its first click.

3D Slicer's MONAI Label module asks for the next study (``/activelearning``) and downloads it
(``/datastore/image``) before the user can place a point; both resolve the study through the datastore's
``get_image_uri``. Decoding the volume then, in the background, takes the decode (about 1 s for a
512x512x300 gzip NIfTI on two cores) off the first click: the click finds the volume decoded, or waits
only for the rest of the decode already under way, since the cache decodes a file once however many
callers ask for it (:meth:`oncofusion.io.cache.ImageCache.get`).

One study at a time, latest first: a burst of lookups (a client listing studies, a scoring pass) decodes
at most the study in progress and the last one asked for, never the whole folder.
"""

from __future__ import annotations

import logging
import threading

from oncofusion.io.cache import ImageCache

logger = logging.getLogger(__name__)

#: files read by the ``volume`` reader whatever the bundle; 2D frames and slides are cheap or never whole
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class VolumePrefetcher:
    """Decodes the most recently requested volume into ``cache`` on one background thread."""

    def __init__(self, cache: ImageCache, reader: str = "volume", suffixes: tuple[str, ...] = VOLUME_SUFFIXES):
        self.cache = cache
        self.reader = reader
        self.suffixes = suffixes
        self._wanted: str | None = None
        self._busy = False
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def request(self, path: str | None) -> None:
        """Decode ``path`` soon (replacing any path asked for earlier and not started yet); other files are
        left alone."""
        if not path or not str(path).lower().endswith(self.suffixes):
            return
        with self._condition:
            self._wanted = str(path)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="volume-prefetch", daemon=True)
                self._thread.start()
            self._condition.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Whether every requested decode finished within ``timeout`` seconds (for tests and benchmarks)."""
        with self._condition:
            return self._condition.wait_for(lambda: self._wanted is None and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._wanted is not None)
                path, self._wanted, self._busy = self._wanted, None, True
            try:
                self.cache.get(path, self.reader)
            except Exception as error:  # the click that follows reads the file again and reports the problem
                logger.debug("prefetch of %s failed: %r", path, error)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()
