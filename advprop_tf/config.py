"""All training flags, grouped, and their validation.

Invalid values and contradictory combinations are found here, before any
graph is built; each problem is reported as one line naming the flag.
A config file is an absl flagfile (configs/*.flags); flags given on the
command line after --flagfile override it.
"""

from __future__ import annotations

from absl import flags

from advprop_tf.attacks.pgd import steps_for_epsilon
from advprop_tf.data.pipeline import AUGMENTATIONS, VIEWS
from advprop_tf.data.preprocessing import EVAL_CROPS
from advprop_tf.data.sources import SOURCE_KINDS
from advprop_tf.methods import ATTACK_BN_MODES, METHODS, domain_epsilon, parse_epsilon_schedule
from advprop_tf.models.base import INPUT_NORMALIZATIONS
from advprop_tf.models.registry import MODEL_NAMES, default_input_normalization
from advprop_tf.training.optimization import SCHEDULES

FLAGS = flags.FLAGS


class FlagError(ValueError):
    """A bad flag value: `flag` names it."""

    def __init__(self, flag: str, reason: str):
        super().__init__(f"--{flag}: {reason}")
        self.flag = flag


class _Definer:
    """flags.DEFINE_* bound to one FlagValues (the global FLAGS, or a fresh one for make_config)."""

    def __init__(self, flag_values):
        self._fv = flag_values

    def __getattr__(self, name):
        define = getattr(flags, name)
        return lambda *args, **kwargs: define(*args, flag_values=self._fv, **kwargs)


def define_train_flags(flag_values=FLAGS):
    d = _Definer(flag_values)
    # -- model
    d.DEFINE_string("model", "efficientnet-b0", f"One of {', '.join(MODEL_NAMES)}.")
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
                  "Auxiliary BN domains of AdvProp after 'clean': names starting with 'adv' get PGD "
                  "images (adv: --epsilon; adv<eps>, e.g. adv1,adv2,adv4: one BN per epsilon), others an "
                  "input view (randaugment, autoaugment), e.g. autoaugment,adv.")
    d.DEFINE_bool("sync_bn", False, "Synchronize BN statistics across replicas.")
    # -- data
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
    # -- method
    d.DEFINE_enum("method", "advprop", list(METHODS), "Training objective.")
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
    d.DEFINE_float("adv_loss_weight", None, "Weight of each auxiliary domain's loss; default: 1 "
                   f"(fast_advprop: {FAST_ADVPROP_ADV_WEIGHT:g}, the paper's).")
    # -- fast_advprop (Mei et al., ICLR 2022)
    d.DEFINE_float("adv_fraction", 0.2, "fast_advprop: share p_adv of each batch that is attacked (the rest "
                   "is only clean); per replica round(p_adv x batch) images.")
    d.DEFINE_float("noisy_loss_weight", 0.5, "fast_advprop: weight of the attack's own pass (the randomly "
                   "started images through the auxiliary BN), whose gradients are reused.")
    d.DEFINE_bool("match_vanilla_budget", True, "fast_advprop: divide every epoch count (--train_epochs, "
                  "warm-up, decay) by p_adv x attack steps + 1, so the run costs what vanilla's would.")
    # -- optimization
    d.DEFINE_integer("train_batch_size", 2048, "Global batch of clean images.")
    d.DEFINE_integer("eval_batch_size", 1024, "Global eval batch.")
    d.DEFINE_float("train_epochs", 350.0, "Training length in epochs (ignored if --train_steps).")
    d.DEFINE_integer("train_steps", None, "Training length in steps.")
    d.DEFINE_enum("optimizer", "rmsprop", ["rmsprop", "sgd"], "RMSProp (authors) or SGD+Nesterov.")
    d.DEFINE_enum("lr_schedule", "exponential", list(SCHEDULES),
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
    d.DEFINE_enum("mixed_precision", "none", ["none", "float16", "bfloat16"], "Mixed precision.")
    d.DEFINE_bool("jit_compile", False, "XLA-compile attack + forward + backward.")
    d.DEFINE_enum("on_nan", "stop", ["stop", "skip"], "Non-finite loss: stop the run, or skip the step.")
    # -- run
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
    # -- strategy
    d.DEFINE_string("tpu", "", "TPU name, or 'local' on a TPU VM.")
    d.DEFINE_integer("num_gpus", -1, "GPUs for MirroredStrategy (-1: all visible).")
    d.DEFINE_string("worker_hosts", "", "host:port,... for MultiWorkerMirroredStrategy (or TF_CONFIG).")
    d.DEFINE_integer("task_index", 0, "This worker's index in --worker_hosts.")
    d.DEFINE_bool("allow_config_change", False,
                  "Resume a run although a flag that fixes its meaning (model, method, domains, global batch, "
                  "resolution, classes, dataset) differs from the one it was started with.")


def make_config(**overrides):
    """A namespace with every training flag at its default, then `overrides` (for tests and tools)."""
    import types

    fv = flags.FlagValues()
    define_train_flags(fv)
    fv(["advprop_tf"])
    values = {name: fv[name].value for name in fv}
    for name, value in overrides.items():
        if name not in values:
            raise FlagError(name, "unknown flag")
        values[name] = value
    return types.SimpleNamespace(**values)


def config_from_flags(f=FLAGS):
    import types

    fv = flags.FlagValues()
    define_train_flags(fv)
    return types.SimpleNamespace(**{name: f[name].value for name in fv})


FAST_ADVPROP_ADV_WEIGHT = 0.5
# Set by the method itself: gradient reuse needs the true-label (untargeted) loss of a training-mode
# pass, which starts at a random point by definition.
FAST_ADVPROP_ATTACK = {"targeted": False, "random_start": True, "attack_bn_mode": "batch"}


def adv_loss_weight(f=FLAGS) -> float:
    """--adv_loss_weight, or the method's default."""
    if f.adv_loss_weight is not None:
        return f.adv_loss_weight
    return FAST_ADVPROP_ADV_WEIGHT if f.method == "fast_advprop" else 1.0


def _given(f, name) -> bool:
    """Whether flag `name` was set explicitly (FlagValues know; a plain namespace does not)."""
    try:
        return f[name].present
    except (TypeError, KeyError):
        return False


def model_domains(method: str, aux_domains) -> tuple:
    if method in ("advprop", "fast_advprop"):
        return ("clean",) + tuple(aux_domains)
    return ("clean",)


def validate_train_flags(f=FLAGS):
    """Raise FlagError for the first invalid flag or combination (no graph is built)."""
    if f.model not in MODEL_NAMES:
        raise FlagError("model", f"unknown model {f.model!r}; valid: {', '.join(MODEL_NAMES)}")
    if not f.model_dir:
        raise FlagError("model_dir", "is required (checkpoints, summaries and the export go there)")
    if f.epsilon < 0:
        raise FlagError("epsilon", f"must be >= 0, got {f.epsilon:g}")
    if not 0 <= f.prob_start_from_clean <= 1:
        raise FlagError("prob_start_from_clean", f"must be in [0, 1], got {f.prob_start_from_clean:g}")
    for name in ("dropout_rate", "drop_connect_rate"):
        value = getattr(f, name)
        if value is not None and not 0 <= value < 1:
            raise FlagError(name, f"must be in [0, 1), got {value:g}")
    if f.keep_checkpoints < 1:
        raise FlagError("keep_checkpoints", f"must be >= 1 (the newest checkpoint is what a resume needs), "
                        f"got {f.keep_checkpoints}")
    for name in ("clean_loss_weight", "adv_loss_weight", "noisy_loss_weight"):
        if getattr(f, name) is not None and getattr(f, name) < 0:
            raise FlagError(name, f"must be >= 0, got {getattr(f, name):g}")
    if f.clean_loss_weight == 0 and (adv_loss_weight(f) == 0 or f.method == "vanilla"):
        raise FlagError("clean_loss_weight", "is 0 and no other loss is left to train on")
    if f.weight_decay < 0:
        raise FlagError("weight_decay", f"must be >= 0, got {f.weight_decay:g}")
    if f.base_learning_rate <= 0:
        raise FlagError("base_learning_rate", f"must be > 0, got {f.base_learning_rate:g}")
    if f.warmup_epochs < 0:
        raise FlagError("warmup_epochs", f"must be >= 0, got {f.warmup_epochs:g}")
    if f.eval_every_steps < 0 or f.eval_steps < 0:
        flag = "eval_every_steps" if f.eval_every_steps < 0 else "eval_steps"
        raise FlagError(flag, f"must be >= 0, got {getattr(f, flag)}")
    if f.randaugment_magnitude < 0:
        raise FlagError("randaugment_magnitude", f"must be >= 0, got {f.randaugment_magnitude:g}")
    if f.randaugment_layers < 1:
        raise FlagError("randaugment_layers", f"must be >= 1, got {f.randaugment_layers}")
    if f.augment == "keras_cv_randaugment" and f.randaugment_magnitude > 10:
        raise FlagError("randaugment_magnitude", f"keras-cv's RandAugment caps it at 10, got "
                        f"{f.randaugment_magnitude:g}; --augment=randaugment (the authors') takes any magnitude")
    if f.tpu and f.worker_hosts:
        raise FlagError("worker_hosts", "contradicts --tpu: a TPU pod slice finds its hosts itself")
    if f.attack_step_size <= 0:
        raise FlagError("attack_step_size", f"must be > 0, got {f.attack_step_size:g}")
    if f.attack_steps is not None and f.attack_steps < 1 and f.epsilon > 0:
        raise FlagError("attack_steps", f"must be >= 1 when --epsilon > 0, got {f.attack_steps}")
    if f.epsilon_schedule:
        if f.method == "vanilla":
            raise FlagError("epsilon_schedule", "contradicts --method=vanilla, which has no attack")
        try:
            parse_epsilon_schedule(f.epsilon_schedule)
        except ValueError as e:
            raise FlagError("epsilon_schedule", str(e)) from None
    for name in ("train_batch_size", "eval_batch_size", "steps_per_loop", "checkpoint_every_steps"):
        if getattr(f, name) < 1:
            raise FlagError(name, f"must be >= 1, got {getattr(f, name)}")
    if f.train_steps is not None and f.train_steps < 1:
        raise FlagError("train_steps", f"must be >= 1, got {f.train_steps}")
    if f.train_steps is None and f.train_epochs <= 0:
        raise FlagError("train_epochs", f"must be > 0, got {f.train_epochs:g}")
    if f.resolution is not None and f.resolution < 32:
        raise FlagError("resolution", f"must be >= 32 (the network downsamples 32x), got {f.resolution}")
    if f.num_classes is not None and f.num_classes < 2:
        raise FlagError("num_classes", f"must be >= 2, got {f.num_classes}")
    if not 0 <= f.label_smoothing < 1:
        raise FlagError("label_smoothing", f"must be in [0, 1), got {f.label_smoothing:g}")
    if not 0 <= f.ema_decay < 1:
        raise FlagError("ema_decay", f"must be in [0, 1), got {f.ema_decay:g}")
    if f.method == "advprop":
        if not f.aux_domains:
            raise FlagError("aux_domains", "AdvProp needs at least one auxiliary domain, e.g. adv")
        if len(set(f.aux_domains)) != len(f.aux_domains) or "clean" in f.aux_domains:
            raise FlagError("aux_domains", f"names must be unique and not 'clean', got {f.aux_domains}")
        if not any(d.startswith("adv") for d in f.aux_domains):
            raise FlagError("aux_domains", f"AdvProp needs an adversarial domain (a name starting with 'adv'), got {f.aux_domains}")
        for d in f.aux_domains:
            if not d.startswith("adv") and d not in VIEWS:
                raise FlagError("aux_domains", f"{d!r} is neither adversarial (adv...) nor an input view "
                                f"({', '.join(VIEWS)})")
            if d.startswith("adv"):
                try:
                    domain_epsilon(d)
                except ValueError as e:
                    raise FlagError("aux_domains", str(e)) from None
            if d == f.augment:
                raise FlagError("aux_domains", f"the view {d!r} is what --augment={f.augment} already does to "
                                "the clean images: its BN would see the same distribution as the main one")
        if f.epsilon_schedule and "adv" not in f.aux_domains:
            raise FlagError("epsilon_schedule", f"schedules the epsilon of the domain 'adv', which "
                            f"--aux_domains={','.join(f.aux_domains)} does not have")
    if f.method == "fast_advprop":
        _validate_fast_advprop(f)
    if f.mixed_precision == "float16" and f.tpu:
        raise FlagError("mixed_precision", "float16 is for GPUs; use bfloat16 on TPU")
    if f.tpu and f.num_gpus > 0:
        raise FlagError("tpu", "contradicts --num_gpus: choose TPU or GPUs")
    kind = f.dataset.partition(":")[0]
    if kind not in SOURCE_KINDS:
        raise FlagError("dataset", f"unknown data source {f.dataset!r}; valid kinds: {', '.join(SOURCE_KINDS)}")
    location = f.dataset.partition(":")[2]
    if kind in ("folder", "tfrecord") and not (location or f.data_dir):
        raise FlagError("data_dir", f"--dataset={f.dataset} needs a location: '{kind}:<path>' or --data_dir")
    if kind in ("folder", "tfrecord"):
        path = location or f.data_dir
        flag = "dataset" if location else "data_dir"
        if "*" not in path and "{split}" not in path and not _exists(path, flag):
            raise FlagError(flag, f"{path!r} does not exist")
    if f.init_checkpoint:
        path = f.init_checkpoint
        if not (path.endswith(".index") or _exists(path, "init_checkpoint")
                or _exists(path + ".index", "init_checkpoint")):
            raise FlagError("init_checkpoint", f"{path!r} does not exist")
        if path.endswith(".h5") and input_normalization(f) != "imagenet":
            raise FlagError("input_normalization", "Keras applications weights expect ImageNet mean/std; "
                            "pass --input_normalization=imagenet")
    elif f.init_skip_head:
        raise FlagError("init_skip_head", "needs --init_checkpoint")
    if f.lr_schedule == "step":
        try:
            boundaries = [float(e) for e in f.lr_decay_boundaries]
        except ValueError:
            raise FlagError("lr_decay_boundaries", f"must be epochs (numbers), got {','.join(f.lr_decay_boundaries)}") from None
        if not boundaries or boundaries != sorted(boundaries) or boundaries[0] <= 0:
            raise FlagError("lr_decay_boundaries", "--lr_schedule=step needs increasing positive epochs, "
                            f"e.g. 35,70,95; got {','.join(f.lr_decay_boundaries) or 'none'}")
    if not 0 < f.crop_min_area <= 1:
        raise FlagError("crop_min_area", f"must be in (0, 1], got {f.crop_min_area:g}")
    if not 0 <= f.holdout_fraction < 1:
        raise FlagError("holdout_fraction", f"must be in [0, 1), got {f.holdout_fraction:g}")


def _validate_fast_advprop(f):
    if not 0 < f.adv_fraction < 1:
        raise FlagError("adv_fraction", f"must be in (0, 1), got {f.adv_fraction:g}")
    if list(f.aux_domains) != ["adv"]:
        raise FlagError("aux_domains", f"fast_advprop has one auxiliary BN, 'adv' (its epsilon is --epsilon), "
                        f"got {','.join(f.aux_domains)}")
    if f.epsilon <= 0:
        raise FlagError("epsilon", f"fast_advprop attacks: must be > 0, got {f.epsilon:g}")
    if f.epsilon_schedule:
        raise FlagError("epsilon_schedule", "is not supported by fast_advprop (its attack steps are fixed)")
    for name, value in FAST_ADVPROP_ATTACK.items():
        if _given(f, name) and getattr(f, name) != value:
            raise FlagError(name, f"fast_advprop's attack is always {name}={value}: it reuses the attack's "
                            "gradients, so the attack must be a training pass on the true labels")


def _exists(path: str, flag: str) -> bool:
    """Whether a local, gs:// or other TensorFlow-filesystem path exists; FlagError if it cannot be asked."""
    import tensorflow as tf

    try:
        return tf.io.gfile.exists(path)
    except tf.errors.OpError as e:  # an unknown scheme, missing credentials, an unreachable bucket
        raise FlagError(flag, f"cannot check {path!r}: {e.message.splitlines()[0]}") from None


def input_normalization(f=FLAGS) -> str:
    """--input_normalization, or the model family's default."""
    return f.input_normalization or default_input_normalization(f.model)


def attack_steps(f=FLAGS) -> int:
    if f.attack_steps is not None:
        return f.attack_steps
    return steps_for_epsilon(f.epsilon)
