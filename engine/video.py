"""H.264 (yuv420p) mp4 encoding and probing with PyAV (FFmpeg's libraries)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from turboflow.errors import InvalidRequestError


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


def _check_size(width: int, height: int) -> None:
    if height % 2 or width % 2:
        raise InvalidRequestError(f"yuv420p needs even width and height, got {width}x{height}")


class Mp4Stream:
    """An H.264 (yuv420p) mp4 encoder fed in pieces: `put(frames)` as frames become available (e.g. per VAE decode
    chunk), `finish()` for the VideoInfo; `fps` is the model family's (`TurboVideoPipeline.fps`).
    With `background=True` a thread encodes while the caller produces the next piece, so encoding overlaps
    decoding; the file appears at `path` only when finished (written as `.part`)."""

    def __init__(
        self, path: str | os.PathLike, width: int, height: int, *, fps: int, crf: int = 18, background: bool = False
    ):
        import av

        _check_size(width, height)
        self.path, self.width, self.height, self.fps = Path(path), width, height, fps
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".part")
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": str(crf), "preset": "veryfast", "movflags": "+faststart"}
        self._stream, self._count, self.encode_seconds = stream, 0, 0.0
        self._state = "open"  # -> finished | aborted
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._drain, name="mp4-encode", daemon=True)
            self._thread.start()

    def put(self, frames: np.ndarray) -> None:
        """Append uint8 frames [N, H, W, 3] (copied when encoded in the background)."""
        if self._state != "open":
            raise RuntimeError(f"mp4 stream {self.path.name} is {self._state}; no more frames")
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise InvalidRequestError(
                f"frames must be uint8 [N, {self.height}, {self.width}, 3], got {frames.dtype} {frames.shape}"
            )
        if self._queue is None:
            self._encode(frames)
        elif self._error is None:
            self._queue.put(np.array(frames, copy=True))

    def _encode(self, frames: np.ndarray) -> None:
        import av

        start = time.perf_counter()
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self._count
            self._count += 1
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.encode_seconds += time.perf_counter() - start

    def _drain(self) -> None:
        while (frames := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._encode(frames)
                except BaseException as e:  # surfaced by finish()
                    self._error = e

    def finish(self) -> VideoInfo:
        """Flush, close and move the file into place; on any failure the partial file is removed."""
        if self._state != "open":
            raise RuntimeError(f"mp4 stream {self.path.name} is already {self._state}")
        try:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
            if self._error is not None:
                raise self._error
            if self._count == 0:
                raise InvalidRequestError("no frames were written to the video")
            start = time.perf_counter()
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            os.replace(self._tmp, self.path)
            self.encode_seconds += time.perf_counter() - start
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        n = self._count
        return VideoInfo(
            path=str(self.path),
            bytes=self.path.stat().st_size,
            sha256=_sha256(self.path),
            width=self.width,
            height=self.height,
            num_frames=n,
            fps=float(self.fps),
            duration=n / self.fps,
            encode_seconds=self.encode_seconds,
        )

    def abort(self) -> None:
        """Stop and delete the partial file (generation failed). Safe to call more than once; no-op once finished."""
        if self._state == "finished":
            return
        self._state = "aborted"
        if self._thread is not None and self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()
        with contextlib.suppress(Exception):
            self._container.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


def write_mp4(frames: np.ndarray, path: str | os.PathLike, *, fps: int, crf: int = 18) -> VideoInfo:
    """Encode uint8 frames [F, H, W, 3] as H.264 yuv420p mp4 with exactly F frames at `fps` (the model family's:
    `GenerationResult.fps`)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InvalidRequestError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    writer = Mp4Stream(path, frames.shape[2], frames.shape[1], fps=fps, crf=crf)
    try:
        writer.put(frames)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


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
    info = VideoInfo(
        path=str(path),
        bytes=Path(path).stat().st_size,
        sha256=_sha256(path),
        width=width,
        height=height,
        num_frames=count,
        fps=fps,
        duration=count / fps if fps else 0.0,
    )
    if return_frames:
        return info, np.stack(decoded) if decoded else np.zeros((0, height, width, 3), np.uint8)
    return info
