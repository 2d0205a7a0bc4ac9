"""Per-frame quality metrics of ``mugv curate`` (OpenCV and imagehash), on host arrays.

Frames are ``uint8`` ``[H, W]`` grayscale (luma) or ``[H, W, 3]`` BGR, as OpenCV expects.

- sharpness: the variance of the Laplacian (``cv2.Laplacian``, 3x3 aperture) of a grayscale
  frame, the classic focus measure (Pech-Pacheco et al., "Diatom autofocusing in brightfield
  microscopy", ICPR 2000). It depends on the frame size, so :mod:`.scan` measures it at one
  working size.
- motion: the mean magnitude of dense optical flow between two consecutive frames, in pixels
  per frame at the size of the frames given: OpenCV DIS (Kroeger et al., ECCV 2016, ultrafast
  preset) or Farneback (SCIA 2003).
- perceptual hash: imagehash's DCT pHash, 64 bits, for near-duplicate detection; distances are
  Hamming distances in bits.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FLOW_METHODS", "hamming", "laplacian_variance", "flow_magnitude", "phash_hex"]

#: Optical-flow methods :func:`flow_magnitude` accepts.
FLOW_METHODS = ("dis", "farneback")


def _check_gray(name: str, img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8 or img.ndim != 2 or img.size == 0:
        raise ValueError(f"{name}: expected a non-empty uint8 [H, W] grayscale frame, got {img.dtype} {img.shape}")


def laplacian_variance(gray: np.ndarray) -> float:
    """Sharpness of one frame: the variance of its Laplacian.

    Args:
        gray: ``uint8`` ``[H, W]`` luma.

    Returns:
        The variance (``float``, units of luma^2; 0 for a flat frame).

    Raises:
        TypeError: not a numpy array. ValueError: not a non-empty ``uint8 [H, W]`` frame.
    """
    import cv2

    _check_gray("laplacian_variance", gray)
    _, std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F, ksize=1))
    return float(std[0, 0]) ** 2


def flow_magnitude(prev: np.ndarray, nxt: np.ndarray, method: str = "dis") -> float:
    """Mean optical-flow magnitude from ``prev`` to ``nxt``, in pixels per frame at their size.

    Args:
        prev, nxt: ``uint8`` ``[H, W]`` luma of two consecutive frames (same shape).
        method: ``"dis"`` (OpenCV DIS optical flow, ultrafast preset) or ``"farneback"``.

    Returns:
        ``mean(sqrt(u^2 + v^2))`` over the pixels (``float``, >= 0).

    Raises:
        TypeError / ValueError: not ``uint8 [H, W]`` frames, shapes differ, unknown ``method``.
    """
    import cv2

    _check_gray("flow_magnitude(prev)", prev)
    _check_gray("flow_magnitude(nxt)", nxt)
    if prev.shape != nxt.shape:
        raise ValueError(f"flow_magnitude: frames differ in shape, {prev.shape} vs {nxt.shape}")
    if method == "dis":
        # A fresh instance per call: a reused DIS object carries state between calls.
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        flow = dis.calc(np.ascontiguousarray(prev), np.ascontiguousarray(nxt), None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    else:
        raise ValueError(f"flow_magnitude: method must be one of {FLOW_METHODS}, got {method!r}")
    return float(cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1]))[0])


def phash_hex(bgr: np.ndarray) -> str:
    """The 64-bit imagehash pHash of a frame, as 16 hex digits.

    Args:
        bgr: ``uint8`` ``[H, W, 3]`` (BGR) or ``[H, W]`` frame.

    Raises:
        ValueError: not a non-empty ``uint8`` frame.
    """
    import imagehash
    from PIL import Image

    if not isinstance(bgr, np.ndarray) or bgr.dtype != np.uint8 or bgr.ndim not in (2, 3) or bgr.size == 0:
        raise ValueError(f"phash_hex: expected a non-empty uint8 frame, got {getattr(bgr, 'shape', type(bgr))}")
    img = Image.fromarray(bgr[..., ::-1].copy() if bgr.ndim == 3 else bgr)
    return str(imagehash.phash(img, hash_size=8))


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes of equal length.

    Raises:
        ValueError: lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"hamming: hashes differ in length ({len(a)} vs {len(b)} hex digits)")
    return (int(a, 16) ^ int(b, 16)).bit_count()
