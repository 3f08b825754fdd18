"""The file suffixes the project reads as photos and as videos: one set each, for every command
that walks a folder or tells a photo from a video (enroll, eval ident, data prepare, training
folders). Lower-case, with the dot; compare with `path.suffix.lower()`."""

from __future__ import annotations

# Every still format OpenCV's imdecode reads in the wheels we ship (PNM covers .pgm/.ppm).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".ppm", ".pnm", ".tif", ".tiff"}
)
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".gif", ".ts", ".m4v"})
