"""Pure builders of a run's parts from its TrainConfig (advprop_tf/config.py).

Each takes what it needs and returns a new object; nothing here reads or
writes the run directory or picks a strategy. The Trainer (loop.py) calls
them inside its strategy's scope. Method-specific rules (domains, images per
step, budget) come from the method's registry record.
"""

from __future__ import annotations

import dataclasses
import math

from advprop_tf.config import TrainConfig, examples_per_epoch, synthetic_size
from advprop_tf.data.sources import parse_source
from advprop_tf.errors import ConfigError
from advprop_tf.models import build_model as build_network
from advprop_tf.training.ema import ExponentialMovingAverage
from advprop_tf.training.optimization import make_optimizer, make_schedule, scaled_learning_rate
from advprop_tf.training.step import StepConfig, TrainStep


def data_options(config: TrainConfig) -> dict:
    """What parse_source needs besides the dataset spec (recorded so that evaluate can reopen it)."""
    data = config.data
    return dict(data_dir=data.data_dir, num_classes=config.model.num_classes, holdout_fraction=data.holdout_fraction,
                synthetic_examples=data.synthetic_examples, synthetic_size=synthetic_size(config))


def build_source(config: TrainConfig):
    options = data_options(config)
    return parse_source(config.data.dataset, options["data_dir"], options["num_classes"], options["holdout_fraction"],
                        synthetic_size=options["synthetic_size"], synthetic_examples=options["synthetic_examples"],
                        seed=0)


def model_num_classes(config: TrainConfig, source) -> int:
    """num_classes, else the source's; fewer model classes than the data's labels is an error (tf.one_hot
    would make zero targets of the labels above, and train on nothing)."""
    requested = config.model.num_classes
    if requested is None:
        return source.num_classes
    if source.num_classes_known and requested < source.num_classes:
        raise ConfigError("num_classes", f"{requested} is fewer than the {source.num_classes} classes of "
                          f"--dataset={config.data.dataset}; its labels {requested}..{source.num_classes - 1} would "
                          f"train toward no class. Pass --num_classes={source.num_classes} (or more)")
    return requested


@dataclasses.dataclass(frozen=True)
class Length:
    steps_per_epoch: int  # steps of one pass over the training data
    total_steps: int
    # Epoch counts of the config (train_epochs, warm-up, decay) are divided by this: the method's step cost in
    # vanilla steps when it matches vanilla's budget (Fast AdvProp), else 1.
    budget_scale: float = 1.0

    @property
    def schedule_steps_per_epoch(self) -> float:
        return self.steps_per_epoch / self.budget_scale


def images_per_replica(config: TrainConfig, replicas: int = 1) -> int:
    """Images each replica's step reads: its share of the clean batch, plus what its method reads on top."""
    return config.method.record.images_per_replica(config.method, config.optimization.train_batch_size // replicas)


def budget_scale(config: TrainConfig, replicas: int = 1) -> float:
    return config.method.record.budget_scale(config.method, images_per_replica(config, replicas))


def training_length(config: TrainConfig, source, replicas: int = 1) -> Length:
    """Epochs count the images read: a step reads images_per_replica x replicas of them."""
    steps_per_epoch = max(1, examples_per_epoch(config, source) // (images_per_replica(config, replicas) * replicas))
    scale = budget_scale(config, replicas)
    opt = config.optimization
    total = opt.train_steps or int(math.ceil(opt.train_epochs / scale * steps_per_epoch))
    return Length(steps_per_epoch, total, scale)


def build_model(config: TrainConfig, num_classes: int):
    """The network; a keras:<name> that cannot become multi-domain (no BN, too small an input) is --model's error."""
    from advprop_tf.models.keras_conversion import ConversionError

    try:
        return _build_model(config, num_classes)
    except ConversionError as e:
        raise ConfigError("model", str(e)) from None


def _build_model(config: TrainConfig, num_classes: int):
    model = config.model
    return build_network(
        model.model, num_classes=num_classes, domains=config.method.domains.names,
        input_normalization=model.normalization, resolution=model.resolution,
        width_coefficient=model.width_coefficient, depth_coefficient=model.depth_coefficient,
        dropout_rate=model.dropout_rate, drop_connect_rate=model.drop_connect_rate, synchronized_bn=model.sync_bn,
        weights=model.keras_weights,
    )


def build_optimization(config: TrainConfig, model, length: Length):
    """(learning-rate schedule, optimizer, EMA or None)."""
    opt = config.optimization
    schedule = make_schedule(
        opt.lr_schedule, scaled_learning_rate(opt.train_batch_size, opt.base_learning_rate),
        length.schedule_steps_per_epoch, length.total_steps, opt.warmup_epochs, opt.lr_decay_epochs, opt.lr_decay_rate,
        boundary_epochs=opt.lr_decay_boundaries, warmup_from=opt.base_learning_rate,
    )
    optimizer = make_optimizer(opt.optimizer, schedule, model, skip_non_finite=opt.on_nan == "skip",
                               loss_scaling=opt.mixed_precision == "float16")
    ema = ExponentialMovingAverage(model, opt.ema_decay) if opt.ema_decay > 0 else None
    return schedule, optimizer, ema


def step_config(config: TrainConfig, *, num_classes: int, total_steps: int, seed: int) -> StepConfig:
    method, opt = config.method, config.optimization
    return StepConfig(
        global_batch_size=opt.train_batch_size, num_classes=num_classes, label_smoothing=opt.label_smoothing,
        weight_decay=opt.weight_decay, attack=method.attack, epsilon_schedule=method.epsilon_schedule,
        total_steps=total_steps, clean_weight=method.clean_loss_weight, adv_weight=method.adv_weight,
        adv_fraction=method.adv_fraction, noisy_weight=method.noisy_loss_weight, seed=seed,
        jit_compile=opt.jit_compile, domains=method.domains,
    )


def build_train_step(config: TrainConfig, model, optimizer, ema, strategy, *, num_classes: int, total_steps: int,
                     seed: int) -> TrainStep:
    return TrainStep(model, config.method.record, optimizer,
                     step_config(config, num_classes=num_classes, total_steps=total_steps, seed=seed), strategy, ema)
