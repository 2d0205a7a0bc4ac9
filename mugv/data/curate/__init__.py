"""``mugv curate``: raw videos -> shot clips with quality metrics, filtered and deduplicated.

The data-curation stage of MUG-V (arXiv 2510.17519, data processing): shot detection
(PySceneDetect), sharpness (Laplacian variance), motion (optical flow), brightness and
black/frozen frames, an optional aesthetic score, and near-duplicate removal (imagehash).

- :mod:`.metrics`: the per-frame metrics;
- :mod:`.scan`: :func:`scan_video`, the pure per-video step (decode, split, score);
- :mod:`.select`: filtering and dedup;
- :mod:`.run`: :func:`curate`, the orchestration (resume, process pool or Ray);
- :mod:`.report`: ``clips.csv``, ``report.json``, ``report.html``.
"""

from mugv.config import CurateConfig
from mugv.data.curate.report import read_clips_csv
from mugv.data.curate.run import curate
from mugv.data.curate.scan import scan_video
from mugv.data.curate.select import select_clips

__all__ = ["CurateConfig", "curate", "read_clips_csv", "scan_video", "select_clips"]
