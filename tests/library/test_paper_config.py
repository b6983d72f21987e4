"""configs/paper.yaml, the paper's experiment, validates and loads against tiny fake ImageFolders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from xbar.data import check_dataset, load_task_data
from xbar.params import parse_params

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"


def fake_folder(root: Path, classes: int = 3, per_class: int = 5) -> str:
    rng = np.random.default_rng(len(str(root)))
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):  # odd sizes: every image is resized to image_size, then cropped
            Image.fromarray(rng.integers(0, 256, (300 + i, 260, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    return str(root)


def test_paper_config_validates_and_loads_fake_imagefolders(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text())
    raw["model"]["weights"] = str(tmp_path / "resnet50.pth")
    raw["source"]["dataset"]["root"] = fake_folder(tmp_path / "imagenet", classes=4)
    for name, spec in raw["tasks"].items():
        spec["dataset"]["root"] = fake_folder(tmp_path / name)
    params = parse_params(raw, str(CONFIG))
    assert list(params.tasks) == ["cubs", "cars", "flowers", "wikiart", "sketch"]  # the paper's five
    assert (params.model.name, params.crossbar.rows, params.crossbar.weight_bits, params.quant.act_bits) == \
        ("resnet50", 72, 4, 4)
    assert params.source.epochs == 0 and params.quant.max_train and params.train.bn == "frozen"
    for spec in (params.source, *params.tasks.values()):
        check_dataset(spec.dataset)
        data = load_task_data(spec.dataset, params.seed)
        assert tuple(data.test[0][0].shape) == (3, 224, 224)
        assert tuple(data.fit_train[0][0].shape) == (3, 224, 224)
    assert all(t.method == "xma2" and t.spare_ratio == 0.1 and t.shift_levels == 3 for t in params.tasks.values())
