"""MONAI Label's local datastore, made to survive a crash.

Stock ``LocalDatastore`` (monailabel 0.8.5) rewrites ``datastore_v2.json`` in place: ``open(path, "w")``
truncates the file, then the JSON is serialised and written. A server killed in between leaves the file
empty (6 of 7 targeted kills did), and the next start refuses to run ("Invalid JSON: EOF"), taking every
stored prediction with it. It also copies images and labels straight onto their final name, so a kill
leaves a half-written label that looks whole.

:class:`DurableLocalDatastore` keeps the stock behaviour and changes only how files reach the disk:

- ``datastore_v2.json`` is replaced atomically (:mod:`oncofusion.io.atomic`), after the previous good
  version has been saved, also atomically, as ``datastore_v2.json.bak``;
- at start-up an empty, unreadable or missing file is repaired from that backup (or, without one,
  rebuilt from the images and labels in the folder, as stock does for a new folder) with a warning;
  the bad file is kept as ``datastore_v2.json.corrupt-<UTC time>`` for forensics;
- images and labels are copied atomically.

None of the new names (``.bak``, ``.corrupt-*``, hidden ``*.tmp`` staging folders) matches the image
patterns of ``MONAI_LABEL_DATASTORE_FILE_EXT``, so the stock listing never takes them for studies.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException

from oncofusion.io.atomic import atomic_copy, atomic_link, atomic_write_bytes, atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

BACKUP_SUFFIX = ".bak"
CORRUPT_INFIX = ".corrupt-"

Repair = Literal["ok", "fresh", "restored", "rebuilt"]


def backup_path(config_path: str | os.PathLike) -> Path:
    """Where the previous good version of a datastore file is kept."""
    path = Path(config_path)
    return path.with_name(path.name + BACKUP_SUFFIX)


def is_valid_datastore(data: bytes) -> bool:
    """Whether ``data`` is a datastore file stock MONAI Label can load (the same validation it runs)."""
    if not data.strip():
        return False
    try:
        LocalDatastoreModel.model_validate_json(data)
    except ValueError:  # pydantic's ValidationError, JSON and Unicode errors
        return False
    return True


def is_loadable(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable, valid datastore file."""
    try:
        return is_valid_datastore(Path(path).read_bytes())
    except OSError:
        return False


def _set_aside(path: Path) -> Path:
    """Move a bad datastore file out of the way without overwriting an earlier one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}{CORRUPT_INFIX}{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}{CORRUPT_INFIX}{stamp}-{n}")
        n += 1
    os.replace(path, aside)
    fsync_dir(path.parent)
    return aside


def repair_datastore_file(config_path: str | os.PathLike) -> Repair:
    """Leave a loadable datastore file at ``config_path``, or none (stock then rebuilds it from the folder).

    Returns what was done: ``ok`` (nothing to do), ``fresh`` (no file and no backup: a new datastore),
    ``restored`` (from the backup), ``rebuilt`` (no usable backup; image and label info is lost, the
    files themselves are re-listed). Call with the datastore's lock held.
    """
    config = Path(config_path)
    if is_loadable(config):
        return "ok"
    backup = backup_path(config)
    if config.exists():
        aside = _set_aside(config)
        logger.warning("datastore file %s is empty or not a valid datastore; kept it as %s", config, aside.name)
    elif not backup.exists():
        return "fresh"
    if is_loadable(backup):
        atomic_copy(backup, config)
        logger.warning("restored datastore file %s from its backup %s; the last change before the crash "
                       "may be missing, images and labels on disk are re-listed", config, backup.name)
        return "restored"
    logger.warning("no valid backup %s: rebuilding datastore file %s from the images and labels in the "
                   "folder; their stored info (predictions) is lost", backup.name, config)
    return "rebuilt"


def with_single_file_dicom(extensions: Any) -> list[str]:
    """The datastore's file patterns plus ``*.dcm``: stock lists no DICOM file, so an ultrasound frame or
    cine loop dropped into the studies folder (one file each) was invisible. Only the folder's top level is
    listed, so a CT series kept in its own sub-folder does not become one study per slice."""
    patterns = list(extensions)
    return patterns if "*.dcm" in patterns else [*patterns, "*.dcm"]


class DurableLocalDatastore(LocalDatastore):
    """``LocalDatastore`` whose files are written atomically and whose JSON is repaired at start-up.

    Same constructor as the stock class; the repair runs before the stock start-up reads the file.
    """

    def __init__(
        self,
        datastore_path: str,
        images_dir: str = ".",
        labels_dir: str = "labels",
        datastore_config: str = "datastore_v2.json",
        extensions: Any = ("*.nii.gz", "*.nii"),
        auto_reload: bool = False,
        read_only: bool = False,
    ):
        os.makedirs(datastore_path, exist_ok=True)
        with FileLock(os.path.join(datastore_path, ".lock")):
            repair_datastore_file(os.path.join(datastore_path, datastore_config))
        super().__init__(datastore_path, images_dir=images_dir, labels_dir=labels_dir,
                         datastore_config=datastore_config, extensions=extensions,
                         auto_reload=auto_reload, read_only=read_only)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            handler.on_moved = self._on_moved_event
        #: called with a study's file whenever a client's request resolves it (next sample, download,
        #: infer): the server starts decoding it there (:mod:`oncofusion.serving.prefetch`)
        self.on_image_requested: Callable[[str], None] | None = None

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        if uri and self.on_image_requested is not None:
            self.on_image_requested(uri)
        return uri

    # -- the datastore file --------------------------------------------------------------------------
    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write the datastore file by atomic replacement, never by truncate-then-write."""
        if not lock:
            self._write_datastore_file()
            return
        with FileLock(self._lock_file):
            self._write_datastore_file()

    def _write_datastore_file(self) -> None:
        # serialised under the lock, as stock does: a concurrent writer cannot slip a stale state in
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        self._backup_datastore_file()
        atomic_write_text(self._datastore_config_path, text)
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _backup_datastore_file(self) -> None:
        """Keep the file about to be replaced as the backup, unless it is not a good one.

        Validated every time (a few ms for thousands of studies): the file may have been changed by
        another process or by hand since this one wrote it, and a bad file must never replace a good
        backup. Timestamps cannot tell: two writes within one kernel tick share an mtime. The new file
        replaces the name, never the content, of the old one, so the backup's bytes stay as they were.
        """
        config = self._datastore_config_path
        try:
            data = Path(config).read_bytes()
        except FileNotFoundError:
            return
        if not is_valid_datastore(data):
            logger.warning("datastore file %s is not a valid datastore; keeping the older backup", config)
            return
        try:
            # the file itself becomes the backup: nothing to write, and the sync of the new file's
            # folder, right after, makes both renames durable
            atomic_link(config, backup_path(config), sync_folder=False)
        except OSError:  # a file system without hard links
            atomic_write_bytes(backup_path(config), data)

    def _on_moved_event(self, event: Any) -> None:
        """Atomic writers (this class in another process, rsync, editors) rename a finished file into
        place: that is a modification of the datastore file, or a new image or label, for the stock
        watcher, which only listens to in-place writes and creations."""
        if event.dest_path == self._datastore_config_path:
            self._init_from_datastore_file()  # a no-op for this instance's own writes (same mtime)
        else:
            self._on_any_event(event)

    # -- images and labels ---------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Stock ``add_image``, with the image copied atomically (a crash leaves no half-written study)."""
        id, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or id
        name = self._filename(image_id, image_ext)
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), name))

        with FileLock(self._lock_file):
            atomic_copy(image_filename, dest)
            image_info = image_info if image_info else {}
            image_info["ts"] = int(time.time())
            image_info["name"] = name
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=image_info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Stock ``save_label``, with the label copied atomically (a crash leaves the previous label)."""
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)

        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            atomic_copy(label_filename, os.path.join(label_path, name))
            label_info = label_info if label_info else {}
            label_info["ts"] = int(time.time())
            label_info["name"] = name
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id
