"""Filtering and near-duplicate removal of scanned clips (``mugv curate``, step 4 and dedup).

A clip fails every check it does not pass, in the order of :data:`REASONS`; its ``reason`` is
the ``;``-joined list of failed checks (``""`` when kept). A metric that could not be measured
(NaN: a clip too short to sample) fails its check. The aesthetic check runs only on clips that
have a score (the scorer ran).

Dedup (after filtering, over every kept clip of the run): two clips are near duplicates when
each pair of their frame hashes (pHash, 64 bits, taken at the same relative positions) differs
in at most ``dedup_max_distance`` bits. Groups are the connected components of that relation
(union-find); each group keeps its best clip and the others get the reason ``duplicate``. The
best clip has the most source pixels, then the longest duration, then the highest aesthetic
score, then the highest sharpness, then the earliest source path and start frame (so the choice
is deterministic). The pairwise comparison is quadratic in the kept clips (numpy, chunked):
about 1e5 clips per run stay cheap.
"""

from __future__ import annotations

import math

import numpy as np

from mugv.config import CurateConfig

__all__ = ["REASONS", "dedup_groups", "filter_reasons", "select_clips"]

#: Rejection reasons, in the order they are checked and reported.
REASONS = (
    "too_short",
    "too_long",
    "low_resolution",
    "low_fps",
    "blurry",
    "over_sharp",
    "static",
    "too_much_motion",
    "dark",
    "overexposed",
    "black_frames",
    "frozen_frames",
    "low_aesthetic",
    "duplicate",
)


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _below(x, lo: float) -> bool:
    return _nan(x) or x < lo


def _above(x, hi: float) -> bool:
    """``x > hi``, with ``hi <= 0`` meaning no limit; NaN fails."""
    return _nan(x) or (hi > 0 and x > hi)


def filter_reasons(clip: dict, video: dict, cfg: CurateConfig) -> list[str]:
    """The checks ``clip`` (of ``video``, records of :func:`~mugv.data.curate.scan.scan_video`) fails.

    Returns:
        The failed reasons in :data:`REASONS` order; empty when the clip is kept.
    """
    out = []
    if clip["duration_s"] < cfg.min_duration or clip["num_frames"] < 2:
        out.append("too_short")
    if cfg.max_duration > 0 and clip["duration_s"] > cfg.max_duration:
        out.append("too_long")
    if min(video["width"], video["height"]) < cfg.min_short_side:
        out.append("low_resolution")
    if video["fps"] < cfg.min_fps:
        out.append("low_fps")
    if _below(clip["sharpness"], cfg.min_sharpness):
        out.append("blurry")
    elif _above(clip["sharpness"], cfg.max_sharpness):
        out.append("over_sharp")
    if _below(clip["motion"], cfg.min_motion):
        out.append("static")
    elif _above(clip["motion"], cfg.max_motion):
        out.append("too_much_motion")
    if _below(clip["brightness"], cfg.min_brightness):
        out.append("dark")
    elif _above(clip["brightness"], cfg.max_brightness):
        out.append("overexposed")
    if _above(clip["black_fraction"], cfg.max_black_fraction):
        out.append("black_frames")
    if _above(clip["frozen_fraction"], cfg.max_frozen_fraction):
        out.append("frozen_frames")
    if not _nan(clip.get("aesthetic")) and clip["aesthetic"] < cfg.min_aesthetic:
        out.append("low_aesthetic")
    return out


def _hash_matrix(hashes: list[list[str]]) -> np.ndarray:
    k = max(len(h) for h in hashes)
    m = np.zeros((len(hashes), k), np.uint64)
    for i, h in enumerate(hashes):
        if len(h) != k:
            raise ValueError(f"dedup_groups: clip {i} has {len(h)} hashes, expected {k}")
        m[i] = [int(x, 16) for x in h]
    return m


def dedup_groups(hashes: list[list[str]], max_distance: int, chunk: int = 1024) -> list[int]:
    """Group clips whose frame hashes all lie within ``max_distance`` bits of each other's.

    Args:
        hashes: per clip, its frame hashes as hex strings (the same count for every clip).
        max_distance: largest Hamming distance (bits, >= 0) per frame pair of duplicates.
        chunk: rows compared per numpy step (memory ``chunk x len(hashes)``).

    Returns:
        ``[N]`` group ids: the smallest clip index of each connected component.

    Raises:
        ValueError: ``max_distance < 0`` or clips with different hash counts.
    """
    if max_distance < 0:
        raise ValueError(f"dedup_groups: max_distance must be >= 0, got {max_distance}")
    n = len(hashes)
    if n == 0:
        return []
    m = _hash_matrix(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(0, n, chunk):
        blk = m[a : a + chunk]
        dist = np.bitwise_count(blk[:, None, :] ^ m[None, :, :]).max(axis=-1)  # [chunk, N]
        for i, j in zip(*np.nonzero(dist <= max_distance)):
            i, j = int(i) + a, int(j)
            if j > i:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def _rank(clip: dict, video: dict) -> tuple:
    aest = clip.get("aesthetic")
    sharp = clip.get("sharpness")
    return (
        -video["width"] * video["height"],
        -clip["duration_s"],
        0.0 if _nan(aest) else -aest,
        0.0 if _nan(sharp) else -sharp,
        video["source"],
        clip["start_frame"],
    )


def select_clips(videos: list[dict], cfg: CurateConfig) -> list[dict]:
    """Filter and deduplicate the clips of scanned videos.

    Args:
        videos: records of :func:`~mugv.data.curate.scan.scan_video` (failed ones are ignored).
        cfg: thresholds and dedup settings.

    Returns:
        One row per clip, in video then clip order: the clip's fields plus ``source``,
        ``width``, ``height``, ``fps``, ``kept`` (bool), ``reason`` (``;``-joined) and
        ``dup_group`` (index of the group's kept clip in the returned list, or -1).
    """
    rows, owners = [], []
    for v in videos:
        if v["status"] != "ok":
            continue
        for c in v["clips"]:
            reasons = filter_reasons(c, v, cfg)
            rows.append({"source": v["source"], "width": v["width"], "height": v["height"], "fps": v["fps"], **c,
                         "kept": not reasons, "reason": ";".join(reasons), "dup_group": -1})
            owners.append(v)
    if cfg.dedup:
        cand = [i for i, r in enumerate(rows) if r["kept"] and r["phash"]]
        groups = dedup_groups([rows[i]["phash"] for i in cand], cfg.dedup_max_distance)
        members: dict[int, list[int]] = {}
        for i, g in zip(cand, groups):
            members.setdefault(g, []).append(i)
        for idx in members.values():
            if len(idx) < 2:
                continue
            best = min(idx, key=lambda i: _rank(rows[i], owners[i]))
            for i in idx:
                rows[i]["dup_group"] = best
                if i != best:
                    rows[i]["kept"] = False
                    rows[i]["reason"] = "duplicate"
    return rows
