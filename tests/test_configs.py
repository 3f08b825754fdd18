"""The shipped configs parse; the shipped model's recipe script soups the runs its configs make."""

import re
from pathlib import Path

import pytest

from app.config import load_config
from trainer.config import load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "app.yaml")


def test_app_config_parses():
    load_config(CONFIGS / "app.yaml")


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_training_configs_parse(path):
    load_train_config(path)


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
