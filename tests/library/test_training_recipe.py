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
from xbar.methods.recipe import TensorAdam, init_head
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
    assert text.startswith("t1 (finetune_separate): ") and "lower train.lr (now 10000)" in text
    assert f"retried down to 1/{2**recipe.BACKOFFS} of every learning rate" in text
    assert "nothing was written" in text


def test_a_stopped_run_is_retried_from_its_start_at_half_the_learning_rates():
    """`with_backoff`: each retry starts from the state the first run started from, at half the last scale;
    the scale that held is returned with the run's result."""
    net = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def attempt(scale: float, retried: str) -> str:
        seen.append((scale, retried, all(torch.equal(v, start[k]) for k, v in net.state_dict().items())))
        with torch.no_grad():
            net.weight.add_(100.0)  # what a diverging run leaves behind
        if scale > 0.25:
            raise Diverged("t: training diverged")
        return "held"

    assert recipe.with_backoff(net, attempt) == ("held", 0.25)
    assert [s for s, _, _ in seen] == [1.0, 0.5, 0.25] and all(fresh for _, _, fresh in seen)
    assert seen[0][1] == "" and seen[2][1].startswith("retried down to 1/4 of every learning rate")


def test_train_task_retries_a_stopped_run_at_half_its_optimizers_lrs(backbone):
    """The recipe's wiring: the guard stops the first run; the retry's optimizers (SGD, mask Adam) run at half
    the lrs from the untouched start, and the model records the scale it held at."""
    params, _, _ = backbone
    model, spec = task_model(backbone, "xma")
    real_fit, lrs = recipe.fit, []

    def stopped_once(net, data, opts, *args, **kwargs):
        lrs.append([g["initial_lr"] for opt in opts for g in opt.param_groups])
        if len(lrs) == 1:
            with torch.no_grad():
                for layer in model.layers().values():
                    layer.column_mask.real.fill_(-5.0)  # every column off: a collapsed run
            raise Diverged("t (xma): training diverged")
        assert all(bool((layer.column_mask.real > 0).all()) for layer in model.layers().values())  # the start
        return real_fit(net, data, opts, *args, **kwargs)

    with patch.object(recipe, "fit", stopped_once):
        train_task(model, random_task(64), spec, params.train, 0, "t")
    assert len(lrs) == 2 and lrs[1] == pytest.approx([lr / 2 for lr in lrs[0]])
    assert model.lr_scale == 0.5


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


def test_mask_adam_moves_entries_in_proportion_to_their_gradients():
    """Per-entry Adam moves every entry with a steady gradient by lr per step, so all of a mask's entries
    reach a threshold on the same step; TensorAdam keeps their order (the largest gradient moves first)."""
    grads = torch.tensor([1e-4, 1e-3, 1e-2])
    moved = {}
    for name, cls in (("adam", torch.optim.Adam), ("mask", TensorAdam)):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = cls([p], lr=0.1)
        for _ in range(5):
            p.grad = grads.clone()
            opt.step()
        moved[name] = -p.detach()
    assert torch.allclose(moved["adam"], moved["adam"][0].expand(3), rtol=1e-3)  # lockstep
    assert moved["mask"][0] < moved["mask"][1] < moved["mask"][2]
    assert float(moved["mask"].pow(2).mean().sqrt()) == pytest.approx(0.5, rel=0.05)  # rms: lr per step


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


def test_refit_head_keeps_the_better_head(pretrained):
    """The repair before the end check fails: a head refit in closed form replaces a worse trained head,
    and leaves a better one in place."""
    from xbar.methods.recipe import head_images, image_losses, refit_head

    model, _ = task_model(pretrained, "xma", classes=2)
    data = faces(40)
    init_head(model, data, 0)
    idx = head_images(len(data), 0)
    with torch.no_grad():
        model.net.head.weight.mul_(-1.0)  # a head that ended up wrong
    wrong = image_losses(model, data, idx)
    kept = refit_head(model, data, 0, wrong)
    assert float(kept.mean()) < float(wrong.mean())
    assert torch.allclose(kept, image_losses(model, data, idx))  # the returned losses are the kept head's
    head = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    refit_head(model, data, 0, torch.zeros_like(kept))  # a trained head at loss 0 beats any refit
    assert all(torch.equal(v, model.net.head.state_dict()[k]) for k, v in head.items())


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


@pytest.mark.parametrize("method", ["xma2", "piggyback"])
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
    if model.head_fit == "trained":  # the kept checkpoint as it was
        assert held == pytest.approx(best_loss, abs=1e-6)
    else:  # its head replaced by one that held out better (`deploy_head`)
        assert held < best_loss

    small, spec = task_model(pretrained, method, classes=2)
    train_task(small, faces(64), spec, params.train, 0, "t")  # 3 images per class to spare: too few
    assert small.kept_step is None and small.steps >= recipe.MIN_STEPS


# --- the head that deploys ---------------------------------------------------------------------------


def test_the_logistic_head_is_the_linear_probes_model_on_features_scaled_as_one():
    """`logistic_head` fits what scikit-learn's LogisticRegression (C = 1) fits on the centred features divided
    by their root mean variance: the same probabilities, with the weights folded back onto the raw features."""
    from sklearn.linear_model import LogisticRegression

    from xbar.training import logistic_head

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(300, 6, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 1.0, 5.0, 1.0]) + 3.0
    y = (f[:, 0] + f[:, 1] / 10 + torch.randn(300, generator=gen)).gt(3).long() + (f[:, 4] > 3).long()
    w, b = logistic_head(f, y, 3)
    ours = (f @ w.T + b).softmax(1)
    z = (f - f.mean(0)) / (f - f.mean(0)).square().mean().sqrt()
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(z.numpy(), y.numpy())
    theirs = torch.as_tensor(probe.predict_proba(z.numpy()), dtype=ours.dtype)
    assert torch.allclose(ours, theirs, atol=5e-3)  # scikit-learn stops at its own tolerance (1e-4)


@pytest.mark.parametrize("better", [True, False])
def test_the_deployed_head_is_the_one_that_holds_out_better(pretrained, better):
    """`deploy_head` keeps the trained head where it holds out better than the logistic head, and replaces it
    (refit on the held-out images too) where it does not; with nothing held out it keeps it."""
    from xbar.methods.validation import Validation
    from xbar.training import head_features, head_images, logistic_head

    model, _ = task_model(pretrained, "xma", classes=3)
    data = random_task(400, seed=4)
    validation = Validation.of(model, data, data.tensors[1].numpy(), 0)
    train = torch.utils.data.Subset(data, validation.train)
    init_head(model, train, 0)
    if not better:
        with torch.no_grad():
            model.net.head.weight.mul_(-1.0)  # a trained head that ended up wrong
    losses = lambda: float(recipe.image_losses(model, data, validation.val).mean())  # noqa: E731
    held = losses()
    head = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    assert not recipe.deploy_head(model, train, None, 0)  # nothing held out: no evidence, the trained head stays
    assert all(torch.equal(v, model.net.head.state_dict()[k]) for k, v in head.items())
    if better:  # the trained head is already the logistic head on these images: nothing holds out better
        feats, labels = head_features(model.net.eval(), train, head_images(len(train), 0))
        recipe.set_head(model.net.head, *logistic_head(feats, labels, 3), feats)
        head, held = {k: v.clone() for k, v in model.net.head.state_dict().items()}, losses()
    replaced = recipe.deploy_head(model, train, validation, 0)
    unchanged = all(torch.equal(v, model.net.head.state_dict()[k]) for k, v in head.items())
    assert replaced != unchanged and replaced == (not better)
    assert (losses() < held) if replaced else (losses() == held)
