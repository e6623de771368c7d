"""A training run's configuration: one small typed section per concern, each validating itself.

    TrainConfig(model=ModelConfig, data=DataConfig, method=MethodConfig,
                optimization=OptimizationConfig, run=RunConfig, strategy=StrategyConfig)

Every field is named as the flag the command line maps to it (train_flags.py),
except the attack's (attacks/pgd.AttackConfig: num_steps <- --attack_steps,
step_size <- --attack_step_size). A bad value or combination raises
ConfigError naming the field, before any graph is built. Library code reads
these sections; it never sees a flag namespace. Paths are checked separately
(`check_paths`), since a config can be made for a filesystem not reachable yet.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from advprop_tf.attacks.pgd import AttackConfig
from advprop_tf.data.pipeline import AUGMENTATIONS
from advprop_tf.data.preprocessing import EVAL_CROPS
from advprop_tf.data.sources import SOURCE_KINDS
from advprop_tf.domains import MAIN, DomainSpec
from advprop_tf.errors import ConfigError
from advprop_tf.methods import DEFAULT_METHOD, METHODS, get_method, parse_epsilon_schedule
from advprop_tf.models.base import INPUT_NORMALIZATIONS
from advprop_tf.models.registry import check_model_name, default_input_normalization, is_keras_name

OPTIMIZERS = ("rmsprop", "sgd")
LR_SCHEDULES = ("exponential", "cosine", "constant", "step")
PRECISIONS = ("none", "float16", "bfloat16")
NAN_POLICIES = ("stop", "skip")
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def _at_least(config, name, low, strict=False):
    value = getattr(config, name)
    if value is not None and (value <= low if strict else value < low):
        raise ConfigError(name, f"must be {'>' if strict else '>='} {low:g}, got {value:g}")


def _within(config, name, low, high, closed_high=False):
    value = getattr(config, name)
    if value is not None and not (low <= value <= high if closed_high else low <= value < high):
        raise ConfigError(name, f"must be in [{low:g}, {high:g}{']' if closed_high else ')'}, got {value:g}")


def _one_of(config, name, valid):
    if getattr(config, name) not in valid:
        raise ConfigError(name, f"unknown {name} {getattr(config, name)!r}; valid: {', '.join(valid)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = "efficientnet-b0"
    num_classes: int | None = None  # None: the dataset's
    resolution: int | None = None  # None: the model's
    width_coefficient: float | None = None
    depth_coefficient: float | None = None
    dropout_rate: float | None = None
    drop_connect_rate: float | None = None
    input_normalization: str | None = None  # None: the family's (EfficientNet inception, ResNet imagenet)
    sync_bn: bool = False
    keras_weights: str | None = None  # keras:<name>: None, "imagenet" or a weight file of its network

    def __post_init__(self):
        try:
            check_model_name(self.model)
        except ValueError as e:
            raise ConfigError("model", str(e)) from None
        if is_keras_name(self.model):
            for name in ("width_coefficient", "depth_coefficient", "drop_connect_rate"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, f"{self.model} is a keras.applications network of its own shape; "
                                      f"it takes no --{name}")
        elif self.keras_weights:
            raise ConfigError("keras_weights", f"only keras:<name> models take it; {self.model} starts from "
                              "--init_checkpoint")
        for name in ("dropout_rate", "drop_connect_rate"):
            _within(self, name, 0, 1)
        if self.resolution is not None and self.resolution < 32:
            raise ConfigError("resolution", f"must be >= 32 (the network downsamples 32x), got {self.resolution}")
        _at_least(self, "num_classes", 2)
        if self.input_normalization is not None:
            _one_of(self, "input_normalization", INPUT_NORMALIZATIONS)

    @property
    def normalization(self) -> str | None:
        """The input normalization (None for keras:<name>: its own preprocess_input's, found when built)."""
        return self.input_normalization or default_input_normalization(self.model)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None
    holdout_fraction: float = 0.0
    synthetic_examples: int = 10_000
    num_train_examples: int | None = None  # when the source cannot tell (TFRecords: 1281167)
    augment: str = "none"
    crop_min_area: float = 0.08
    randaugment_layers: int = 2
    randaugment_magnitude: float = 10.0
    shuffle_buffer: int = 10_000
    eval_crop: str = "center"

    def __post_init__(self):
        kind, _, location = self.dataset.partition(":")
        if kind not in SOURCE_KINDS:
            raise ConfigError("dataset", f"unknown data source {self.dataset!r}; valid kinds: {', '.join(SOURCE_KINDS)}")
        if kind in ("folder", "tfrecord") and not (location or self.data_dir):
            raise ConfigError("data_dir", f"--dataset={self.dataset} needs a location: '{kind}:<path>' or --data_dir")
        _one_of(self, "augment", AUGMENTATIONS)
        _one_of(self, "eval_crop", EVAL_CROPS)
        _at_least(self, "randaugment_magnitude", 0)
        _at_least(self, "randaugment_layers", 1)
        if self.augment == "keras_cv_randaugment" and self.randaugment_magnitude > 10:
            raise ConfigError("randaugment_magnitude", f"keras-cv's RandAugment caps it at 10, got "
                              f"{self.randaugment_magnitude:g}; --augment=randaugment (the authors') takes any magnitude")
        if not 0 < self.crop_min_area <= 1:
            raise ConfigError("crop_min_area", f"must be in (0, 1], got {self.crop_min_area:g}")
        _within(self, "holdout_fraction", 0, 1)

    @property
    def location(self) -> tuple:
        """(path, the field it comes from) of a folder or TFRecord source, else (None, None)."""
        kind, _, location = self.dataset.partition(":")
        if kind not in ("folder", "tfrecord"):
            return None, None
        return (location, "dataset") if location else (self.data_dir, "data_dir")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The training method and its attack. `given_attack` lists the attack fields set explicitly (a method
    that fixes one of them refuses another value); `attack` is stored with the method's fixed settings."""

    method: str = DEFAULT_METHOD
    aux_domains: tuple = ("adv",)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    epsilon_schedule: tuple | None = None  # ((fraction, epsilon), ...), or the flag's text
    clean_loss_weight: float = 1.0
    adv_loss_weight: float | None = None  # None: the method's default
    adv_fraction: float = 0.2
    noisy_loss_weight: float = 0.5
    match_vanilla_budget: bool = True
    given_attack: frozenset = frozenset()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        record = get_method(self.method)
        object.__setattr__(self, "aux_domains", tuple(self.aux_domains))
        if isinstance(self.epsilon_schedule, str):
            try:
                schedule = tuple(parse_epsilon_schedule(self.epsilon_schedule)) if self.epsilon_schedule else None
            except ValueError as e:
                raise ConfigError("epsilon_schedule", str(e)) from None
            object.__setattr__(self, "epsilon_schedule", schedule)
        for name in ("clean_loss_weight", "adv_loss_weight", "noisy_loss_weight"):
            _at_least(self, name, 0)
        if self.clean_loss_weight == 0 and (self.adv_weight == 0 or not record.auxiliary_domains and not record.attacks):
            raise ConfigError("clean_loss_weight", "is 0 and no other loss is left to train on")
        if record.auxiliary_domains:
            if len(set(self.aux_domains)) != len(self.aux_domains) or MAIN in self.aux_domains:
                raise ConfigError("aux_domains", f"names must be unique and not {MAIN!r}, got {','.join(self.aux_domains)}")
            try:
                DomainSpec.with_auxiliary(self.aux_domains)
            except ValueError as e:
                raise ConfigError("aux_domains", str(e)) from None
        if self.epsilon_schedule:
            if not record.attacks:
                raise ConfigError("epsilon_schedule", f"contradicts --method={self.method}, which has no attack")
            if record.auxiliary_domains and "adv" not in self.aux_domains:
                raise ConfigError("epsilon_schedule", f"schedules the epsilon of the domain 'adv', which "
                                  f"--aux_domains={','.join(self.aux_domains)} does not have")
        record.check(self)
        object.__setattr__(self, "attack", record.resolve_attack(self.attack, self.given_attack))

    @property
    def record(self):
        return get_method(self.method)

    @property
    def domains(self) -> DomainSpec:
        """The network's BN domains: decided here, once."""
        return self.record.domains(self.aux_domains)

    @property
    def adv_weight(self) -> float:
        return self.record.default_adv_weight if self.adv_loss_weight is None else self.adv_loss_weight


@dataclasses.dataclass(frozen=True)
class OptimizationConfig:
    train_batch_size: int = 2048  # the global clean batch
    eval_batch_size: int = 1024
    train_epochs: float = 350.0
    train_steps: int | None = None  # overrides train_epochs
    optimizer: str = "rmsprop"
    lr_schedule: str = "exponential"
    base_learning_rate: float = 0.016  # per 256 images
    warmup_epochs: float = 5.0
    lr_decay_epochs: float = 2.4
    lr_decay_rate: float = 0.97
    lr_decay_boundaries: tuple = ()  # step schedule: epochs
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    ema_decay: float = 0.9999  # 0: no EMA
    mixed_precision: str = "none"
    jit_compile: bool = False
    on_nan: str = "stop"

    def __post_init__(self):
        for name in ("train_batch_size", "eval_batch_size"):
            _at_least(self, name, 1)
        _at_least(self, "train_steps", 1)
        if self.train_steps is None:
            _at_least(self, "train_epochs", 0, strict=True)
        _one_of(self, "optimizer", OPTIMIZERS)
        _one_of(self, "lr_schedule", LR_SCHEDULES)
        _one_of(self, "mixed_precision", PRECISIONS)
        _one_of(self, "on_nan", NAN_POLICIES)
        _at_least(self, "weight_decay", 0)
        _at_least(self, "base_learning_rate", 0, strict=True)
        _at_least(self, "warmup_epochs", 0)
        _within(self, "label_smoothing", 0, 1)
        _within(self, "ema_decay", 0, 1)
        try:
            boundaries = tuple(float(e) for e in self.lr_decay_boundaries)
        except ValueError:
            raise ConfigError("lr_decay_boundaries", "must be epochs (numbers), got "
                              f"{','.join(map(str, self.lr_decay_boundaries))}") from None
        object.__setattr__(self, "lr_decay_boundaries", boundaries)
        if self.lr_schedule == "step" and (not boundaries or list(boundaries) != sorted(boundaries) or boundaries[0] <= 0):
            raise ConfigError("lr_decay_boundaries", "--lr_schedule=step needs increasing positive epochs, e.g. "
                              f"35,70,95; got {','.join(f'{b:g}' for b in boundaries) or 'none'}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model_dir: str | None = None
    seed: int | None = None  # None: the run's own (kept in seed.txt) or a new one
    steps_per_loop: int = 50
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 3
    eval_every_steps: int = 0
    eval_steps: int = 0
    export: bool = True
    checkpoint_input_pipeline: bool = True
    init_checkpoint: str | None = None
    init_skip_head: bool = False
    init_use_ema: bool = True
    allow_config_change: bool = False

    def __post_init__(self):
        if not self.model_dir:
            raise ConfigError("model_dir", "is required (checkpoints, summaries and the export go there)")
        for name in ("steps_per_loop", "checkpoint_every_steps"):
            _at_least(self, name, 1)
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints", f"must be >= 1 (the newest checkpoint is what a resume needs), "
                              f"got {self.keep_checkpoints}")
        for name in ("eval_every_steps", "eval_steps"):
            _at_least(self, name, 0)
        if self.init_skip_head and not self.init_checkpoint:
            raise ConfigError("init_skip_head", "needs --init_checkpoint")


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    tpu: str = ""
    num_gpus: int = -1  # -1: all visible
    worker_hosts: str = ""
    task_index: int = 0

    def __post_init__(self):
        if self.tpu and self.worker_hosts:
            raise ConfigError("worker_hosts", "contradicts --tpu: a TPU pod slice finds its hosts itself")
        if self.tpu and self.num_gpus > 0:
            raise ConfigError("tpu", "contradicts --num_gpus: choose TPU or GPUs")


# The fields that fix what a run IS, as run_config.json records them: resuming with another value would
# silently train a different model, schedule or data (the global batch sets the learning rate and the steps
# per epoch). (section, field) by name.
MEANING = {"model": "model", "method": "method", "aux_domains": "method", "adv_fraction": "method",
           "train_batch_size": "optimization", "resolution": "model", "num_classes": "model", "dataset": "data",
           "width_coefficient": "model", "depth_coefficient": "model"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    optimization: OptimizationConfig
    run: RunConfig
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)

    def __post_init__(self):
        domains = self.method.domains
        if self.data.augment in domains.views:
            raise ConfigError("aux_domains", f"the view {self.data.augment!r} is what --augment={self.data.augment} "
                              "already does to the clean images: its BN would see the same distribution as the main one")
        if self.optimization.mixed_precision == "float16" and self.strategy.tpu:
            raise ConfigError("mixed_precision", "float16 is for GPUs; use bfloat16 on TPU")
        init = self.run.init_checkpoint
        if init and init.endswith(".h5") and not is_keras_name(self.model.model) and self.model.normalization != "imagenet":
            raise ConfigError("input_normalization", "Keras applications weights expect ImageNet mean/std; "
                              "pass --input_normalization=imagenet")

    def meaning(self) -> dict:
        """The values that fix what the run is (compared on resume), by name."""
        values = {}
        for name, section in MEANING.items():
            value = getattr(getattr(self, section), name)
            values[name] = list(value) if isinstance(value, (list, tuple)) else value
        return values

    def replace(self, **sections) -> "TrainConfig":
        """A copy with some sections' fields changed: replace(run={"model_dir": ...}, optimization={...})."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **fields)
                                            for name, fields in sections.items()})


def check_paths(config: TrainConfig) -> None:
    """ConfigError for a data location or init checkpoint that does not exist (on any filesystem gfile knows)."""
    path, field = config.data.location
    if path and "*" not in path and "{split}" not in path and not _exists(path, field):
        raise ConfigError(field, f"{path!r} does not exist")
    init = config.run.init_checkpoint
    if init and not (init.endswith(".index") or _exists(init, "init_checkpoint")
                     or _exists(init + ".index", "init_checkpoint")):
        raise ConfigError("init_checkpoint", f"{init!r} does not exist")


def _exists(path: str, field: str) -> bool:
    try:
        return tf.io.gfile.exists(path)
    except tf.errors.OpError as e:  # an unknown scheme, missing credentials, an unreachable bucket
        raise ConfigError(field, f"cannot check {path!r}: {e.message.splitlines()[0]}") from None


def examples_per_epoch(config: TrainConfig, source) -> int:
    return source.num_examples("train") or config.data.num_train_examples or IMAGENET_TRAIN_EXAMPLES


def synthetic_size(config: TrainConfig) -> int:
    """Side of the synthetic images: what the eval crop (0.875) of the model resolution needs."""
    return int(math.ceil((config.model.resolution or 224) / 0.875))
