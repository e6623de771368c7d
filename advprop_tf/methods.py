"""Training objectives, side by side in one registry; the loop is the same for all.

A method is a small function

    method(model, images, labels, ctx) -> (loss_sum, metrics)

* `images`: float pixels [B, H, W, 3] in [0, 255], or a dict of views of the
  same B images ({"clean": ..., "autoaugment": ...}) for N-domain AdvProp;
* `loss_sum`: the objective SUMMED over examples; the loop divides it by the
  global clean batch size (so AdvProp's loss is mean clean CE + mean adv CE)
  and adds weight decay;
* `metrics`: per-example float vectors ("clean_loss", "clean_correct",
  "adv_loss", "adv_correct", ...) that the loop sums across replicas;
* `ctx`: a `StepContext` with the loss function (label smoothing lives there,
  applied the same way for every method), the current attack strength and a
  per-step seed.

Registered methods: vanilla, advprop (N-domain when the model has more than
two domains), adversarial (Madry), mixed (clean + adversarial through ONE BN).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import tensorflow as tf

from advprop_tf.attacks.pgd import pgd, steps_for_epsilon

ATTACK_BN_MODES = ("batch", "inference")
# Float16 input gradients of a summed cross-entropy are small enough to underflow; PGD only needs their sign.
FLOAT16_ATTACK_LOSS_SCALE = 1024.0


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """PGD settings in pixel units. `attack_bn_mode` is how BN runs during the attack.

    "inference" (default): the attacked domain's running statistics, no
      update. This is what the authors' adversarial-training code does
      (facebookresearch/ImageNet-Adversarial-Training: "We use the testing
      mode of [BN] during attack", with BN updates frozen), what the PyTorch
      re-implementations do, and it is ~40% cheaper per attack step here
      (BN's backward is affine; tools/benchmark_methods.py).
    "batch": batch statistics, NOT written back: the attack sees the same
      function the training forward pass computes for the adversarial half.
    """

    epsilon: float = 1.0
    num_steps: int = 1
    step_size: float = 1.0
    targeted: bool = True
    random_start: bool = False
    attack_bn_mode: str = "inference"
    prob_start_from_clean: float = 0.0  # with random_start: batches that start clean (authors: 0.2)
    # num_steps given explicitly (--attack_steps): kept for every epsilon. Otherwise a scheduled
    # epsilon or a domain's own (adv2) sets its steps by steps_for_epsilon.
    fixed_num_steps: bool = False

    def __post_init__(self):
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if self.step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")
        if self.num_steps < 0 or (self.num_steps == 0 and self.epsilon > 0):
            raise ValueError(f"num_steps must be >= 1 when epsilon > 0, got {self.num_steps}")
        if not 0.0 <= self.prob_start_from_clean <= 1.0:
            raise ValueError(f"prob_start_from_clean must be in [0, 1], got {self.prob_start_from_clean}")
        if self.attack_bn_mode not in ATTACK_BN_MODES:
            raise ValueError(
                f"attack_bn_mode must be one of {ATTACK_BN_MODES}, got {self.attack_bn_mode!r}"
            )


@dataclasses.dataclass
class StepContext:
    """What a method needs from the loop for one step."""

    loss_fn: Callable  # (labels, logits) -> per-example loss
    attack: AttackConfig
    epsilon: object = None  # scheduled epsilon (scalar tensor) overriding attack.epsilon
    num_steps: object = None  # scheduled steps (scalar tensor) overriding attack.num_steps
    seed: object = None  # int pair tensor for the attack's randomness, or None
    clean_weight: float = 1.0
    adv_weight: float = 1.0
    # The training tape's stop_recording: the attack is not recorded on it,
    # so the update's backward pass cannot reach into the PGD loop.
    pause_recording: Callable = contextlib.nullcontext


def is_adversarial_domain(name: str) -> bool:
    return name.startswith("adv")


def domain_epsilon(name: str):
    """The epsilon an adversarial domain's name fixes ("adv2" -> 2.0, "adv0.5" -> 0.5), or None ("adv").

    Fine-grained AdvProp as several auxiliary BNs: --aux_domains=adv1,adv2,adv4
    makes one PGD copy per domain, each with its own epsilon, through its own BN.
    """
    suffix = name[len("adv"):]
    if not suffix:
        return None
    try:
        epsilon = float(suffix)
    except ValueError:
        raise ValueError(f"adversarial domain {name!r}: after 'adv' comes an epsilon in pixels, "
                         "e.g. adv2 or adv0.5") from None
    if not 0 < epsilon < float("inf"):
        raise ValueError(f"adversarial domain {name!r}: its epsilon must be a positive number")
    return epsilon


def clean_view(images):
    return images["clean"] if isinstance(images, dict) else images


def attack(model, pixels, labels, domain, ctx: StepContext):
    """PGD through `domain`'s BN, in the configured BN mode, without side effects.

    A domain named with its epsilon ("adv2") attacks with it; "adv" uses the
    configured (or scheduled) epsilon. A float16 network's attack loss is scaled.
    """
    cfg = ctx.attack
    own_epsilon = domain_epsilon(domain) if is_adversarial_domain(domain) else None
    if own_epsilon is not None:
        epsilon = own_epsilon
        num_steps = cfg.num_steps if cfg.fixed_num_steps else steps_for_epsilon(own_epsilon)
    else:
        epsilon = cfg.epsilon if ctx.epsilon is None else ctx.epsilon
        num_steps = cfg.num_steps if ctx.num_steps is None else ctx.num_steps
    seed = ctx.seed
    adversarial = [d for d in model.domains if is_adversarial_domain(d)]
    if seed is not None and domain in adversarial[1:]:  # the k-th adversarial domain: its own targets and start
        seed = seed + tf.constant([0, 104729], tf.int32) * adversarial.index(domain)

    def logits_fn(x):
        return model(x, training=False, domain=domain, bn_mode=cfg.attack_bn_mode)

    with ctx.pause_recording():
        return pgd(
            logits_fn,
            pixels,
            labels,
            epsilon=epsilon,
            num_steps=num_steps,
            step_size=cfg.step_size,
            targeted=cfg.targeted,
            random_start=cfg.random_start,
            num_classes=model.num_classes,
            seed=seed,
            prob_start_from_clean=cfg.prob_start_from_clean,
            loss_scale=FLOAT16_ATTACK_LOSS_SCALE if model.compute_dtype == "float16" else 1.0,
        )


def _loss_and_metrics(prefix, labels, logits, ctx):
    loss = ctx.loss_fn(labels, logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32)), tf.float32)
    return loss, {f"{prefix}_loss": loss, f"{prefix}_correct": correct}


def vanilla(model, images, labels, ctx):
    """Clean images through the main BN."""
    logits = model(clean_view(images), training=True, domain=model.main_domain)
    loss, metrics = _loss_and_metrics("clean", labels, logits, ctx)
    return tf.reduce_sum(loss), metrics


def advprop(model, images, labels, ctx):
    """AdvProp: each domain's images through its own BN, in ONE forward pass.

    With domains ("clean", "adv") the adversarial copies are made through the
    auxiliary BN, then [clean; adv] runs once with domain=("clean", "adv").
    More domains (e.g. ("clean", "autoaugment", "adv")) take their images
    from the views the input pipeline provides; every domain whose name starts
    with "adv" is the PGD copy of the clean view made through its own BN.
    """
    clean = clean_view(images)
    batches = []
    for domain in model.domains:
        if domain == model.main_domain:
            batches.append(clean)
        elif is_adversarial_domain(domain):
            batches.append(attack(model, clean, labels, domain, ctx))
        else:
            if not isinstance(images, dict) or domain not in images:
                raise ValueError(
                    f"domain {domain!r} needs the input view {domain!r}; "
                    f"the input pipeline provides {sorted(images) if isinstance(images, dict) else ['clean']}"
                )
            batches.append(images[domain])
    logits = model(tf.concat(batches, axis=0), training=True, domain=model.domains)
    total = 0.0
    metrics = {}
    for domain, domain_logits in zip(model.domains, tf.split(logits, len(model.domains))):
        prefix = "clean" if domain == model.main_domain else domain
        loss, m = _loss_and_metrics(prefix, labels, domain_logits, ctx)
        weight = ctx.clean_weight if domain == model.main_domain else ctx.adv_weight
        total += weight * tf.reduce_sum(loss)
        metrics.update(m)
    return total, metrics


def adversarial(model, images, labels, ctx):
    """Madry adversarial training: adversarial examples only, main BN."""
    adv = attack(model, clean_view(images), labels, model.main_domain, ctx)
    logits = model(adv, training=True, domain=model.main_domain)
    loss, metrics = _loss_and_metrics("adv", labels, logits, ctx)
    return tf.reduce_sum(loss), metrics


def mixed(model, images, labels, ctx):
    """Clean + adversarial through the SAME (main) BN: the paper's Eq. 3 baseline."""
    clean = clean_view(images)
    adv = attack(model, clean, labels, model.main_domain, ctx)
    logits = model(tf.concat([clean, adv], axis=0), training=True, domain=model.main_domain)
    clean_logits, adv_logits = tf.split(logits, 2)
    clean_loss, metrics = _loss_and_metrics("clean", labels, clean_logits, ctx)
    adv_loss, adv_metrics = _loss_and_metrics("adv", labels, adv_logits, ctx)
    metrics.update(adv_metrics)
    total = ctx.clean_weight * tf.reduce_sum(clean_loss) + ctx.adv_weight * tf.reduce_sum(adv_loss)
    return total, metrics


METHODS = {
    "vanilla": vanilla,
    "advprop": advprop,
    "adversarial": adversarial,
    "mixed": mixed,
}

def get_method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def parse_epsilon_schedule(text: str):
    """'0:1,0.5:2,0.8:4' -> [(0.0, 1.0), (0.5, 2.0), (0.8, 4.0)] (fraction of training, epsilon).

    Fine-grained AdvProp: from each fraction of the training steps on, use that
    epsilon (and the paper's number of steps for it, unless fixed).
    """
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            fraction, eps = (float(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"epsilon schedule item {item!r} is not 'fraction:epsilon'") from None
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"epsilon schedule fraction {fraction} is not in [0, 1)")
        if eps < 0:
            raise ValueError(f"epsilon schedule epsilon {eps} is negative")
        pairs.append((fraction, eps))
    if not pairs:
        raise ValueError("epsilon schedule is empty")
    fractions = [f for f, _ in pairs]
    if fractions != sorted(fractions) or len(set(fractions)) != len(fractions):
        raise ValueError(f"epsilon schedule fractions must increase, got {fractions}")
    if fractions[0] != 0.0:
        raise ValueError("epsilon schedule must start at fraction 0")
    return pairs


def scheduled_epsilon(schedule, step, total_steps):
    """Epsilon (scalar float tensor) at `step` of `total_steps` for a parsed schedule."""
    step = tf.cast(step, tf.float32)
    boundaries = tf.constant([f * total_steps for f, _ in schedule], tf.float32)
    values = tf.constant([e for _, e in schedule], tf.float32)
    index = tf.reduce_sum(tf.cast(step >= boundaries, tf.int32)) - 1
    return values[tf.maximum(index, 0)]
