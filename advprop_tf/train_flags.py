"""The training command line's flags, and their mapping onto the typed TrainConfig (config.py).

Only the command lines (train.py, tools/) import this module; library code
sees the config sections. A ConfigError from a section names a field; the
command line shows it as its flag (`flag_of`), `--<flag>: <reason>`.
A config file is an absl flagfile (configs/*.flags); flags given on the
command line after --flagfile override it.
"""

from __future__ import annotations

import dataclasses
import importlib

from absl import flags

from advprop_tf.attacks.pgd import ATTACK_BN_MODES, AttackConfig
from advprop_tf.config import (
    LR_SCHEDULES,
    NAN_POLICIES,
    OPTIMIZERS,
    PRECISIONS,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimizationConfig,
    RunConfig,
    StrategyConfig,
    TrainConfig,
    check_paths,
)
from advprop_tf.data.pipeline import AUGMENTATIONS
from advprop_tf.data.preprocessing import EVAL_CROPS
from advprop_tf.data.sources import SOURCE_KINDS
from advprop_tf.errors import ConfigError
from advprop_tf.methods import DEFAULT_METHOD, METHODS
from advprop_tf.models.base import INPUT_NORMALIZATIONS
from advprop_tf.models.registry import MODEL_NAMES

# The attack's fields under their training flags; every other field is its own flag.
ATTACK_FLAGS = {"epsilon": "epsilon", "num_steps": "attack_steps", "step_size": "attack_step_size",
                "targeted": "targeted", "random_start": "random_start",
                "prob_start_from_clean": "prob_start_from_clean", "attack_bn_mode": "attack_bn_mode"}
SECTIONS = {"model": ModelConfig, "data": DataConfig, "method": MethodConfig, "optimization": OptimizationConfig,
            "run": RunConfig, "strategy": StrategyConfig}


class _Definer:
    """flags.DEFINE_* bound to one FlagValues (the global FLAGS, or a fresh one for make_config)."""

    def __init__(self, flag_values):
        self._fv = flag_values

    def __getattr__(self, name):
        define = getattr(flags, name)
        return lambda *args, **kwargs: define(*args, flag_values=self._fv, **kwargs)


def _define_model_flags(d):
    """The model section's flags."""
    d.DEFINE_string("model", "efficientnet-b0", f"One of {', '.join(MODEL_NAMES)}, or keras:<a keras.applications "
                    "constructor>, e.g. keras:EfficientNetV2B0.")
    d.DEFINE_integer("num_classes", None, "Classes; default: from the dataset (1000 for TFRecords).")
    d.DEFINE_integer("resolution", None, "Input size; default: the model's.")
    d.DEFINE_float("width_coefficient", None, "Override the model's width multiplier.")
    d.DEFINE_float("depth_coefficient", None, "Override the model's depth multiplier.")
    d.DEFINE_float("dropout_rate", None, "Override the model's head dropout.")
    d.DEFINE_float("drop_connect_rate", None, "Stochastic depth of the last block; default: the model's "
                   "(EfficientNet 0.2, ResNet 0).")
    d.DEFINE_enum("input_normalization", None, list(INPUT_NORMALIZATIONS),
                  "How the model maps [0, 255] pixels; default: the family's (EfficientNet: inception [-1, 1] "
                  "as AdvProp's checkpoints, ResNet: imagenet mean/std as the authors' ResNets).")
    d.DEFINE_list("aux_domains", ["adv"],
                  "Auxiliary BN domains (methods with auxiliary BNs) after the main one: adv gets PGD images "
                  "at --epsilon; adv<eps>, e.g. adv1,adv2,adv4, one BN per epsilon; randaugment or autoaugment "
                  "an input view, e.g. autoaugment,adv.")
    d.DEFINE_bool("sync_bn", False, "Synchronize BN statistics across replicas.")
    d.DEFINE_string("keras_weights", None, "--model=keras:<name>: imagenet (downloaded by Keras) or a weight file of "
                    "that network without its top (include_top=False, pooling='avg'); default: random.")


def _define_data_flags(d):
    """The data section's flags."""
    d.DEFINE_string("dataset", "synthetic", f"Data source: {', '.join(k + ':...' for k in SOURCE_KINDS[1:])} or synthetic.")
    d.DEFINE_string("data_dir", None, "Location for tfrecord/folder sources, or TFDS data_dir.")
    d.DEFINE_float("holdout_fraction", 0.0, "folder: fraction of images held out for validation.")
    d.DEFINE_integer("synthetic_examples", 10_000, "synthetic: training examples.")
    d.DEFINE_integer("num_train_examples", None, "Examples per epoch when the source cannot tell (TFRecords: 1281167).")
    d.DEFINE_enum("augment", "none", list(AUGMENTATIONS),
                  "Augmentation of the clean images: autoaugment (ImageNet policy v0, the paper's AdvProp "
                  "setting), randaugment (the authors' RandAugment), or keras_cv_randaugment (keras-cv's, "
                  "a different algorithm; magnitude <= 10).")
    d.DEFINE_float("crop_min_area", 0.08, "Smallest random crop, as a fraction of the image (authors: 0.08; "
                   "larger values suit short runs on small data).")
    d.DEFINE_integer("randaugment_layers", 2, "RandAugment layers.")
    d.DEFINE_float("randaugment_magnitude", 10.0, "RandAugment magnitude on the authors' scale (10 = their "
                   "_MAX_LEVEL, not a cap: B5 17, B7/B8 28).")
    d.DEFINE_enum("eval_crop", "center", list(EVAL_CROPS), "Evaluation crop: center (the authors' 0.875) or "
                  "none (resize only, for validation images that are already cropped).")
    d.DEFINE_integer("shuffle_buffer", 10_000, "Shuffle buffer (examples).")
    d.DEFINE_integer("seed", None, "Seed for a deterministic input order and attack randomness.")


def _define_method_flags(d):
    """The method section's flags."""
    d.DEFINE_string("method", DEFAULT_METHOD, f"Training objective: {', '.join(METHODS)}, or one that a "
                    "--method_modules module registers.")
    d.DEFINE_list("method_modules", [], "Python modules to import first; the methods they register "
                  "(advprop_tf.methods.register) can then be --method.")
    d.DEFINE_float("epsilon", 1.0, "PGD L-inf radius in pixels (0-255).")
    d.DEFINE_integer("attack_steps", None, "PGD iterations; default: the paper's epsilon+1 (1 for epsilon 1).")
    d.DEFINE_float("attack_step_size", 1.0, "PGD step in pixels.")
    d.DEFINE_bool("targeted", True, "Attack toward a random wrong class (authors) or not.")
    d.DEFINE_bool("random_start", False, "Start PGD at a random point of the epsilon-ball.")
    d.DEFINE_float("prob_start_from_clean", 0.2, "With --random_start: the fraction of batches whose attack "
                   "starts from the clean images instead (the authors' adversarial-training code: 0.2).")
    d.DEFINE_enum("attack_bn_mode", "inference", list(ATTACK_BN_MODES),
                      "BN during the attack: running statistics (authors' adversarial training code), "
                      "or batch statistics that are not written back.")
    d.DEFINE_string("epsilon_schedule", "", "Fine-grained AdvProp: 'fraction:eps,...', e.g. 0:1,0.5:2,0.8:4.")
    d.DEFINE_float("clean_loss_weight", 1.0, "Weight of the clean loss.")
    d.DEFINE_float("adv_loss_weight", None, "Weight of each auxiliary domain's loss; default: the method's "
                   f"({', '.join(f'{m.name} {m.default_adv_weight:g}' for m in METHODS.values() if m.attacks)}).")


def _define_attacked_share_flags(d):
    """Fast AdvProp (Mei et al., ICLR 2022): the attacked share of a step's images."""
    d.DEFINE_float("adv_fraction", 0.2, "Fast AdvProp: share p_adv of the images a step reads that is attacked; "
                   "the attacked images come on top of the clean batch (--train_batch_size).")
    d.DEFINE_float("noisy_loss_weight", 0.5, "Fast AdvProp: weight of the attack's own pass (the randomly "
                   "started images through the auxiliary BN), whose gradients are reused.")
    d.DEFINE_bool("match_vanilla_budget", True, "Fast AdvProp: divide every epoch count (--train_epochs, "
                  "warm-up, decay) by its step's cost in vanilla steps, so the run costs what vanilla's would.")


def _define_optimization_flags(d):
    """The optimization section's flags."""
    d.DEFINE_integer("train_batch_size", 2048, "Global batch of clean images.")
    d.DEFINE_integer("eval_batch_size", 1024, "Global eval batch.")
    d.DEFINE_float("train_epochs", 350.0, "Training length in epochs (ignored if --train_steps).")
    d.DEFINE_integer("train_steps", None, "Training length in steps.")
    d.DEFINE_enum("optimizer", "rmsprop", list(OPTIMIZERS), "RMSProp (authors) or SGD+Nesterov.")
    d.DEFINE_enum("lr_schedule", "exponential", list(LR_SCHEDULES),
                  "Learning-rate schedule: exponential (EfficientNet), step (ResNet), cosine, constant.")
    d.DEFINE_float("base_learning_rate", 0.016, "Learning rate per 256 images.")
    d.DEFINE_float("warmup_epochs", 5.0, "Linear warm-up.")
    d.DEFINE_float("lr_decay_epochs", 2.4, "Staircase decay period.")
    d.DEFINE_float("lr_decay_rate", 0.97, "Decay factor (exponential: per period; step: per boundary).")
    d.DEFINE_list("lr_decay_boundaries", [], "step: the epochs at which the lr is multiplied by --lr_decay_rate "
                  "(the authors' ResNets: 35,70,95 of 110); the warm-up starts at --base_learning_rate.")
    d.DEFINE_float("weight_decay", 1e-5, "L2 on non-BN weights (x sum of l2_loss).")
    d.DEFINE_float("label_smoothing", 0.1, "Label smoothing.")
    d.DEFINE_float("ema_decay", 0.9999, "EMA of weights and BN statistics; 0 disables.")
    d.DEFINE_enum("mixed_precision", "none", list(PRECISIONS), "Mixed precision.")
    d.DEFINE_bool("jit_compile", False, "XLA-compile the step (on several GPU/CPU replicas: attack, forward and "
                  "backward; on one replica and on TPUs: the whole replica step).")
    d.DEFINE_enum("on_nan", "stop", list(NAN_POLICIES), "Non-finite loss: stop the run, or skip the step.")


def _define_run_flags(d):
    """The run section's flags."""
    d.DEFINE_string("model_dir", None, "Checkpoints, summaries, eval results, export.")
    d.DEFINE_integer("steps_per_loop", 50, "Steps per host loop call (and log line).")
    d.DEFINE_integer("checkpoint_every_steps", 1000, "Checkpoint period.")
    d.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
    d.DEFINE_integer("eval_every_steps", 0, "Evaluation period (0: only at the end).")
    d.DEFINE_integer("eval_steps", 0, "Eval batches (0: the whole split).")
    d.DEFINE_bool("export", True, "Export a main-BN SavedModel to <model_dir>/export/<version> at the end.")
    d.DEFINE_bool("checkpoint_input_pipeline", True, "Save the input iterator's position (not on TPU).")
    d.DEFINE_string("init_checkpoint", None,
                    "Start from these weights when model_dir has no checkpoint: a converted or training "
                    "directory (or checkpoint prefix), an authors' TF1 checkpoint, or a Keras .h5 file. "
                    "Auxiliary BNs start as copies of the main BN.")
    d.DEFINE_bool("init_skip_head", False, "Keep a fresh classifier (a different number of classes).")
    d.DEFINE_bool("init_use_ema", True, "Take the init checkpoint's EMA values when it has them.")


def _define_strategy_flags(d):
    """The strategy section's flags."""
    d.DEFINE_string("tpu", "", "TPU name, or 'local' on a TPU VM.")
    d.DEFINE_integer("num_gpus", -1, "GPUs for MirroredStrategy (-1: all visible).")
    d.DEFINE_string("worker_hosts", "", "host:port,... for MultiWorkerMirroredStrategy (or TF_CONFIG).")
    d.DEFINE_integer("task_index", 0, "This worker's index in --worker_hosts.")
    d.DEFINE_bool("allow_config_change", False,
                  "Resume a run although a flag that fixes its meaning (model, method, domains, global batch, "
                  "resolution, classes, dataset) differs from the one it was started with.")


# What `--help` lists under each title, in this order.
FLAG_GROUPS = {
    "data": (_define_data_flags,),
    "model": (_define_model_flags,),
    "method and attack": (_define_method_flags, _define_attacked_share_flags),
    "optimization": (_define_optimization_flags,),
    "run and checkpoints": (_define_run_flags,),
    "distribution": (_define_strategy_flags,),
}


def define_train_flags(flag_values=None):
    """Define every training flag on `flag_values` (the global FLAGS by default)."""
    d = _Definer(flags.FLAGS if flag_values is None else flag_values)
    for defines in FLAG_GROUPS.values():
        for define in defines:
            define(d)


def flag_groups() -> dict:
    """{title: the training flags of that group}, for --help."""
    groups = {}
    for title, defines in FLAG_GROUPS.items():
        fv = flags.FlagValues()
        for define in defines:
            define(_Definer(fv))
        groups[title] = list(fv)
    return groups


def flag_of(field: str) -> str:
    """The training flag of a config field."""
    return ATTACK_FLAGS.get(field, field)


def flag_error(error: ConfigError) -> str:
    """A ConfigError as the command line shows it."""
    return f"--{flag_of(error.field)}: {error.reason}"


def _given(values, name) -> bool:
    """Whether flag `name` was set explicitly (FlagValues know; a plain dict of overrides counts as given)."""
    try:
        return values[name].present
    except (TypeError, KeyError, AttributeError):
        return False


def import_method_modules(modules) -> None:
    """Import the modules that register more methods (--method_modules)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # any import failure is the flag's problem, shown as one line
            raise ConfigError("method_modules", f"cannot import {module!r}: {type(e).__name__}: {e}") from None


def config_from_values(values, given=()) -> TrainConfig:
    """The TrainConfig of a mapping flag name -> value; `given`: the flags set explicitly. Raises ConfigError."""
    import_method_modules(values.get("method_modules") or ())
    attack_fields = {field: values[flag] for field, flag in ATTACK_FLAGS.items()}
    attack = AttackConfig(**attack_fields)
    sections = {}
    for name, section in SECTIONS.items():
        fields = {f.name: values[f.name] for f in dataclasses.fields(section) if f.name in values}
        if section is MethodConfig:
            fields.update(attack=attack, given_attack=frozenset(f for f, flag in ATTACK_FLAGS.items() if flag in given))
            fields["aux_domains"] = tuple(values["aux_domains"])
            fields["epsilon_schedule"] = values["epsilon_schedule"] or None
        if section is OptimizationConfig:
            fields["lr_decay_boundaries"] = tuple(values["lr_decay_boundaries"])
        sections[name] = section(**fields)
    return TrainConfig(**sections)


def config_from_flags(flag_values=None, check_files=True) -> TrainConfig:
    """The TrainConfig of parsed flags; ConfigError (see flag_error) for the first bad flag or combination."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    names = [name for name in _defined(flag_values)]
    values = {name: flag_values[name].value for name in names}
    config = config_from_values(values, given={name for name in names if _given(flag_values, name)})
    if check_files:
        check_paths(config)
    return config


def _defined(flag_values):
    fresh = flags.FlagValues()
    define_train_flags(fresh)
    return [name for name in fresh if name in flag_values]


def default_values() -> dict:
    fv = flags.FlagValues()
    define_train_flags(fv)
    fv(["train"])
    return {name: fv[name].value for name in fv}


def make_config(**overrides) -> TrainConfig:
    """The TrainConfig of every training flag at its default, then `overrides` by flag name (tests, tools).
    Overridden attack flags count as given."""
    values = default_values()
    for name in overrides:
        if name not in values:
            raise ConfigError(name, "unknown flag")
    values.update(overrides)
    return config_from_values(values, given=set(overrides))
