"""Where the product's files are: the one rule for the default config, the default model, the
face detector and every relative path in the config (README, "Install").

Two places are looked in:

- the home, where the product writes (the gallery, events, snapshots) and where the user may
  put their own config and models: `$FACEMOE_HOME`; else, in a source checkout (app/ next to
  pyproject.toml: `./install.sh`, `pip install -e .`, PYTHONPATH), the checkout itself; else
  (a wheel, `pip install .`) `$XDG_DATA_HOME/facemoe`, by default ~/.local/share/facemoe;
- the shipped files, read-only: in a checkout the checkout itself; in an installed copy the
  package data app/_shipped/ (configs/app.yaml, models/sface/, models/detector/; the
  wheel build copies them in, see setup.py).

The shared folder (`shared()`, $FACEMOE_SHARED) holds the test data and models beside a
checkout; only tests, benchmarks and the detector's last fallback look there.

A relative path names home/path when that exists, else the shipped path when that exists, else
home/path (where a new file is created). In a checkout without FACEMOE_HOME both places are the
checkout, so paths resolve against it as they always have.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent
# the source checkout this code runs from, or None in an installed copy (site-packages)
CHECKOUT: Path | None = SOURCE_ROOT if (SOURCE_ROOT / "pyproject.toml").is_file() else None
SHIPPED_DIR = "_shipped"  # the package data directory inside app/ of an installed copy
DEFAULT_CONFIG = Path("configs", "app.yaml")


def home() -> Path:
    """The writable home: $FACEMOE_HOME, the checkout, or $XDG_DATA_HOME/facemoe."""
    if os.environ.get("FACEMOE_HOME"):
        return Path(os.environ["FACEMOE_HOME"]).expanduser()
    if CHECKOUT is not None:
        return CHECKOUT
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data).expanduser() / "facemoe"


def shipped() -> Path:
    """The directory of the shipped config and models: the checkout, or the package data."""
    if CHECKOUT is not None:
        return CHECKOUT
    data = resources.files(__package__) / SHIPPED_DIR
    if not isinstance(data, Path):  # a zip import: the models must be files ONNX Runtime opens
        raise RuntimeError(f"facemoe must be installed as files, not zipped ({data})")
    return data


def candidates(path: str | Path) -> list[Path]:
    """The places a relative path may name, in the order they are tried."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return [p]
    places = [home() / p, shipped() / p]
    return places if places[0] != places[1] else places[:1]


def resolve(path: str | Path) -> Path:
    """A config path made absolute: the first of `candidates(path)` that exists, else the
    home's (where a file that does not exist yet is created)."""
    places = candidates(path)
    return next((p for p in places if p.exists()), places[0])


def shared() -> Path:
    """The shared data and models folder beside a checkout (tests, benchmarks, the detector's
    last fallback): $FACEMOE_SHARED, else <source root>/../shared. Nothing checks it exists."""
    return Path(os.environ.get("FACEMOE_SHARED") or SOURCE_ROOT.parent / "shared").expanduser()


def default_config() -> Path:
    """The config read when none is given: home/configs/app.yaml, else the shipped one."""
    return resolve(DEFAULT_CONFIG)
