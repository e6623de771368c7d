"""Training objectives, side by side in one registry; the loop is the same for all.

A method is a small function

    method(model, images, labels, ctx) -> (loss_sum, metrics)

* `images`: float pixels [B, H, W, 3] in [0, 255], or a dict of views of the
  same B images (the clean images and each input-view domain's) for N-domain AdvProp;
* `loss_sum`: the objective SUMMED over examples; the loop divides it by the
  global clean batch size (so AdvProp's loss is mean clean CE + mean adv CE)
  and adds weight decay;
* `metrics`: per-example float vectors ("clean_loss", "clean_correct",
  "adv_loss", "adv_correct", ...) that the loop sums across replicas;
* `ctx`: a `StepContext` with the loss function (label smoothing lives there,
  applied the same way for every method), the attack, the network's domains,
  the current attack strength and a per-step seed.

Each function is registered with its RULES (`@register(name, ...)`): which BN
domains its network has, whether it attacks, the attack settings its
definition fixes, its default auxiliary loss weight, how many images a step
reads and what a step costs against vanilla's, its own config checks.
Nothing outside this module branches on a method's name: adding a method is
one function and its registration. A method registered with
`computes_gradients=True` runs its own backward passes (Fast AdvProp reuses the
attack's) and returns (loss, gradients, metrics) instead; the loop adds weight
decay and applies them.

Registered: vanilla, advprop (N-domain when the network has more than two
domains), adversarial (Madry), mixed (clean + adversarial through ONE BN),
fast_advprop (Mei et al., ICLR 2022).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import tensorflow as tf

from advprop_tf.attacks.pgd import AttackConfig, epsilon_ball, pgd, random_start, sign_step
from advprop_tf.domains import CLEAN_IMAGES, DomainSpec
from advprop_tf.errors import ConfigError

# Float16 input gradients of a summed cross-entropy are small enough to underflow; PGD only needs their sign.
FLOAT16_ATTACK_LOSS_SCALE = 1024.0


@dataclasses.dataclass
class StepContext:
    """What a method needs from the loop for one step."""

    loss_fn: Callable  # (labels, logits) -> per-example loss
    attack: AttackConfig
    epsilon: object = None  # scheduled epsilon (scalar tensor) overriding attack.epsilon
    num_steps: object = None  # scheduled steps (scalar tensor) overriding the attack's
    seed: object = None  # int pair tensor for the attack's randomness, or None
    clean_weight: float = 1.0
    adv_weight: float = 1.0
    # The training tape's stop_recording: the attack is not recorded on it,
    # so the update's backward pass cannot reach into the PGD loop.
    pause_recording: Callable = contextlib.nullcontext
    # Fast AdvProp: the attacked share of each batch and the weight of the attack's own (noisy) pass.
    adv_fraction: float = 0.2
    noisy_weight: float = 0.5
    # For methods that compute gradients: the optimizer's loss scaling (float16) before each backward pass.
    scale_loss: Callable = lambda loss: loss
    domains: DomainSpec | None = None  # the network's domains (None: read from model.domains)


def domains_of(model, ctx) -> DomainSpec:
    return ctx.domains if ctx.domains is not None else DomainSpec.of(model.domains)


def clean_view(images):
    return images[CLEAN_IMAGES] if isinstance(images, dict) else images


def attack(model, pixels, labels, domain, ctx: StepContext):
    """PGD through `domain`'s BN, in the configured BN mode, without side effects.

    An adversarial domain with its own epsilon ("adv2") attacks with it (steps
    by the attack's rule); otherwise the configured or scheduled epsilon. The
    k-th adversarial domain draws its own targets and start. A float16
    network's attack loss is scaled.
    """
    cfg = ctx.attack
    spec = domains_of(model, ctx)
    own_epsilon = spec.get(domain).epsilon
    if own_epsilon is not None:
        epsilon, num_steps = own_epsilon, cfg.steps_for(own_epsilon)
    else:
        epsilon = cfg.epsilon if ctx.epsilon is None else ctx.epsilon
        num_steps = cfg.steps if ctx.num_steps is None else ctx.num_steps
    seed = ctx.seed
    if seed is not None and domain in spec.adversarial[1:]:
        seed = seed + tf.constant([0, 104729], tf.int32) * spec.adversarial.index(domain)

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


def loss_and_metrics(prefix, labels, logits, ctx):
    """The per-example loss (ctx.loss_fn: label smoothing included) and the metrics `<prefix>_loss`,
    `<prefix>_correct` of one part of a batch."""
    loss = ctx.loss_fn(labels, logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32)), tf.float32)
    return loss, {f"{prefix}_loss": loss, f"{prefix}_correct": correct}


# ------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Method:
    """A training method with its rules. `config` arguments are the method's config section
    (config.MethodConfig: aux_domains, attack, adv_fraction, ...)."""

    name: str
    fn: Callable
    auxiliary_domains: bool = False  # its network has the configured auxiliary domains (else the main one only)
    generated_domains: tuple = ()  # more BN domains, for images the method makes itself
    attacks: bool = True
    default_adv_weight: float = 1.0  # the weight of each auxiliary domain's loss unless configured
    forced_attack: tuple = ()  # ((AttackConfig field, value), ...) the method's definition fixes
    computes_gradients: bool = False
    check: Callable = lambda config: None  # raises ConfigError for a config the method cannot train
    images_per_replica: Callable = lambda config, clean: clean  # images a step reads for `clean` clean ones
    budget_scale: Callable = lambda config, loaded: 1.0  # a step's cost in vanilla steps of `loaded` images
    describe: Callable = lambda config, clean, replicas: None  # a start-up line, or None
    # the parts of a batch it reports (<part>_loss, <part>_correct), given its network's domains
    metric_prefixes: Callable = lambda domains: (CLEAN_IMAGES,) + domains.names[1:]

    def __call__(self, model, images, labels, ctx):
        return self.fn(model, images, labels, ctx)

    def domains(self, auxiliary) -> DomainSpec:
        return DomainSpec.with_auxiliary(tuple(auxiliary) if self.auxiliary_domains else (), self.generated_domains)

    def resolve_attack(self, attack: AttackConfig, given=()) -> AttackConfig:
        """The attack with the method's fixed settings; ConfigError when one of them was `given` otherwise."""
        for field, value in self.forced_attack:
            if field in given and getattr(attack, field) != value:
                raise ConfigError(field, f"{self.name}'s attack is always {field}={value}: it reuses the attack's "
                                  "gradients, so the attack must be a training pass on the true labels")
        return dataclasses.replace(attack, **dict(self.forced_attack)) if self.forced_attack else attack


METHODS = {}
DEFAULT_METHOD = "advprop"


def register(name: str, **rules):
    """Register `fn` as the method `name` with its rules (see Method)."""
    def wrap(fn):
        METHODS[name] = Method(name, fn, **rules)
        return fn
    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


# -------------------------------------------------------------------- methods
def _needs_an_adversarial_domain(config):
    if not config.aux_domains:
        raise ConfigError("aux_domains", "AdvProp needs at least one auxiliary domain, e.g. adv")
    if not DomainSpec.with_auxiliary(config.aux_domains).adversarial:
        raise ConfigError("aux_domains", f"AdvProp needs an adversarial domain (adv, adv<eps>), got "
                          f"{','.join(config.aux_domains)}")


@register("vanilla", attacks=False, metric_prefixes=lambda domains: (CLEAN_IMAGES,))
def vanilla(model, images, labels, ctx):
    """Clean images through the main BN."""
    logits = model(clean_view(images), training=True, domain=model.main_domain)
    loss, metrics = loss_and_metrics(CLEAN_IMAGES, labels, logits, ctx)
    return tf.reduce_sum(loss), metrics


@register("advprop", auxiliary_domains=True, check=_needs_an_adversarial_domain)
def advprop(model, images, labels, ctx):
    """AdvProp: each domain's images through its own BN, in ONE forward pass.

    With domains (main, adv) the adversarial copies are made through the
    auxiliary BN, then [clean; adv] runs once with domain=(main, adv). More
    domains (main, autoaugment, adv) take an input view's images from the
    views the input pipeline provides; every adversarial domain is the PGD
    copy of the clean images made through its own BN.
    """
    clean = clean_view(images)
    spec = domains_of(model, ctx)
    batches = []
    for domain in spec.domains:
        if domain.kind == "main":
            batches.append(clean)
        elif domain.adversarial:
            batches.append(attack(model, clean, labels, domain.name, ctx))
        else:
            if not isinstance(images, dict) or domain.name not in images:
                raise ValueError(
                    f"domain {domain.name!r} needs the input view {domain.name!r}; "
                    f"the input pipeline provides {sorted(images) if isinstance(images, dict) else [CLEAN_IMAGES]}"
                )
            batches.append(images[domain.name])
    logits = model(tf.concat(batches, axis=0), training=True, domain=spec.names)
    total = 0.0
    metrics = {}
    for domain, domain_logits in zip(spec.names, tf.split(logits, len(spec.names))):
        main = domain == spec.main
        loss, m = loss_and_metrics(CLEAN_IMAGES if main else domain, labels, domain_logits, ctx)
        total += (ctx.clean_weight if main else ctx.adv_weight) * tf.reduce_sum(loss)
        metrics.update(m)
    return total, metrics


@register("adversarial", metric_prefixes=lambda domains: ("adv",))
def adversarial(model, images, labels, ctx):
    """Madry adversarial training: adversarial examples only, main BN."""
    adv = attack(model, clean_view(images), labels, model.main_domain, ctx)
    logits = model(adv, training=True, domain=model.main_domain)
    loss, metrics = loss_and_metrics("adv", labels, logits, ctx)
    return tf.reduce_sum(loss), metrics


@register("mixed", metric_prefixes=lambda domains: (CLEAN_IMAGES, "adv"))
def mixed(model, images, labels, ctx):
    """Clean + adversarial through the SAME (main) BN: the paper's Eq. 3 baseline."""
    clean = clean_view(images)
    adv = attack(model, clean, labels, model.main_domain, ctx)
    logits = model(tf.concat([clean, adv], axis=0), training=True, domain=model.main_domain)
    clean_logits, adv_logits = tf.split(logits, 2)
    clean_loss, metrics = loss_and_metrics(CLEAN_IMAGES, labels, clean_logits, ctx)
    adv_loss, adv_metrics = loss_and_metrics("adv", labels, adv_logits, ctx)
    metrics.update(adv_metrics)
    total = ctx.clean_weight * tf.reduce_sum(clean_loss) + ctx.adv_weight * tf.reduce_sum(adv_loss)
    return total, metrics


# -------------------------------------------------------------- Fast AdvProp
FAST_ADVPROP_ATTACK = (("targeted", False), ("random_start", True), ("attack_bn_mode", "batch"))


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


def _fast_advprop_check(config):
    if not 0 < config.adv_fraction < 1:
        raise ConfigError("adv_fraction", f"must be in (0, 1), got {config.adv_fraction:g}")
    spec = DomainSpec.with_auxiliary(config.aux_domains)
    if len(spec.adversarial) != 1 or spec.views or spec.get(spec.adversarial[0]).epsilon is not None:
        raise ConfigError("aux_domains", "fast_advprop has one auxiliary BN, 'adv' (its epsilon is --epsilon), "
                          f"got {','.join(config.aux_domains)}")
    if config.attack.epsilon <= 0:
        raise ConfigError("epsilon", f"fast_advprop attacks: must be > 0, got {config.attack.epsilon:g}")
    if config.epsilon_schedule:
        raise ConfigError("epsilon_schedule", "is not supported by fast_advprop (its attack steps are fixed)")


def _fast_advprop_budget(config, loaded):
    if not config.match_vanilla_budget:
        return 1.0
    return fast_advprop_budget_scale(attacked_count(loaded, config.adv_fraction) / loaded, config.attack.steps)


def _fast_advprop_describe(config, clean, replicas):
    loaded = loaded_batch_size(clean, config.adv_fraction)
    return (f"fast_advprop: each replica reads {loaded} images, its {clean} clean ones and "
            f"{attacked_count(loaded, config.adv_fraction)} attacked on top (adv_fraction={config.adv_fraction:g} "
            f"of those read), on {replicas} replicas; every epoch count divided by "
            f"{_fast_advprop_budget(config, loaded):.4f} (attacked fraction x attack steps + 1; match_vanilla_budget)")


def _split_attacked_share(model, images, labels, ctx):
    """((main, auxiliary domain), (clean images, labels), (float32 images to attack, labels)) of a batch."""
    pixels = clean_view(images)
    batch = pixels.shape[0]
    if batch is None:
        raise ValueError("fast_advprop needs a static per-replica batch size (batch with drop_remainder)")
    spec = domains_of(model, ctx)
    if len(spec.names) != 2 or spec.adversarial != spec.names[1:]:
        raise ValueError(f"fast_advprop needs domains (main, adversarial), got {spec.names}")
    num_clean = batch - attacked_count(batch, ctx.adv_fraction)
    return (spec.names, (pixels[:num_clean], labels[:num_clean]),
            (tf.cast(pixels[num_clean:], tf.float32), labels[num_clean:]))


@register("fast_advprop", auxiliary_domains=True, default_adv_weight=0.5, forced_attack=FAST_ADVPROP_ATTACK,
          computes_gradients=True, check=_fast_advprop_check,
          images_per_replica=lambda config, clean: loaded_batch_size(clean, config.adv_fraction),
          budget_scale=_fast_advprop_budget, describe=_fast_advprop_describe,
          metric_prefixes=lambda domains: (CLEAN_IMAGES, "noisy", "adv"))
def fast_advprop(model, images, labels, ctx):
    """Fast AdvProp (Mei et al., ICLR 2022; meijieru/fast_advprop): AdvProp at about vanilla's cost.

    The last images of the batch are attacked (attacked_count: the share
    p_adv; a training run reads them ON TOP of its clean batch), the rest are
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
    (main, aux), (clean, clean_labels), (attacked, adv_labels) = _split_attacked_share(model, images, labels, ctx)
    pixels = clean_view(images)
    num_clean, num_adv = clean.shape[0], attacked.shape[0]
    cfg = ctx.attack
    epsilon, num_steps = cfg.epsilon, cfg.steps
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
                loss, term_metrics = loss_and_metrics(prefix, term_labels, logits, ctx)
                term_metrics[f"{prefix}_examples"] = tf.ones_like(loss)
                metrics.update(term_metrics)
                objective += weight * tf.reduce_sum(loss)
            objective /= shared_count
            scaled = ctx.scale_loss(objective)
        grads = tape.gradient(scaled, variables + watched)
        return objective, grads[:len(variables)], grads[-1] if watched else None

    def clean_terms(_):
        return [(CLEAN_IMAGES, ctx.clean_weight, clean_labels, model(clean, training=True, domain=main))]

    def noisy_terms(x):
        return [("noisy", ctx.noisy_weight, adv_labels, model(x, training=True, domain=aux, bn_mode="batch"))]

    def adversarial_terms(x):
        return [("adv", ctx.adv_weight, adv_labels, model(x, training=True, domain=aux))]

    total, grads, _ = backward(clean_terms)
    input_grad = None  # the gradient of the previous pass, which the next one steps along
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
