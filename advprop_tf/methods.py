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
two domains), adversarial (Madry), mixed (clean + adversarial through ONE BN),
fast_advprop (Mei et al., ICLR 2022). A method marked `@computes_gradients`
runs its own backward passes (Fast AdvProp reuses the attack's) and returns
(loss, gradients, metrics) instead; the loop adds weight decay and applies them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import tensorflow as tf

from advprop_tf.attacks.pgd import epsilon_ball, pgd, random_start, sign_step, steps_for_epsilon

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
    # Fast AdvProp: the attacked share of each batch and the weight of the attack's own (noisy) pass.
    adv_fraction: float = 0.2
    noisy_weight: float = 0.5
    # For @computes_gradients methods: the optimizer's loss scaling (float16) before each backward pass.
    scale_loss: Callable = lambda loss: loss


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


def computes_gradients(method):
    """Mark a method that does its own backward passes: it returns (loss, gradients, metrics),
    `gradients` aligned with `model.trainable_variables` and already normalized."""
    method.computes_gradients = True
    return method


def attacked_count(batch_size: int, adv_fraction: float) -> int:
    """Images of a (per-replica) batch that Fast AdvProp attacks: the last batch - round((1 - p_adv) x batch)
    (halves rounded up), at least 1, and at least 1 left clean."""
    if batch_size < 2:
        raise ValueError(f"fast_advprop needs at least 2 images per replica, got {batch_size}")
    clean = min(batch_size - 1, max(1, int(batch_size * (1.0 - adv_fraction) + 0.5)))
    return batch_size - clean


def loaded_batch_size(clean: int, adv_fraction: float) -> int:
    """Images a Fast AdvProp step reads for `clean` clean ones: the attacked images come ON TOP, as in the
    authors' loader (meijieru/fast_advprop, fast_advprop.py: train_batch_scale = sum(ratios) / ratios[0], so
    --train-batch 256 with 4:1 reads 320). round(clean / (1 - p_adv)), so that attacked_count of it leaves
    exactly `clean` clean images."""
    return max(clean + 1, int(clean / (1.0 - adv_fraction) + 0.5))


def fast_advprop_budget_scale(attacked_fraction: float, attack_steps: int) -> float:
    """A Fast AdvProp step costs (1 - a) + a (k + 1) = a k + 1 vanilla steps of the same loaded batch
    (clean part, k attack passes whose gradients are kept, one adversarial pass), `a` the fraction of the
    loaded images actually attacked: the factor the paper divides the epochs by to match vanilla's cost."""
    return attacked_fraction * attack_steps + 1.0


@computes_gradients
def fast_advprop(model, images, labels, ctx):
    """Fast AdvProp (Mei et al., ICLR 2022; meijieru/fast_advprop): AdvProp at about vanilla's cost.

    The last round(p_adv x B) images of the batch are attacked, the rest are
    clean; each batch has ONE backward pass. The attacked images at a random
    start go through the auxiliary BN (batch statistics, not written back):
    that one backward pass gives the attack's input gradient AND parameter
    gradients that are kept for the update ("noisy" view), not thrown away.
    Each further attack step (k > 1) is another such pass. Then one pass of the
    adversarial images through the auxiliary BN, and one of the clean images
    through the main BN, which depends on no attack, so it runs alongside them
    (on this 2-core CPU that hides part of the attack's small passes: 1.44x
    vanilla's step instead of 1.55x with clean and noisy concatenated, in one
    interleaved A/B run; docs/benchmarks.md).
    The attack is untargeted (its gradients train toward the true label).
    Loss weights clean : noisy : adversarial = ctx.clean_weight :
    ctx.noisy_weight : ctx.adv_weight (1 : 0.5 : 0.5), and each parameter
    group's gradient is divided by the weighted count of examples that reached
    it (shared: all; main BN: clean; auxiliary BN: noisy + adversarial), so
    the three groups learn at the same speed.
    """
    pixels = clean_view(images)
    batch = pixels.shape[0]
    if batch is None:
        raise ValueError("fast_advprop needs a static per-replica batch size (batch with drop_remainder)")
    if len(model.domains) != 2 or not is_adversarial_domain(model.domains[1]):
        raise ValueError(f"fast_advprop needs domains (main, adv), got {model.domains}")
    main, aux = model.domains
    num_adv = attacked_count(batch, ctx.adv_fraction)
    num_clean = batch - num_adv
    clean, attacked = pixels[:num_clean], tf.cast(pixels[num_clean:], tf.float32)
    clean_labels, adv_labels = labels[:num_clean], labels[num_clean:]
    cfg = ctx.attack
    epsilon, num_steps = cfg.epsilon, cfg.num_steps
    lower, upper = epsilon_ball(attacked, epsilon)
    x = random_start(attacked, epsilon, ctx.seed, cfg.prob_start_from_clean)
    variables = model.trainable_variables
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    # weighted examples reaching each parameter group, over all replicas: main BN, auxiliary BN, shared
    group_count = {main: replicas * num_clean * ctx.clean_weight,
                   aux: replicas * num_adv * (num_steps * ctx.noisy_weight + ctx.adv_weight)}
    shared_count = group_count[main] + group_count[aux]
    metrics = {}

    def backward(weighted_terms, x=None):
        """ONE backward pass: gradients of sum(weight x summed loss) / shared_count for every variable,
        and for the attacked images `x` when given, of the forward pass `weighted_terms(x)` makes."""
        watched = [] if x is None else [x]
        with tf.GradientTape() as tape:
            tape.watch(watched)
            objective = 0.0
            for prefix, weight, term_labels, logits in weighted_terms(None if x is None else tf.cast(x, pixels.dtype)):
                loss, term_metrics = _loss_and_metrics(prefix, term_labels, logits, ctx)
                term_metrics[f"{prefix}_examples"] = tf.ones_like(loss)
                metrics.update(term_metrics)
                objective += weight * tf.reduce_sum(loss)
            objective /= shared_count
            scaled = ctx.scale_loss(objective)
        grads = tape.gradient(scaled, variables + watched)
        return objective, grads[:len(variables)], grads[-1] if watched else None

    def clean_terms(_):
        return [("clean", ctx.clean_weight, clean_labels, model(clean, training=True, domain=main))]

    def noisy_terms(x):
        return [("noisy", ctx.noisy_weight, adv_labels, model(x, training=True, domain=aux, bn_mode="batch"))]

    def adversarial_terms(x):
        return [("adv", ctx.adv_weight, adv_labels, model(x, training=True, domain=aux))]

    total, grads, _ = backward(clean_terms)
    for i in range(num_steps):  # the attack: each of its passes' gradients is kept
        if i:
            x = sign_step(x, input_grad, cfg.step_size, lower, upper)
        objective, more, input_grad = backward(noisy_terms, x)
        total += objective
        grads = add_gradients(grads, more)
    x_adv = tf.stop_gradient(sign_step(x, input_grad, cfg.step_size, lower, upper))
    objective, more, _ = backward(adversarial_terms, x_adv)
    grads = _rescale_domain_gradients(model, variables, add_gradients(grads, more), shared_count, group_count)
    return total + objective, grads, metrics


def add_gradients(a, b):
    """Element-wise sum of two gradient lists in which None means zero."""
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]


def _rescale_domain_gradients(model, variables, grads, shared_count, group_count):
    """Turn gradients normalized by the shared count into each BN domain's own weighted mean."""
    domain_of = {id(v): d for layer in model.bn_layers() for d in layer.domains
                 for key, v in layer.domain_variables(d).items() if key in ("gamma", "beta")}
    factors = {d: (shared_count / count if count else 0.0) for d, count in group_count.items()}
    return [g if g is None or id(v) not in domain_of else g * factors[domain_of[id(v)]]
            for g, v in zip(grads, variables)]


METHODS = {
    "vanilla": vanilla,
    "advprop": advprop,
    "adversarial": adversarial,
    "mixed": mixed,
    "fast_advprop": fast_advprop,
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
