"""Find the bundles the app serves: every ``<bundles>/<name>/configs/metadata.json``.

A model is added to the server by adding a bundle folder, not by editing the app.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def discover_bundles(bundles_dir: str | os.PathLike, models: str = "all") -> dict[str, Path]:
    """Bundle name (its directory) -> path, for ``models`` = ``"all"`` or a comma list of names.

    An unknown name fails start-up with the list of available bundles, rather than starting a server
    that silently lacks the model the user asked for.
    """
    root = Path(bundles_dir)
    if not root.is_dir():
        raise ValueError(f"bundles directory '{root}' not found: pass --conf bundles <dir>")
    found = {p.parent.parent.name: p.parent.parent for p in sorted(root.glob("*/configs/metadata.json"))}
    wanted = [m.strip() for m in (models or "all").split(",") if m.strip()]
    if not wanted or wanted == ["all"]:
        selected = found
    else:
        unknown = [m for m in wanted if m not in found]
        if unknown:
            raise ValueError(
                f"unknown model(s) {', '.join(unknown)} in --conf models; bundles in '{root}': "
                f"{', '.join(found) or 'none'}"
            )
        selected = {m: found[m] for m in wanted}
    if not selected:
        logger.warning("no bundle with configs/metadata.json under %s", root)
    return selected
