"""Training that holds beyond the default benchmark: every method on a grid of task sizes, epochs and backbones.

    python -m benchmarks.robustness [--json] [--quick]

Builds its own two backbones in memory (nothing is downloaded or written):

- `small`: the small ResNet (params.yaml's model) on 28x28 grey images, pretrained
  briefly on a Fashion-MNIST subset and quantized (calibration + one QAT epoch);
- `resnet18`: torchvision's ResNet-18 on 32x32 RGB crops of photos that
  scikit-image ships, pretrained and quantized the same way on 12 photos.

Every method learns every task of the grid on each backbone: task sizes from a
few images per class (fewer than a batch) to a full dataset, for 1, 2 and the
default number of epochs. Each row reports the final loss (`train_task`'s: the
trained model's loss on its training images), the test accuracy, the step whose
checkpoint was kept on held-out images (0: the closed-form head), and the test
accuracy of a linear probe (logistic regression on the frozen backbone's
features: the floor every method should clear). A run the divergence guard
stops counts as diverged. The goals, printed at the end:

- no divergence anywhere;
- every method at or above the probe on every setting;
- XMA2 at or above XMA and Piggyback on the suite's average.

`--quick` runs one epoch setting and the smallest tasks (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from xbar.crossbar import mapped_layers
from xbar.data import TaskData, load_task_data, stratified_split
from xbar.errors import UserError
from xbar.methods import backbone_net, crossbar_spec, deploy_cells, names
from xbar.methods.recipe import MIN_STEPS
from xbar.models import build_model, input_statistics
from xbar.params import Params, TaskSpec, load_params, parse_params
from xbar.quant import calibrate, clip_parameters, export_levels, quantize_model
from xbar.step import Backbone, learn, rank, selected_pes
from xbar.training import as_input, fit, optimizer_steps, seed_everything

DEFAULT_EPOCHS = TaskSpec.model_fields["epochs"].default
EPOCHS = (1, 2, DEFAULT_EPOCHS)
RGB_SIZE = 32
# scikit-image's colour and grey photos: the RGB backbone's source classes, and the RGB task's four
RGB_SOURCE = ("astronaut", "chelsea", "rocket", "colorwheel", "camera", "brick", "grass", "gravel", "moon", "coins",
              "page", "clock")
RGB_TASK = ("coffee", "hubble_deep_field", "immunohistochemistry", "retina")


@dataclass(frozen=True)
class Setting:
    backbone: str
    task: str
    epochs: int


# --- data ---------------------------------------------------------------------------------------------


def photo(name: str) -> np.ndarray:
    """A scikit-image photo as uint8 [H, W, 3] (grey ones repeated over the channels)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (image * 255).astype(np.uint8) if image.max() <= 1 else image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def crops(image: np.ndarray, n: int, rng: np.random.Generator, rows: slice) -> torch.Tensor:
    """n random square crops (1/8 to 1/3 of the photo's side) from `rows` of the photo, resized to RGB_SIZE."""
    part = torch.from_numpy(np.ascontiguousarray(image[rows])).permute(2, 0, 1).float()
    h, w = part.shape[1:]
    side = min(h, w)
    out = []
    for _ in range(n):
        s = int(rng.integers(side // 8, side // 3 + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = part[:, y:y + s, x:x + s][None]
        if rng.random() < 0.5:
            crop = crop.flip(3)
        out.append(F.interpolate(crop, size=(RGB_SIZE, RGB_SIZE), mode="bilinear", antialias=True)[0])
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8)


def photo_task(photos: tuple[str, ...], n_train: int, n_test: int, seed: int) -> TaskData:
    """Which photo a crop comes from: training crops from each photo's upper two thirds, test crops
    from its lower third (no pixel in both splits)."""
    rng = np.random.default_rng(seed)
    xs, ys, tx, ty = [], [], [], []
    for label, name in enumerate(photos):
        image = photo(name)
        cut = image.shape[0] * 2 // 3
        xs.append(crops(image, n_train // len(photos), rng, slice(0, cut)))
        tx.append(crops(image, n_test // len(photos), rng, slice(cut, None)))
        ys += [label] * len(xs[-1])
        ty += [label] * len(tx[-1])
    x, y = torch.cat(xs), torch.tensor(ys)
    return TaskData(TensorDataset(x, y), TensorDataset(torch.cat(tx), torch.tensor(ty)), len(photos), 3,
                    f"rgb{n_train}", f"rgb{n_test}")


def subset(data: TaskData, n_train: int, seed: int) -> TaskData:
    """The task with a stratified, seeded subset of `n_train` training images (the test split unchanged)."""
    labels = np.asarray([int(data.train[i][1]) for i in range(len(data.train))])
    keep, _ = stratified_split(labels, 1e-9, seed, n_train)  # every image is a candidate for training
    x = torch.stack([data.train[int(i)][0] for i in keep])
    return TaskData(TensorDataset(x, torch.as_tensor(labels[keep])), data.test, data.num_classes, data.channels,
                    f"{data.train_digest}:{len(keep)}", data.test_digest)


# --- backbones ----------------------------------------------------------------------------------------


def build_backbone(params: Params, source: TaskData, epochs: int) -> Backbone:
    """Pretrain (one-cycle SGD) and quantize (calibration + one QAT epoch) as the pipeline's stages do."""
    seed_everything(params.seed, params.train.threads)
    model = build_model(params.model, source.num_classes, source.channels)
    model.input_norm.set(*input_statistics(params.model, source.train, source.channels))
    opt = torch.optim.SGD(model.parameters(), lr=params.source.lr, momentum=params.train.momentum,
                          weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(source.train) / params.train.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, params.source.lr, total_steps=steps)
    fit(model, source.train, [opt], epochs, params.train.batch_size, params.seed, "pretrain", after_step=sched.step)
    quantize_model(model, params.crossbar.weight_bits, params.quant.act_bits)
    n = len(source.train)
    calibrate(model, as_input(torch.stack([source.train[i][0] for i in range(0, n, max(1, n // 256))][:256])))
    clips = {id(p) for p in clip_parameters(model)}
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if id(p) not in clips], "weight_decay": 5e-4},
                           {"params": clip_parameters(model), "weight_decay": 0.0}],
                          lr=params.quant.lr, momentum=params.train.momentum, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, math.ceil(n / params.train.batch_size))
    fit(model, source.train, [opt], 1, params.train.batch_size, params.seed, "quantize", after_step=sched.step)
    mapped = {name for name, _ in mapped_layers(model)}
    levels = {k: v for k, v in export_levels(model).items() if k in mapped}
    quant = {"state_dict": model.state_dict(), "num_classes": source.num_classes, "channels": source.channels}
    return Backbone(quant, levels)


def backbone_params(base: Params, rgb: bool) -> Params:
    raw = base.model_dump()
    raw["tasks"] = {}
    if rgb:
        raw["model"] = {"name": "resnet18"}
        raw["source"]["dataset"] = {"source": "imagefolder", "root": "package-photos", "channels": 3,
                                    "image_size": RGB_SIZE}
    return parse_params(raw)


# --- the linear probe ---------------------------------------------------------------------------------


@torch.no_grad()
def features(params: Params, backbone: Backbone, data) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    net = backbone_net(params, backbone.quant)
    deploy_cells(net, backbone.levels, crossbar_spec(params))
    net.eval()
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = np.asarray([int(data[i][1]) for i in range(len(data))])
    f = torch.cat([net.features(as_input(chunk)) for chunk in x.split(512)])
    return f.numpy().astype(np.float64), y


def probe_accuracy(params: Params, backbone: Backbone, data: TaskData) -> float:
    """Logistic regression (L2, C = 1, standardized features) on the frozen backbone's features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f, y = features(params, backbone, data.train)
    ft, yt = features(params, backbone, data.test)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(f, y)
    return float((clf.predict(ft) == yt).mean() * 100)


# --- one run ------------------------------------------------------------------------------------------


def run_method(params: Params, backbone: Backbone, data: TaskData, method: str, epochs: int, label: str) -> dict:
    spec = TaskSpec(dataset={"source": "optdigits"}, method=method, epochs=epochs,
                    rank_batch_size=min(64, len(data.train)))
    raw = params.model_dump()
    raw["tasks"] = {}
    run = parse_params(raw)
    seed_everything(run.seed, run.train.threads)
    began = time.perf_counter()
    try:
        spare = selected_pes(rank(run, spec, backbone, data)[0]) if method == "xma2" else None
        learned = learn(run, spec, backbone, data, f"{label} ({method})", spare)
    except UserError as err:
        return {"method": method, "diverged": True, "final_loss": None, "accuracy": None, "error": str(err),
                "seconds": round(time.perf_counter() - began, 1)}
    return {"method": method, "diverged": False, "final_loss": round(learned.final_loss, 4),
            "accuracy": round(learned.test_accuracy, 2), "kept_step": learned.model.kept_step,
            "head_fit": learned.model.head_fit,
            "seconds": round(time.perf_counter() - began, 1)}


# --- the grid -----------------------------------------------------------------------------------------


def grid(base: Params, quick: bool) -> tuple[dict, list[tuple[str, Params, Backbone, str, TaskData]]]:
    """The backbones (with their build times) and the (backbone, params, task name, data) of the grid."""
    seed = base.seed
    timing, tasks = {}, []
    small = backbone_params(base, rgb=False)
    began = time.perf_counter()
    source = load_task_data(small.source.dataset.model_copy(update={"max_train": 3000}), seed)
    small_bb = build_backbone(small, source, epochs=2)
    timing["small"] = round(time.perf_counter() - began, 1)
    optdigits = load_task_data(small.source.dataset.model_copy(update={"source": "optdigits", "max_train": None}),
                               seed)
    textures = load_task_data(small.source.dataset.model_copy(update={"source": "textures", "max_train": None}),
                              seed)
    lfw = load_task_data(small.source.dataset.model_copy(update={"source": "lfw_faces", "max_train": None}), seed)
    tasks.append(("small", small, small_bb, "optdigits-20", subset(optdigits, 20, seed)))
    tasks.append(("small", small, small_bb, "lfw_faces-160", lfw))
    if not quick:
        tasks.append(("small", small, small_bb, "textures-300", subset(textures, 300, seed)))
        tasks.append(("small", small, small_bb, "textures-2327", textures))

    rgb = backbone_params(base, rgb=True)
    began = time.perf_counter()
    rgb_source = photo_task(RGB_SOURCE, 1800, 240, seed)
    rgb_bb = build_backbone(rgb, rgb_source, epochs=3)
    timing["resnet18"] = round(time.perf_counter() - began, 1)
    rgb_task = photo_task(RGB_TASK, 800, 400, seed + 1)
    tasks.append(("resnet18", rgb, rgb_bb, "photos4-12", subset(rgb_task, 12, seed)))
    if not quick:
        tasks.append(("resnet18", rgb, rgb_bb, "photos4-800", rgb_task))
    return timing, tasks


def goals(rows: list[dict]) -> dict:
    diverged = [r for r in rows if r["diverged"]]
    below = [r for r in rows if not r["diverged"] and r["accuracy"] < r["probe"]]
    mean = {}
    for m in {r["method"] for r in rows}:
        accs = [r["accuracy"] or 0.0 for r in rows if r["method"] == m]  # a diverged run counts as 0
        mean[m] = sum(accs) / len(accs)
    return {
        "no_divergence": not diverged,
        "diverged": [f"{r['backbone']} {r['task']} {r['epochs']} ep {r['method']}" for r in diverged],
        "all_at_or_above_probe": not below,
        "below_probe": [f"{r['backbone']} {r['task']} {r['epochs']} ep {r['method']}: {r['accuracy']} < {r['probe']}"
                        for r in below],
        "mean_accuracy": {m: round(v, 2) for m, v in sorted(mean.items())},
        "xma2_at_or_above_xma_and_piggyback": mean.get("xma2", 0) >= max(mean.get("xma", 0), mean.get("piggyback", 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="one epoch setting, the smallest tasks")
    parser.add_argument("--methods", nargs="+", default=None)
    args = parser.parse_args()
    began = time.perf_counter()
    base = load_params(args.params)
    methods = args.methods or list(names())
    timing, tasks = grid(base, args.quick)
    rows = []
    for backbone_name, params, backbone, task, data in tasks:
        probe = round(probe_accuracy(params, backbone, data), 2)
        done: dict[tuple[str, int], dict] = {}  # (method, optimizer steps) -> its result
        for epochs in (1,) if args.quick else EPOCHS:
            # a tiny task's epoch settings can make the same number of steps (MIN_STEPS): the same run
            steps = optimizer_steps(len(data.train), epochs, params.train.batch_size, MIN_STEPS)
            for method in methods:
                row = {"backbone": backbone_name, "task": task, "train_images": len(data.train),
                       "classes": data.num_classes, "epochs": epochs, "steps": steps, "probe": probe}
                if (method, steps) not in done:
                    done[method, steps] = run_method(params, backbone, data, method, epochs,
                                                     f"{backbone_name} {task} {epochs} ep")
                row |= done[method, steps]
                rows.append(row)
                if not args.json:
                    acc = "diverged" if row["diverged"] else f"{row['accuracy']:6.2f}"
                    loss = "-" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
                    print(f"{backbone_name:9s} {task:14s} {epochs:2d} ep {method:18s} loss {loss:>8s}  "
                          f"accuracy {acc}  probe {probe:6.2f}  kept step {row.get('kept_step')}  "
                          f"head {row.get('head_fit')}  "
                          f"({row['seconds']:.0f} s)", flush=True)
    result = {"rows": rows, "goals": goals(rows), "backbone_seconds": timing,
              "seconds": round(time.perf_counter() - began, 1)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    g = result["goals"]
    print(f"\nmean test accuracy over the suite: " + ", ".join(f"{m} {v:.2f}" for m, v in g["mean_accuracy"].items()))
    print(f"goal: no divergence anywhere: {'met' if g['no_divergence'] else 'NOT met: ' + '; '.join(g['diverged'])}")
    print("goal: every method at or above the linear probe: "
          + ("met" if g["all_at_or_above_probe"] else "NOT met: " + "; ".join(g["below_probe"])))
    print(f"goal: XMA2 at or above XMA and Piggyback on average: "
          f"{'met' if g['xma2_at_or_above_xma_and_piggyback'] else 'NOT met'}")
    print(f"time: {result['seconds']:.0f} s (backbones {timing})")


if __name__ == "__main__":
    main()
