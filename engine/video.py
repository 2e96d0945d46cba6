"""H.264 (yuv420p) mp4 encoding and probing with PyAV (FFmpeg's libraries)."""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import InvalidRequestError


@dataclass
class VideoInfo:
    path: str
    bytes: int
    sha256: str
    width: int
    height: int
    num_frames: int
    fps: float
    duration: float
    encode_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 16, crf: int = 18) -> VideoInfo:
    """Encode uint8 frames [F, H, W, 3] as H.264 yuv420p mp4 with exactly F frames at `fps`."""
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InvalidRequestError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise InvalidRequestError(f"yuv420p needs even width and height, got {w}x{h}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    start = time.perf_counter()
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": str(crf), "preset": "veryfast", "movflags": "+faststart"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    encode_seconds = time.perf_counter() - start
    return VideoInfo(path=str(path), bytes=path.stat().st_size, sha256=_sha256(path), width=w, height=h,
                     num_frames=n, fps=float(fps), duration=n / fps, encode_seconds=encode_seconds)


def probe_video(path: str | os.PathLike, *, return_frames: bool = False):
    """Decode every frame (not just the header) and report what is really in the file.

    With return_frames=True returns (VideoInfo, uint8 array [F, H, W, 3])."""
    import av

    decoded = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.base_rate or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
        count = 0
        for frame in container.decode(stream):
            count += 1
            if return_frames:
                decoded.append(frame.to_ndarray(format="rgb24"))
    info = VideoInfo(path=str(path), bytes=Path(path).stat().st_size, sha256=_sha256(path), width=width,
                     height=height, num_frames=count, fps=fps, duration=count / fps if fps else 0.0)
    if return_frames:
        return info, np.stack(decoded) if decoded else np.zeros((0, height, width, 3), np.uint8)
    return info
