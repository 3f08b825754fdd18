"""Model soups: the averaged artifact holds the mean of its ingredients' weights and loads."""

import json

import pytest
import torch

from app.cli import main
from tests.conftest import tiny_artifact
from trainer.artifact import load_model
from trainer.preprocess import to_input
from trainer.soup import soup

pytestmark = pytest.mark.unit


def _artifact(path, seed, **arch):
    out = tiny_artifact(path, seed, version=str(seed), **arch)
    return out, load_model(out)[0].state_dict()


@pytest.mark.slow
def test_soup_is_the_mean_of_the_ingredients(tmp_path, real_faces):
    (a, sa), (b, sb), (c, sc) = (_artifact(tmp_path / n, i) for i, n in enumerate("abc"))
    out = soup([a, b, c], tmp_path / "soup", name="facemoe-edge", version="1.0.0")
    model, manifest = load_model(out)  # checksum verified
    got = model.state_dict()
    for key, value in sa.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], (value + sb[key] + sc[key]) / 3, msg=key)
        else:
            assert torch.equal(got[key], value), key
    assert [i["version"] for i in manifest["training"]["soup"]] == ["0", "1", "2"]
    with torch.no_grad():
        emb = model(torch.from_numpy(to_input(real_faces["crops"][:4])))
    assert torch.isfinite(emb).all()


def test_soup_refuses_different_architectures(tmp_path):
    a, _ = _artifact(tmp_path / "a", 0)
    b, _ = _artifact(tmp_path / "b", 1, top_k=1)
    with pytest.raises(ValueError, match="architecture differs"):
        soup([a, b], tmp_path / "soup", name="x", version="1")
    with pytest.raises(ValueError, match="at least two"):
        soup([a], tmp_path / "soup", name="x", version="1")


def test_soup_cli(tmp_path, capsys):
    a, _ = _artifact(tmp_path / "a", 0)
    b, _ = _artifact(tmp_path / "b", 1)
    assert main(["soup", str(a), str(b), "--out", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(tmp_path / "s")
    c, _ = _artifact(tmp_path / "c", 2, top_k=1)
    assert main(["soup", str(a), str(c), "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err.strip()
    assert "architecture differs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()
