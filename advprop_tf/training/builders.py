"""Pure builders of a run's parts from a config namespace (advprop_tf/config.py).

Each takes what it needs and returns a new object; nothing here reads or
writes the run directory or picks a strategy. The Trainer (loop.py) calls
them inside its strategy's scope.
"""

from __future__ import annotations

import dataclasses
import math

from advprop_tf.config import FAST_ADVPROP_ATTACK, adv_loss_weight, attack_steps, input_normalization, model_domains
from advprop_tf.data.sources import parse_source
from advprop_tf.methods import (
    AttackConfig,
    attacked_count,
    fast_advprop_budget_scale,
    get_method,
    loaded_batch_size,
    parse_epsilon_schedule,
)
from advprop_tf.models import build_model as build_network
from advprop_tf.training.ema import ExponentialMovingAverage
from advprop_tf.training.optimization import make_optimizer, make_schedule, scaled_learning_rate
from advprop_tf.training.run_dir import MEANING_FLAGS
from advprop_tf.training.step import StepConfig, TrainStep

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def synthetic_size(cfg) -> int:
    """Side of the synthetic images: what the eval crop (0.875) of the model resolution needs."""
    return int(math.ceil((cfg.resolution or 224) / 0.875))


def data_options(cfg) -> dict:
    """What parse_source needs besides the dataset spec (recorded so that evaluate can reopen it)."""
    return dict(data_dir=cfg.data_dir, num_classes=cfg.num_classes, holdout_fraction=cfg.holdout_fraction,
                synthetic_examples=cfg.synthetic_examples, synthetic_size=synthetic_size(cfg))


def build_source(cfg):
    options = data_options(cfg)
    return parse_source(cfg.dataset, options["data_dir"], options["num_classes"], options["holdout_fraction"],
                        synthetic_size=options["synthetic_size"],
                        synthetic_examples=options["synthetic_examples"], seed=0)


def model_num_classes(cfg, source) -> int:
    """--num_classes, else the source's; fewer model classes than the data's labels is an error
    (tf.one_hot would make zero targets of the labels above, and train on nothing)."""
    if cfg.num_classes is None:
        return source.num_classes
    if source.num_classes_known and cfg.num_classes < source.num_classes:
        raise ValueError(f"--num_classes: {cfg.num_classes} is fewer than the {source.num_classes} classes of "
                         f"--dataset={cfg.dataset}; its labels {cfg.num_classes}..{source.num_classes - 1} would "
                         f"train toward no class. Pass --num_classes={source.num_classes} (or more)")
    return cfg.num_classes


def meaning_flags(cfg) -> dict:
    """The flags that fix what a run is (compared on resume)."""
    return {name: (list(value) if isinstance(value, (list, tuple)) else value)
            for name in MEANING_FLAGS for value in [getattr(cfg, name)]}


@dataclasses.dataclass(frozen=True)
class Length:
    steps_per_epoch: int  # steps of one pass over the training data
    total_steps: int
    # Epoch counts of the config (--train_epochs, warm-up, decay) are divided by this: 1 except
    # for fast_advprop, whose step costs budget_scale vanilla steps (--match_vanilla_budget).
    budget_scale: float = 1.0

    @property
    def schedule_steps_per_epoch(self) -> float:
        return self.steps_per_epoch / self.budget_scale


def images_per_replica(cfg, replicas: int = 1) -> int:
    """Images each replica's step reads: its share of --train_batch_size, plus, for fast_advprop, the
    attacked images on top of those clean ones."""
    clean = cfg.train_batch_size // replicas
    return loaded_batch_size(clean, cfg.adv_fraction) if cfg.method == "fast_advprop" else clean


def budget_scale(cfg, replicas: int = 1) -> float:
    if cfg.method == "fast_advprop" and cfg.match_vanilla_budget:
        loaded = images_per_replica(cfg, replicas)
        return fast_advprop_budget_scale(attacked_count(loaded, cfg.adv_fraction) / loaded, attack_steps(cfg))
    return 1.0


def training_length(cfg, source, replicas: int = 1) -> Length:
    """Epochs count the images read: a step reads images_per_replica x replicas of them."""
    examples = source.num_examples("train") or cfg.num_train_examples or IMAGENET_TRAIN_EXAMPLES
    steps_per_epoch = max(1, examples // (images_per_replica(cfg, replicas) * replicas))
    scale = budget_scale(cfg, replicas)
    total = cfg.train_steps or int(math.ceil(cfg.train_epochs / scale * steps_per_epoch))
    return Length(steps_per_epoch, total, scale)


def build_model(cfg, num_classes: int):
    return build_network(
        cfg.model, num_classes=num_classes, domains=model_domains(cfg.method, cfg.aux_domains),
        input_normalization=input_normalization(cfg), resolution=cfg.resolution,
        width_coefficient=cfg.width_coefficient, depth_coefficient=cfg.depth_coefficient,
        dropout_rate=cfg.dropout_rate, drop_connect_rate=cfg.drop_connect_rate,
        synchronized_bn=cfg.sync_bn,
    )


def build_optimization(cfg, model, length: Length):
    """(learning-rate schedule, optimizer, EMA or None)."""
    schedule = make_schedule(
        cfg.lr_schedule, scaled_learning_rate(cfg.train_batch_size, cfg.base_learning_rate),
        length.schedule_steps_per_epoch, length.total_steps, cfg.warmup_epochs, cfg.lr_decay_epochs, cfg.lr_decay_rate,
        boundary_epochs=[float(e) for e in cfg.lr_decay_boundaries], warmup_from=cfg.base_learning_rate,
    )
    optimizer = make_optimizer(cfg.optimizer, schedule, model, skip_non_finite=cfg.on_nan == "skip",
                               loss_scaling=cfg.mixed_precision == "float16")
    ema = ExponentialMovingAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    return schedule, optimizer, ema


def build_train_step(cfg, model, optimizer, ema, strategy, *, num_classes: int, total_steps: int, seed: int):
    attack = dict(targeted=cfg.targeted, random_start=cfg.random_start, attack_bn_mode=cfg.attack_bn_mode)
    if cfg.method == "fast_advprop":
        attack.update(FAST_ADVPROP_ATTACK)
    config = StepConfig(
        global_batch_size=cfg.train_batch_size, num_classes=num_classes,
        label_smoothing=cfg.label_smoothing, weight_decay=cfg.weight_decay,
        attack=AttackConfig(cfg.epsilon, attack_steps(cfg), cfg.attack_step_size,
                            prob_start_from_clean=cfg.prob_start_from_clean,
                            fixed_num_steps=cfg.attack_steps is not None, **attack),
        epsilon_schedule=tuple(parse_epsilon_schedule(cfg.epsilon_schedule)) if cfg.epsilon_schedule else None,
        total_steps=total_steps, clean_weight=cfg.clean_loss_weight, adv_weight=adv_loss_weight(cfg),
        adv_fraction=cfg.adv_fraction, noisy_weight=cfg.noisy_loss_weight,
        seed=seed, jit_compile=cfg.jit_compile, skip_non_finite=cfg.on_nan == "skip",
    )
    return TrainStep(model, get_method(cfg.method), optimizer, config, strategy, ema)
