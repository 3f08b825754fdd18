"""`facemoe use-model DIR`: switch the product to a model (a site fine-tune, or back) in one
command: the gallery's templates are re-embedded from their stored crops with DIR's model, then
the app config's `model.dir` is set to DIR. The gallery is re-embedded first: if the config
cannot be written, running the command again finishes the switch (the gallery then already
holds DIR's model and is re-embedded again, which is harmless).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.config import ConfigError, load_config
from app.fsutil import atomic_write
from app.gallery import Gallery
from app.gallery.reembed import ReembedReport
from app.runtime import make_embedder

_TOP = re.compile(r"^[A-Za-z_][\w-]*\s*:")


def set_model_dir(text: str, model_dir: str) -> str:
    """The config text with `model.dir` set to `model_dir` (other lines and comments kept)."""
    lines = text.splitlines()
    value = json.dumps(model_dir)  # a YAML double-quoted string
    start = next((i for i, ln in enumerate(lines) if re.match(r"^model\s*:", ln)), None)
    if start is None:
        return text.rstrip("\n") + f"\nmodel:\n  dir: {value}\n" if text.strip() else \
            f"model:\n  dir: {value}\n"
    if lines[start].split(":", 1)[1].split("#", 1)[0].strip():
        raise ConfigError("the config's model section is written inline (model: {...}): write "
                          "it as a block to let use-model set model.dir")
    end = next((i for i in range(start + 1, len(lines)) if _TOP.match(lines[i])), len(lines))
    for i in range(start + 1, end):
        m = re.match(r"^(\s+)dir\s*:", lines[i])
        if m:
            lines[i] = f"{m.group(1)}dir: {value}"
            break
    else:
        indent = next((re.match(r"^(\s+)", ln).group(1) for ln in lines[start + 1:end]
                       if ln.strip() and not ln.lstrip().startswith("#")), "  ")
        lines.insert(start + 1, f"{indent}dir: {value}")
    return "\n".join(lines) + "\n"


def use_model(config_path: str | Path, model_dir: str | Path,
              gallery: str | None = None) -> ReembedReport:
    """Re-embed the configured gallery (or `gallery`) with `model_dir`, then point the config
    at it. ConfigError/GalleryError/BackendError with one line on bad input; nothing changes
    when the model cannot be loaded."""
    path = Path(config_path)
    cfg = load_config(path)
    model_dir = str(Path(model_dir))
    if not (Path(model_dir) / "manifest.json").is_file():
        raise ConfigError(f"not a model directory (no manifest.json): {model_dir}")
    new_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dir": model_dir})})
    embedder = make_embedder(new_cfg)
    g = Gallery(gallery or cfg.gallery.path, embedder.model_name, embedder.model_version,
                create=False, adopt_model=True)
    try:
        report = g.reembed(embedder)
    finally:
        g.close()
    text = set_model_dir(path.read_text(), model_dir)
    with atomic_write(path, path.stat().st_mode & 0o777) as fh:
        fh.write(text.encode())
    load_config(path)  # the written config still validates
    return report
