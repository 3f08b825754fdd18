"""The shipped configs parse; the shipped model's recipe script soups the runs its configs make."""

import re
from pathlib import Path

import pytest
import yaml

from app import paths
from app.config import ConfigError, load_config
from tests.conftest import facemoe
from trainer.config import load_train_config
from trainer.site import load_site_config

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = sorted(p for p in CONFIGS.rglob("*.yaml")
               if p.name != "app.yaml" and not p.name.startswith("finetune-site"))
SITE = sorted(CONFIGS.glob("finetune-site*.yaml"))  # trainer.site recipes


def _leaves(node, path=()):
    """(path, value) of every scalar or list setting of a parsed YAML mapping."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, node


def test_app_config_parses():
    """Every setting the shipped config writes reaches the config object (none is dropped or
    changed on the way; relative paths are resolved by app.paths)."""
    path = CONFIGS / "app.yaml"
    loaded = load_config(path).model_dump(mode="json")
    settings = list(_leaves(yaml.safe_load(path.read_text())))
    assert len(settings) > 20
    for keys, value in settings:
        got = loaded
        for key in keys:
            got = got[key]
        if isinstance(value, str) and keys[-1] in ("dir", "path"):
            value = str(paths.resolve(value))
        assert got == value, (".".join(keys), value, got)


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_training_configs_parse(path):
    load_train_config(path)


@pytest.mark.parametrize("path", SITE, ids=lambda p: p.name)
def test_site_recipes_parse(path):
    cfg = load_site_config(path)
    assert cfg.model.init_from and cfg.data.anchor_pool


def test_recipe_script_soups_the_runs_its_configs_write():
    script = (CONFIGS / "train-edge.sh").read_text()
    trained = re.findall(r"facemoe train --config (\S+)", script)
    assert trained == [
        "configs/train-edge.yaml",
        "configs/train-edge-warm.yaml",
        "configs/train-edge-kd.yaml",
    ]
    out_dirs = [load_train_config(CONFIGS.parent / c).run.out_dir for c in trained]
    soup = re.search(r"facemoe soup (.*?)\n(?!\s)", script.replace("$facemoe", "facemoe"), re.S)
    ingredients = [w for w in soup.group(1).split() if w.endswith("/model") and "soup" not in w]
    assert ingredients == [f"{d}/model" for d in out_dirs]
    # the restarts start from run 1's artifact
    for c in trained[1:]:
        assert load_train_config(CONFIGS.parent / c).model.init_from == f"{out_dirs[0]}/model"


@pytest.mark.parametrize(
    "section, bad, where",
    [
        ("tracker", "match_iou: 1.5", "tracker.match_iou"),
        ("tracker", "low_match_iou: -0.1", "tracker.low_match_iou"),
        ("tracker", "min_hits: 0", "tracker.min_hits"),
        ("tracker", "max_missed: 0", "tracker.max_missed"),
        ("tracker", "max_center_shift: 0", "tracker.max_center_shift"),
        ("tracker", "low_thresh: 0.7, high_thresh: 0.6", "low_thresh (0.7) must not exceed"),
        ("embed", "every_n: 0", "embed.every_n"),
        ("embed", "max_per_track: 0", "embed.max_per_track"),
    ],
)
def test_bad_tracker_and_embed_values_are_refused(tmp_path, section, bad, where):
    path = tmp_path / "app.yaml"
    path.write_text(f"{section}: {{{bad}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value) and f"{where}" in str(info.value)


def test_every_tracker_value_is_settable_and_is_what_the_stages_take(tmp_path):
    """One type per section: the YAML section is the object Tracker and TrackAggregator take."""
    from app.aggregate import TrackAggregator
    from app.track import Tracker

    path = tmp_path / "app.yaml"
    path.write_text(
        "tracker: {low_match_iou: 0.7, max_center_shift: 0.5, min_hits: 3}\n"
        "embed: {first_n: 1}\n"
    )
    cfg = load_config(path)
    tracker = Tracker(cfg.tracker)
    assert tracker.config is cfg.tracker
    assert (tracker.config.low_match_iou, tracker.config.max_center_shift) == (0.7, 0.5)
    assert TrackAggregator("cam", cfg.embed).policy.first_n == 1
    assert Tracker().config.min_hits == load_config(CONFIGS / "app.yaml").tracker.min_hits == 2


@pytest.mark.parametrize("threshold", ["-1", "2.5", ".nan", "1"])
@pytest.mark.parametrize("command", ["process", "run"])
def test_validate_config_refuses_thresholds_out_of_range(tmp_path: Path, command: str,
                                                         threshold: str) -> None:
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"matching:\n  min_frames: 2\n  threshold: {threshold}\n")
    proc = facemoe(command, "--config", str(cfg), "--validate-config")
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "matching.threshold (line 3)" in lines[0], proc.stderr
    assert "(-1, 1)" in lines[0]


def test_validate_config_warns_outside_sane_band_and_accepts(tmp_path: Path) -> None:
    cfg = tmp_path / "app.yaml"  # run refuses a config without a camera
    cfg.write_text("matching:\n  threshold: -0.5\ncameras:\n  - name: door\n"
                   "    uri: /dev/video0\n")
    proc = facemoe("run", "--config", str(cfg), "--validate-config")
    assert proc.returncode == 0 and proc.stdout.strip() == "config ok", proc.stderr
    assert "almost everyone will be named" in proc.stderr


def test_config_reports_every_error_with_lines(tmp_path: Path) -> None:
    from app.config import ConfigError, load_config

    cfg = tmp_path / "app.yaml"
    cfg.write_text(
        "embed:\n"
        "  every_n: 0\n"            # line 2: would raise ValueError in process
        "  min_gain: -1\n"          # line 3
        "daemon:\n"
        "  metrics_port: 70000\n"   # line 5
        "  reconnect:\n"
        "    initial_s: 10\n"
        "    max_s: 1\n"            # line 8 area: max_s < initial_s
        "  mqtt:\n"
        "    host: localhost\n"
        "    port: 0\n"             # line 11
        "cameras:\n"
        "  - name: a\n"
        "    uri: rtsp://127.0.0.1/x\n"
        "    threshold: 3\n")       # line 15
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    text = str(info.value)
    assert "\n" not in text and "6 errors" in text, text
    for part in ("embed.every_n (line 2)", "embed.min_gain (line 3)",
                 "daemon.metrics_port (line 5)", "daemon.reconnect (line 7)",
                 "daemon.mqtt.port (line 11)", "cameras.0.threshold (line 15)"):
        assert part in text, (part, text)


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "app.yaml"
    cfg.write_bytes(b"gallery:\n  path: caf\xe9.db\n")
    proc = facemoe("process", "--config", str(cfg), "--validate-config")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"facemoe: error: {cfg}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"]


def test_shipped_configs_still_validate() -> None:
    """Each shipped app config loads, and what it resolves to is itself a valid config that
    means the same (the resolved config written next to outputs can be read back)."""
    from app.config import AppConfig, load_config

    root = Path(__file__).resolve().parent.parent / "configs"
    shipped = sorted(root.glob("app*.yaml"))
    assert shipped
    for path in shipped:
        cfg = load_config(path)
        assert AppConfig.model_validate(cfg.model_dump(mode="json")) == cfg, path
