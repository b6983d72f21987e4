"""Adding one task to params.yaml, safely: validate everything first, append, roll back on failure.

No Prefect here, so the CLI can refuse bad input at once, before any server starts.
The task is appended as text (the file's comments and layout stay as they are),
and the result must parse to exactly the old parameters plus the new task.

A task's dataset is a built-in name, an image folder, or a torchvision class with
its root. A run reads files the form names, so a root must lie under the project
directory or under a directory listed in XBAR_DATA_DIRS (os.pathsep-separated, set
by whoever starts `xbar serve`); symlinks are followed before the check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workflow.io import atomic_write_bytes
from xbar.errors import UserError
from xbar.methods import names as method_names
from xbar.params import (BUILTIN_DATASETS, FIRST_AFTER, TASK_NAME, DatasetSpec, Params, ParamsError, ShiftLevels,
                         SpareRatio, check_task_name, load_params, parse_params)

DATA_DIRS_ENV = "XBAR_DATA_DIRS"  # directories besides the project a dataset root may lie under

# The form's fields (Prefect renders these types as inputs with choices, bounds and help).
# The bounds repeat xbar.params.TaskSpec's so the UI refuses bad values before a run
# starts (spare_ratio and shift_levels use TaskSpec's own types); TaskSpec still validates
# the resulting params.yaml (tests keep the two in sync).
TaskName = Annotated[str, Field(pattern=TASK_NAME.pattern, description=(
    "A new task's name: a lower-case letter, then up to 31 lower-case letters, digits or '_'."))]
Root = Annotated[str, Field(min_length=1, description=(
    f"A directory under the project, or under one listed in {DATA_DIRS_ENV} on the server"))]
ImageSize = Annotated[int | None, Field(gt=0, description="Side in pixels the images are resized to "
                                                          "(default: the backbone's, source.dataset.image_size)")]
Channels = Annotated[Literal[1, 3] | None, Field(description="The images' channels, 1 (grey) or 3 (colour) "
                                                             "(default: the backbone's, source.dataset.channels)")]
MaxTrain = Annotated[int | None, Field(gt=0, description="Cap on the training split (stratified); empty: all")]


class ImageFolder(BaseModel):
    """One sub-directory of images per class (torchvision's ImageFolder layout)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Image folder")

    root: Root
    image_size: ImageSize = None
    channels: Channels = None
    max_train: MaxTrain = None


class TorchvisionDataset(BaseModel):
    """A torchvision.datasets class reading its files (already downloaded) from a root directory."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="torchvision dataset")

    name: Annotated[str, Field(pattern=r"^[A-Z][A-Za-z0-9_]*$", description="The class, e.g. CIFAR10 or SVHN")]
    root: Root
    image_size: ImageSize = None
    channels: Channels = None
    max_train: MaxTrain = None


# the form shows the three kinds as buttons named by these titles
BuiltinDataset = Annotated[Literal[BUILTIN_DATASETS], Field(title="Built-in")]  # type: ignore[valid-type]
Dataset = Annotated[BuiltinDataset | ImageFolder | TorchvisionDataset, Field(
    description="A built-in offline dataset, an image folder, or a torchvision class with its root")]
Method = Annotated[Literal[method_names()], Field(  # type: ignore[valid-type]
    description="How the task is learned on the frozen backbone")]
Epochs = Annotated[int, Field(gt=0, description="Training epochs of the task")]


class NewTask(BaseModel):
    """A task to add: its name and the spec written under `tasks.<name>` in params.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: TaskName
    dataset: Dataset
    method: Method = "xma2"
    epochs: Epochs = 3
    spare_ratio: SpareRatio = 0.1
    shift_levels: ShiftLevels = 3

    @classmethod
    def parse(cls, **fields: Any) -> "NewTask":
        """Validate user input; a mistake raises UserError with one line naming the field."""
        if "name" in fields:
            try:
                check_task_name(fields["name"])  # its message is friendlier than the regex's
            except ValueError as err:
                raise UserError(str(err)) from None
        try:
            return cls(**fields)
        except ValidationError as err:
            raise UserError(form_error(err)) from None

    def dataset_spec(self, backbone: DatasetSpec) -> str | dict[str, Any]:
        """What params.yaml records as the dataset: a built-in name, or a mapping with the backbone's image
        size and channels filled in where the form left them empty."""
        if isinstance(self.dataset, str):
            return self.dataset
        spec = {"source": "imagefolder" if isinstance(self.dataset, ImageFolder) else "torchvision",
                **self.dataset.model_dump(exclude_none=True)}
        spec.setdefault("image_size", backbone.image_size)
        spec.setdefault("channels", backbone.channels)
        if backbone.crop and spec["image_size"] == backbone.image_size:  # the network's input, as the backbone's
            spec.setdefault("crop", backbone.crop)
        return spec

    def spec(self, after: str, backbone: DatasetSpec) -> dict[str, Any]:
        """The mapping written under `tasks.<name>`: every field explicit, so the file records the run."""
        return {"after": after, "dataset": self.dataset_spec(backbone), **self.model_dump(exclude={"name", "dataset"})}


def form_error(err: ValidationError) -> str:
    """A form's validation error as one line naming the field. For the dataset (a union) the error of the
    kind the input was meant as: a name -> the built-in list, a mapping with `name` -> torchvision."""
    errors = err.errors()
    first = errors[0]
    if first["loc"][:1] == ("dataset",) and len(first["loc"]) > 1:
        given = first.get("input")
        kind = ("TorchvisionDataset" if isinstance(given, dict) and "name" in given else "ImageFolder")
        for e in errors:  # loc: ("dataset", <union member>, field...)
            member = str(e["loc"][1])
            if (isinstance(given, str) and member.startswith("literal")) or member == kind:
                first = {**e, "loc": ("dataset", *e["loc"][2:])}
                break
    field = ".".join(str(p) for p in first["loc"]) or "task"
    got = f" (got {first['input']!r})" if "input" in first and first["type"] != "missing" else ""
    return f"{field}: {first['msg']}{got}"


def readable_root(root: str, project: Path) -> Path:
    """`root` (relative to the project) resolved; UserError unless it lies under the project or XBAR_DATA_DIRS."""
    path = (project / Path(root).expanduser()).resolve()  # symlinks and `..` resolved before the check
    allowed = [project.resolve()] + [Path(d).expanduser().resolve()
                                     for d in os.environ.get(DATA_DIRS_ENV, "").split(os.pathsep) if d.strip()]
    if not any(path.is_relative_to(a) for a in allowed):
        raise UserError(f"dataset.root: {root} is outside the directories the server may read (the project"
                        f"{', ' + ', '.join(map(str, allowed[1:])) if allowed[1:] else ''}); "
                        f"list its parent in {DATA_DIRS_ENV} where the server starts")
    return path


def check_task_dataset(spec: DatasetSpec, project: Path) -> None:
    """The dataset's files, checked before a run starts: its root is readable by policy and holds the data."""
    if spec.source not in ("imagefolder", "torchvision"):
        return  # built-in: nothing to read (and no torch import in the CLI's quick refusals)
    from xbar.data import check_dataset

    if spec.root is not None:
        spec = spec.model_copy(update={"root": str(readable_root(spec.root, project))})
    allowed = [project] + [Path(d).expanduser() for d in os.environ.get(DATA_DIRS_ENV, "").split(os.pathsep) if d.strip()]
    check_dataset(spec, allowed)  # class folders and images linked outside them are refused too


@dataclass(frozen=True)
class Plan:
    """What adding the task will write, worked out (and validated) before anything is touched."""

    task: NewTask
    after: str
    old_text: str
    new_text: str
    params: Params  # the validated result
    kept_comments: bool


def plan_new_task(params_path: Path, task: NewTask) -> Plan:
    """Check `task` against the current params.yaml and build the new file's text; raise UserError if refused."""
    params_path = Path(params_path)
    try:
        check_task_name(task.name)  # the form's pattern allows the reserved "backbone"
    except ValueError as err:
        raise UserError(str(err)) from None
    current = load_params(params_path)  # the file must be valid before we add to it
    if task.name in current.tasks:
        raise UserError(f"task {task.name!r} already exists in {params_path} "
                        f"(tasks: {', '.join(current.tasks)}); choose another name")
    old_text = params_path.read_text()
    data = yaml.safe_load(old_text)
    after = list(current.tasks)[-1] if current.tasks else FIRST_AFTER
    spec = task.spec(after, current.source.dataset)
    data["tasks"] = {**(data.get("tasks") or {}), task.name: spec}
    params = parse_params(data, str(params_path))  # the whole result, exactly as stages will read it
    check_task_dataset(params.tasks[task.name].dataset, params_path.parent.absolute())

    new_text = append_task_text(old_text, task.name, spec)
    kept = new_text is not None and yaml.safe_load(new_text) == data
    if not kept:  # an unusual layout (e.g. a flow-style mapping): re-dump, losing comments
        new_text = yaml.safe_dump(data, sort_keys=False)
    return Plan(task, after, old_text, new_text, params, kept)


def append_task_text(text: str, name: str, spec: dict[str, Any]) -> str | None:
    """Insert `name: spec` as the last entry of the block-style `tasks:` mapping; None if there is none."""
    lines = text.splitlines(keepends=True)
    header = next((i for i, ln in enumerate(lines) if re.match(r"tasks:\s*(\{\s*\}|null|~)?\s*(#.*)?$", ln)), None)
    if header is None:
        if re.search(r"^tasks\s*:", text, re.M):
            return None  # present but written in a way we do not edit as text
        lines.append("" if not lines or lines[-1].endswith("\n") else "\n")
        lines.append("tasks:\n")
        header = len(lines) - 1
    elif re.match(r"tasks:\s*(\{\s*\}|null|~)", lines[header]):
        comment = re.search(r"\s#.*$", lines[header].rstrip("\n"))
        lines[header] = "tasks:" + (comment.group(0) if comment else "") + "\n"

    # The block ends at its last indented line (column-0 comments after it belong to what follows).
    end = header + 1
    body: list[str] = []
    for i in range(header + 1, len(lines)):
        ln = lines[i]
        if ln.strip() and not ln[0].isspace() and not ln.startswith("#"):
            break  # the next top-level key
        if ln.strip() and ln[0].isspace():
            end = i + 1
            body.append(ln)
    keys = [ln for ln in body if ln.strip() and not ln.lstrip().startswith("#")]
    indent = _indent(keys[0]) if keys else "  "
    step = (_indent(keys[1])[len(indent):] if len(keys) > 1 and len(_indent(keys[1])) > len(indent) else "  ")

    block = [f"{indent}{_scalar(name)}:\n"]
    for key, value in spec.items():  # one level of nesting (a dataset mapping), in block style
        if isinstance(value, dict):
            block.append(f"{indent}{step}{key}:\n")
            block += [f"{indent}{step * 2}{k}: {_scalar(v)}\n" for k, v in value.items()]
        else:
            block.append(f"{indent}{step}{key}: {_scalar(value)}\n")
    if end > 0 and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    return "".join(lines[:end] + block + lines[end:])


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _scalar(value: Any) -> str:
    """One YAML scalar as PyYAML writes it (quoted where a plain word would read back differently)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def params_added(root: Path, task: NewTask) -> Iterator[Plan]:
    """params.yaml with `task` appended for the duration of the block; restored if the block fails.

    The caller holds the workspace lock, so the check here (re-done: another run may have
    added a task while we waited) cannot race. dvc.lock is restored too: a task whose stages
    failed must leave no trace of a half-added task for DVC.
    """
    root = Path(root)
    params_path, dvc_lock = root / "params.yaml", root / "dvc.lock"
    plan = plan_new_task(params_path, task)
    old_lock = dvc_lock.read_text() if dvc_lock.exists() else None
    atomic_write_text(params_path, plan.new_text)
    try:
        if load_params(params_path) != plan.params:  # what the stages will read is what we validated
            raise ParamsError(f"{params_path}: the appended task did not read back as written")
        yield plan
    except BaseException:
        atomic_write_text(params_path, plan.old_text)
        if old_lock is None:
            dvc_lock.unlink(missing_ok=True)
        else:
            atomic_write_text(dvc_lock, old_lock)
        raise
