"""params.yaml validation: the shipped file is valid, every kind of mistake is one line naming the field."""

import copy

import pytest
import yaml

from project import ROOT
from xbar.params import (BUILTIN_DATASETS, CrossbarParams, ParamsError, ShiftLevels, SpareRatio, check_task_name,
                         check_value, load_params, parse_params)

GOOD = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid_and_frozen():
    params = load_params(ROOT / "params.yaml")
    assert list(params.tasks) == list(GOOD["tasks"])  # order = learning order
    with pytest.raises(Exception):
        params.seed = 3  # frozen


def test_shipped_benchmark_is_offline_with_varied_sources():
    """The default benchmark: at least 4 new tasks from at least 3 built-in (package-shipped) sources,
    none of them the source task's dataset."""
    params = load_params(ROOT / "params.yaml")
    sources = [spec.dataset.source for spec in params.tasks.values()]
    assert len(sources) >= 4 and len(set(sources)) >= 3
    assert set(sources) <= set(BUILTIN_DATASETS) and params.source.dataset.source not in sources


def test_dataset_shorthand_and_defaults():
    params = parse_params(GOOD)
    task = params.tasks["mnist"]
    assert task.dataset.source == "mnist5k" and task.dataset.image_size == 28
    assert 0 < task.spare_ratio <= 1 and 0 <= task.shift_levels <= 3


def _with(path: str, value, base: dict | None = None):
    data = copy.deepcopy(GOOD if base is None else base)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


@pytest.mark.parametrize("path, value, field, words", [
    ("crossbar.extra", 1, "crossbar.extra", "unknown key"),
    ("seeed", 1, "seeed", "unknown key"),
    ("seed", "zero", "seed", "integer"),
    ("crossbar.rows", 0, "crossbar.rows", "greater than 0"),
    ("crossbar.cell_bits", 3, "crossbar", "multiple of cell_bits"),
    ("crossbar.weight_bits", 1, "crossbar", "signed weight"),
    ("tasks.mnist.spare_ratio", -0.1, "tasks.mnist.spare_ratio", "greater than 0"),
    ("tasks.mnist.spare_ratio", 1.5, "tasks.mnist.spare_ratio", "less than or equal to 1"),
    ("tasks.mnist.shift_levels", 4, "tasks.mnist.shift_levels", "less than or equal to 3"),
    ("tasks.mnist.epochs", 0, "tasks.mnist.epochs", "greater than 0"),
    ("tasks.mnist.dataset", "cifar1000", "tasks.mnist.dataset.source", "mnist5k"),
    ("tasks.mnist.method", "magic", "tasks.mnist.method", "xma2"),
    ("tasks.mnist.dataset", {"source": "imagefolder"}, "tasks.mnist.dataset", "needs 'root'"),
    ("source.dataset", {"source": "torchvision"}, "source.dataset", "needs 'name'"),
    ("train.bn", "sometimes", "train.bn", "'frozen' or 'per_task'"),
    ("tasks.mnist.bn", "sometimes", "tasks.mnist.bn", "'frozen' or 'per_task'"),
])
def test_bad_params_give_one_line_naming_the_field(path, value, field, words):
    with pytest.raises(ParamsError) as info:
        parse_params(_with(path, value), "params.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"params.yaml: {field}")
    assert words in message


def test_a_bn_rule_the_method_cannot_use_is_refused():
    """A fine-tune rewrites every weight, its BN included: a task cannot ask it to freeze BN; train.bn
    frozen (the default) applies to the methods that can use it."""
    data = _with("tasks.mnist.method", "finetune_separate")
    assert parse_params(data).bn_rule(parse_params(data).tasks["mnist"]) == "per_task"
    with pytest.raises(ParamsError) as info:
        parse_params(_with("tasks.mnist.bn", "frozen", data), "params.yaml")
    assert str(info.value) == ("params.yaml: tasks.mnist.bn: finetune_separate cannot learn with BN 'frozen' "
                               "(it can with: per_task)")


@pytest.mark.parametrize("kind, value, words", [
    (SpareRatio, 0.0, "greater than 0"), (SpareRatio, 1.5, "less than or equal to 1"),
    (ShiftLevels, -1, "greater than or equal to 0"), (ShiftLevels, 4, "less than or equal to 3"),
])
def test_a_number_from_elsewhere_gets_the_params_range(kind, value, words):
    """A command-line option is checked by the parameter's own type: one line naming the option."""
    with pytest.raises(ParamsError) as info:
        check_value(kind, value, "--option")
    assert str(info.value).startswith("--option: ") and words in str(info.value) and "\n" not in str(info.value)
    assert check_value(SpareRatio, 0.25, "--option") == 0.25 and check_value(ShiftLevels, 0, "--option") == 0
    with pytest.raises(ParamsError, match="crossbar.rows: .*greater than 0"):
        check_value(CrossbarParams, {"rows": 0}, "crossbar")


@pytest.mark.parametrize("name", ["../up", "a/b", "with space", "tab\tname", "Upper", "x" * 40, "", "1st", "é"])
def test_bad_task_names_are_refused(name):
    with pytest.raises(ValueError, match="simple identifier"):
        check_task_name(name)
    data = copy.deepcopy(GOOD)
    data["tasks"][name] = {"dataset": "optdigits"}
    with pytest.raises(ParamsError, match="tasks"):
        parse_params(data)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ParamsError, match=r"not valid YAML at line \d"):
        load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_task_chain_must_follow_the_order():
    data = copy.deepcopy(GOOD)
    first, second = list(data["tasks"])[:2]
    data["tasks"][second]["after"] = "backbone"
    with pytest.raises(ParamsError, match=rf"{second}.after must be '{first}'"):
        parse_params(data)
    data = copy.deepcopy(GOOD)
    data["tasks"]["backbone"] = {"after": list(data["tasks"])[-1], "dataset": "optdigits"}
    with pytest.raises(ParamsError, match="reserved"):
        parse_params(data)
