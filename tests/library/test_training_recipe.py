"""The training recipe holds beyond the default benchmark: the divergence guard, tiny tasks, bad input."""

import math
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from project import ROOT
from tiny_backbone import random_task
from xbar import training
from xbar.errors import Diverged, UserError
from xbar.methods import build_task_model, recipe, train_task
from xbar.methods.recipe import init_head
from xbar.training import HEAD_LABEL_SMOOTHING
from xbar.params import ParamsError, TaskSpec, parse_params
from xbar.training import BalancedBatches, fit, seed_everything

SPARE = [0, 3]


def faces(n: int) -> TensorDataset:
    """n of scikit-image's LFW crops, half faces (label 1), half not, resized to 28x28."""
    from xbar.data import load_task_data
    from xbar.params import DatasetSpec

    train = load_task_data(DatasetSpec(source="lfw_faces"), 0).train
    x, y = train.tensors
    pick = torch.cat([torch.nonzero(y == c).flatten()[: n // 2] for c in (0, 1)])
    return TensorDataset(x[pick], y[pick])


def task_model(backbone, method: str, classes: int = 3, epochs: int = 1):
    params, quant, levels = backbone
    spec = TaskSpec(dataset="optdigits", method=method, epochs=epochs)
    seed_everything(0, 1)
    model = build_task_model(params, spec, quant, levels, classes, spare_pes=SPARE if method == "xma2" else None)
    return model, spec


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_guard_stops_a_run_whose_loss_rises_far_above_its_start(backbone):
    """An absurd (finite) learning rate: the guard stops the run with one line naming the task and the fix."""
    params, _, _ = backbone
    model, spec = task_model(backbone, "finetune_separate")
    with pytest.raises(UserError) as err:
        train_task(model, random_task(64), spec, params.train.model_copy(update={"lr": 1e4}), 0, "t1 (finetune_separate)")
    text = one_line(err)
    assert text.startswith("t1 (finetune_separate): ") and "default recipe at lrs SGD 5e+03" in text  # 64 images: half the batch, half the lr
    assert "lower train.lr" in text and "nothing was written" in text


def test_a_stopped_run_is_not_retried(backbone):
    """No silent lr change: the run the guard stops is the failure (one fit, its lrs named)."""
    params, _, _ = backbone
    model, spec = task_model(backbone, "xma")
    calls = []

    def stopped(net, data, opts, *args, **kwargs):
        calls.append([g["lr"] for opt in opts for g in opt.param_groups])
        raise Diverged("t (xma): training diverged")

    with patch.object(recipe, "fit", stopped), pytest.raises(Diverged):
        train_task(model, random_task(64), spec, params.train, 0, "t")
    assert len(calls) == 1


def test_fit_guard_on_a_rising_loss():
    """fit alone (pretraining, QAT): a loss that climbs past start + log C stops the run."""
    seed_everything(0, 1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = TensorDataset(torch.randint(0, 255, (32, 1, 2, 2), dtype=torch.uint8), torch.tensor([0, 1] * 16))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # gradient ascent: every step makes the loss worse, as a far too large lr does
    ascent = lambda: [p.data.add_(p.grad, alpha=2.0) for p in net.parameters()]  # noqa: E731
    opt.step = ascent
    with pytest.raises(UserError) as err:
        fit(net, data, [opt], 50, 8, 0, "pretrain")
    assert "pretrain: training diverged" in one_line(err) and "log 2 classes" in str(err.value)


def test_training_progress_goes_to_stderr(capfd):
    """stdout is for results: a `--json` command prints one JSON object there, whatever it trained (the bar
    is on stderr, and transient)."""
    seed_everything(0, 1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = TensorDataset(torch.randint(0, 255, (32, 1, 2, 2), dtype=torch.uint8), torch.tensor([0, 1] * 16))
    fit(net, data, [torch.optim.SGD(net.parameters(), lr=0.01)], 1, 8, 0, "progress-check")
    out, err = capfd.readouterr()
    assert out == "" and err.strip() == ""


def test_a_diverging_task_writes_nothing(tmp_path: Path, backbone):
    """The stage process: exit code 2, one line on stderr, no task.pt, no metrics."""
    params, quant, levels = backbone
    raw = params.model_dump()
    raw["train"]["lr"] = 1e4
    raw["tasks"] = {"t": {"after": "backbone", "dataset": {"source": "optdigits", "max_train": 60},
                          "method": "xma", "epochs": 1, "rank_batch_size": 16}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "artifacts" / "backbone").mkdir(parents=True)
    torch.save(quant, tmp_path / "artifacts" / "backbone" / "quant.pt")
    torch.save(levels, tmp_path / "artifacts" / "backbone" / "levels.pt")
    done = subprocess.run([sys.executable, "-m", "stages.train_masks", "--task", "t"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: t (xma): ") and "train.lr" in lines[0]
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"params.yaml", "artifacts/backbone/quant.pt", "artifacts/backbone/levels.pt"}


@pytest.mark.parametrize("method", ["xma2", "xma", "piggyback", "finetune_separate"])
def test_a_task_smaller_than_a_batch_trains_in_one_epoch(pretrained, method):
    """12 images (batch 128), 1 epoch: trains (at least MIN_STEPS steps) and ends at or below the head's loss."""
    params = pretrained[0]
    model, spec = task_model(pretrained, method, classes=2)
    loss = train_task(model, faces(12), spec, params.train, 0, "tiny")  # the guard raises if it diverged
    assert math.isfinite(loss) and loss < math.log(2)


def test_the_head_logit_scale_is_bounded_on_a_separable_task(backbone):
    """The root cause of the blow-ups: on a task the ridge head separates, plain cross-entropy asks for an
    unbounded logit scale. Label smoothing bounds the gap between the top two logits near
    log(1 + (1 - eps) C / eps), the gap that minimizes the label-smoothed loss."""
    model, _ = task_model(backbone, "piggyback")
    data = random_task(24, seed=1)  # 24 images, 8 features: separable
    init_head(model, data, 0)
    model.net.eval()
    with torch.no_grad():
        logits = model.net(torch.stack([x for x, _ in data]).float() / 255)
    top2 = logits.topk(2, dim=1).values
    gap = float((top2[:, 0] - top2[:, 1]).mean())
    classes, eps = 3, HEAD_LABEL_SMOOTHING
    assert gap < 2 * math.log(1 + (1 - eps) * classes / eps)  # 2 x 3.3; the unbounded search gave up to 1000x


def test_balanced_batches_never_leave_a_single_image():
    sizes = [len(b) for b in BalancedBatches(129, 128, 0)]
    assert sorted(sizes) == [64, 65]
    assert sorted(i for b in BalancedBatches(129, 128, 0) for i in b) == list(range(129))


# --- bad input: one line, nothing trained ----------------------------------------------------------


def test_zero_optimizer_steps_are_refused():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    empty = TensorDataset(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(UserError) as err:
        fit(net, empty, [opt], 3, 128, 0, "t")
    assert "make no optimizer step" in one_line(err)
    data = TensorDataset(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1] * 4))
    with pytest.raises(UserError) as err:
        fit(net, data, [opt], 0, 128, 0, "t")
    assert "0 epoch(s) over 8 training images" in one_line(err)


def test_fewer_training_images_than_classes_are_refused(backbone):
    params, _, _ = backbone
    model, spec = task_model(backbone, "xma", classes=3)
    data = random_task(2, classes=2)
    with pytest.raises(UserError) as err:
        train_task(model, data, spec, params.train, 0, "t")
    assert "2 training image(s) for 3 classes" in one_line(err)


@pytest.mark.parametrize("field", ["train.lr", "train.mask_lr", "quant.lr", "source.lr"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_learning_rate_that_is_not_finite_is_refused(field, value):
    from project import tiny_params

    raw = tiny_params()
    section, key = field.split(".")
    raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw, "params.yaml")
    assert one_line(err).startswith(f"params.yaml: {field}: ") and "finite" in str(err.value)


# --- the BN rule and the head refit ------------------------------------------------------------------


def bn_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".bn" in k or k.startswith("bn")}


@pytest.mark.parametrize("bn", ["frozen", "per_task"])
def test_frozen_bn_keeps_the_backbones_bn_exactly(pretrained, bn):
    """Under bn: frozen a mask method's task.pt holds the backbone's BN bit for bit; per_task trains its own."""
    from xbar.methods import export_task

    params, quant, _ = pretrained
    model, spec = task_model(pretrained, "xma")
    model.bn = bn
    from xbar.methods.recipe import set_trainable

    set_trainable(model)
    train_task(model, faces(64), spec, params.train, 0, "t")
    task = export_task(model, 2, 1)
    ours, backbone = bn_state(task["model_state"]), bn_state(quant["state_dict"])
    assert ours and set(ours) <= set(backbone) and task["bn"] == bn
    same = all(torch.equal(v, backbone[k]) for k, v in ours.items())
    assert same == (bn == "frozen")


def test_the_leave_one_out_error_is_that_of_refitting_without_each_image():
    """`loo_penalty`'s shortcut (residual / (1 - leverage), intercept included) against refitting the ridge
    head n times, each time without one image."""
    gen = torch.Generator().manual_seed(3)
    features, labels = torch.randn(30, 12, generator=gen, dtype=torch.float64), torch.arange(30) % 3
    shortcut = {}
    for relative in (1e-2, 1.0):
        with patch.object(training, "RIDGE_GRID", (relative,)):
            assert training.loo_penalty(*centred(features, labels)) == relative
            shortcut[relative] = loo_error(features, labels, relative, brute=False)
            brute = loo_error(features, labels, relative, brute=True)
            assert shortcut[relative] == pytest.approx(brute, rel=1e-9)
    assert shortcut[1e-2] != pytest.approx(shortcut[1.0])  # the error depends on the penalty


def centred(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.nn.functional.one_hot(labels).double()
    return features - features.mean(0), target - target.mean(0)


def loo_error(features: torch.Tensor, labels: torch.Tensor, relative: float, brute: bool) -> float:
    """Sum of squared leave-one-out residuals at a relative penalty: refit without each image (brute), or
    `loo_penalty`'s formula. The penalty's scale is the full set's, as in loo_penalty."""
    fc, tc = centred(features, labels)
    scale = float(fc.square().sum()) / fc.shape[1]
    target = torch.nn.functional.one_hot(labels).double()
    if not brute:
        u, s, _ = torch.linalg.svd(fc, full_matrices=False)
        shrink = s.square() / (s.square() + relative * scale)
        fitted = u @ (shrink[:, None] * (u.T @ tc))
        leverage = u.square() @ shrink + 1 / len(fc)
        return float((((tc - fitted) / (1 - leverage)[:, None]) ** 2).sum())
    error = 0.0
    for i in range(len(features)):
        keep = torch.arange(len(features)) != i
        f, t = features[keep], target[keep]
        fm, tm = f.mean(0), t.mean(0)
        w = torch.linalg.solve((f - fm).T @ (f - fm) + relative * scale * torch.eye(f.shape[1], dtype=f.dtype),
                               (f - fm).T @ (t - tm))
        error += float(((target[i] - tm - (features[i] - fm) @ w) ** 2).sum())
    return error


def test_the_ridge_penalty_grows_when_images_are_few_against_the_feature_width():
    """Leave-one-out picks a small penalty where images outnumber features, and a far larger one where a
    few images in many sparse features (post-ReLU, like an ImageNet backbone's) would be interpolated."""
    gen = torch.Generator().manual_seed(0)

    def task(n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 4
        signal = torch.nn.functional.one_hot(labels, 4).double() + 0.7 * torch.randn(n, 4, generator=gen,
                                                                                       dtype=torch.float64)
        rare = 3.0 * (torch.rand(n, width - 4, generator=gen) < 0.1).double()  # each on in 10% of the images
        return torch.cat([signal, rare * torch.randn(n, width - 4, generator=gen, dtype=torch.float64)], 1), labels

    many = training.loo_penalty(*centred(*task(2000, 16)))
    few = training.loo_penalty(*centred(*task(40, 400)))
    assert few >= 100 * many


# --- the checkpoint kept on held-out images ------------------------------------------------------------


def test_held_out_images_are_a_share_of_each_class_and_seeded():
    from xbar.methods.validation import MAX_VAL_IMAGES, VAL_SHARE, held_out

    labels = torch.cat([torch.zeros(200), torch.ones(35), torch.full((9,), 2)]).long().numpy()
    val = held_out(labels, seed=0)
    per_class = {c: int((labels[val] == c).sum()) for c in (0, 1, 2)}
    # rounded down per class: a class of fewer than 1 / VAL_SHARE images keeps all of them for training
    assert per_class == {0: int(200 * VAL_SHARE), 1: int(35 * VAL_SHARE), 2: 0}
    assert list(val) == sorted(set(val.tolist())) and list(held_out(labels, seed=0)) == list(val)
    assert list(held_out(labels, seed=1)) != list(val)
    assert len(held_out(torch.arange(50000).remainder(10).numpy(), 0)) == MAX_VAL_IMAGES


# piggyback is left out: on these 400 random images its masks' steady gradients all cross the threshold
# together under per-element Adam and the guard stops the run (docs/decisions.md, "Recipes")
@pytest.mark.parametrize("method", ["xma2", "xma"])
def test_the_kept_checkpoint_is_the_one_with_the_lowest_held_out_loss(pretrained, method):
    """Every check is recorded; the task ends as the best of them (the start included), and a task with
    too few images to hold out keeps its last step."""
    from xbar.methods import recipe

    params = pretrained[0]
    model, spec = task_model(pretrained, method, classes=3, epochs=2)
    seen, check = [], recipe.Validation.check

    def recording(self, step, mode):
        seen.append((step, float(recipe.image_losses(self.model, self.data, self.val).mean())))
        check(self, step, mode)

    data = random_task(400, seed=4)
    with patch.object(recipe.Validation, "check", recording):
        train_task(model, data, spec, params.train, 0, "t")
    steps = [s for s, _ in seen]
    assert steps[0] == 0 and steps[1:] == sorted(recipe.Validation.at(model.steps))
    best_step, best_loss = min(seen, key=lambda s: s[1])
    val = torch.as_tensor(recipe.held_out(data.tensors[1].numpy(), 0))
    assert model.kept_step == best_step
    held = float(recipe.image_losses(model, data, val).mean())
    assert held == pytest.approx(best_loss, abs=1e-6)  # the kept checkpoint as it was: nothing swapped after

    small, spec = task_model(pretrained, method, classes=2)
    train_task(small, faces(64), spec, params.train, 0, "t")  # 3 images per class to spare: too few
    assert small.kept_step is None and small.steps >= recipe.MIN_STEPS


# --- the recipe a reviewer can trace ---------------------------------------------------------------


def test_masks_and_spare_pe_weights_train_on_per_element_adam_with_frozen_entries_in_no_statistic(backbone):
    """torch.optim.Adam on masks and latent weights; a spare-PE layer's frozen entries get no gradient, so
    their Adam statistics stay zero and they never move."""
    model, _ = task_model(backbone, "xma2")
    params = backbone[0]
    opts = recipe.optimizers(model, params.train, steps=100)
    assert {type(o) for o in opts} == {torch.optim.SGD, torch.optim.Adam}
    layer = next(l for l in model.layers().values() if l.latent is not None)
    start = layer.latent.detach().clone()
    x = torch.stack([x for x, _ in random_task(8)]).float() / 255
    model.net.train()
    model.net(x).sum().backward()
    for opt in opts:
        opt.step()
    cells = next(o for o in opts if any(g["params"][0] is layer.latent for g in o.param_groups))
    v = cells.state[layer.latent]["exp_avg_sq"]
    frozen = ~layer.spare
    assert bool((v[frozen] == 0).all()) and bool((v[layer.spare] > 0).any())
    assert torch.equal(layer.latent.detach()[frozen], start[frozen])


def test_the_reach_rule_brings_a_steady_mask_entry_to_its_threshold_at_the_middle_of_the_run(backbone):
    """Adam moves an entry with a steady gradient by lr x the schedule's factor per step: under the reach
    rule a column logit starting at START_LOGIT crosses 0 at MASK_REACH of the run, for any run length."""
    from xbar.masks import START_LOGIT
    from xbar.methods.presets import DEFAULT

    model, _ = task_model(backbone, "xma")
    for steps in (50, 300):
        lr = recipe.mask_lr(model, backbone[0].train, DEFAULT, steps)
        p = torch.nn.Parameter(torch.full((1,), START_LOGIT))
        opt = torch.optim.Adam([p], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, recipe.lr_schedule(DEFAULT, steps))
        crossed = None
        for t in range(steps):
            p.grad = torch.ones(1)
            opt.step()
            sched.step()
            if crossed is None and float(p) <= 0:
                crossed = t + 1
        assert abs(crossed - recipe.MASK_REACH * steps) <= 2


def test_the_piggyback_preset_initializes_thresholds_and_steps_masks_as_the_authors_code(backbone):
    """Piggyback's code (src/main.py, run_piggyback_training.sh): masks start at 1e-2, a mask at or below 5e-3
    is 0; Adam 1e-4 on the masks, a second Adam 1e-4 on the classifier, batch 32, lr x0.1 after half the epochs
    (15 of 30), BN frozen. Adam's first step moves every entry by lr whatever its gradient's size."""
    from xbar.methods.presets import recipe_for

    params, quant, levels = backbone
    raw = params.model_dump()
    raw["train"]["recipe"] = "paper"
    raw["train"]["bn"] = "per_task"  # the preset imposes frozen BN all the same
    paper = parse_params(raw)
    preset = recipe_for("paper", "piggyback")
    assert (preset.batch_size, preset.mask_lr, preset.head_lr, preset.published_epochs) == (32, 1e-4, 1e-4, 30)
    seed_everything(0, 1)
    model = build_task_model(paper, TaskSpec(dataset="optdigits", method="piggyback"), quant, levels, 3)
    assert model.bn == "frozen"
    mask = next(iter(model.layers().values())).element_mask
    assert bool((mask.real == 1e-2).all())
    with torch.no_grad():
        mask.real.view(-1)[:2] = torch.tensor([5e-3, 5.0001e-3])
    assert mask.binary().view(-1)[:2].tolist() == [False, True]  # their Binarizer: le(threshold) -> 0
    opts = recipe.optimizers(model, paper.train, batch=32, steps=30, recipe=preset)
    assert [type(o) for o in opts] == [torch.optim.Adam, torch.optim.Adam]
    head_opt, mask_opt = opts
    assert head_opt.param_groups[0]["params"] == list(model.net.head.parameters())
    assert mask_opt.defaults["lr"] == 1e-4 and mask_opt.defaults["weight_decay"] == 0
    with torch.no_grad():
        mask.real.fill_(1e-2)
    before = mask.real.detach().clone()
    grad = torch.randn_like(mask.real) * torch.logspace(-6, 0, mask.real.numel()).view_as(mask.real)
    mask.real.grad = grad
    for p in model.net.head.parameters():
        p.grad = torch.zeros_like(p)
    mask_opt.step()
    # torch's Adam, their optimizer, with its defaults (eps 1e-8): the first step is lr * g / (|g| + eps)
    assert torch.allclose(mask.real.detach() - before, -1e-4 * grad / (grad.abs() + 1e-8), rtol=1e-4, atol=1e-10)
    big = grad.abs() > 1e-4
    assert torch.allclose((mask.real.detach() - before)[big].abs(), torch.full_like(grad[big], 1e-4), rtol=1e-3)
    factor = recipe.lr_schedule(preset, 30)
    assert [factor(t) for t in (0, 14, 15, 29)] == [1.0, 1.0, 0.1, 0.1]


def test_bad_recipes_are_refused_in_one_line():
    from tiny_backbone import tiny_params

    raw = tiny_params({"t1": {"dataset": "optdigits", "method": "finetune_shared"}})
    with pytest.raises(ParamsError) as err:
        parse_params({**raw, "train": {**raw["train"], "recipe": "fancy"}})
    assert "train.recipe" in one_line(err)
    with pytest.raises(ParamsError) as err:
        parse_params({**raw, "train": {**raw["train"], "recipe": "paper"}})
    assert "does not cover method 'finetune_shared'" in one_line(err)
