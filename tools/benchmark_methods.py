"""Per-step time of vanilla, Fast AdvProp and AdvProp with PGD-1/2/5, in one process.

B0 at 64 px, batch 32, 10 classes by default. Each AdvProp step = PGD through
the auxiliary BN + one forward/backward of the concatenated clean+adversarial
batch + update. A Fast AdvProp step (--adv_fraction of the batch attacked,
PGD-1, gradients of the attack reused) has the compute of 1 + attacked/batch
vanilla steps (1.19 at 6 of 32); training divides its epochs by 1.2 to match
vanilla's cost.

  python tools/benchmark_methods.py [--jit_compile] [--json] [--torch_python=/path/to/torch-venv/bin/python]
  python tools/benchmark_methods.py --ema_placement [--replicas=2]

--jit_compile times every method twice in the same run, without and with XLA, and prints the ratio
(on a CPU XLA is expected to be slower than oneDNN's kernels: the ratio is reported as measured, no
claim is made for GPUs). --ema_placement times the AdvProp step with the EMA and step counter inside
the replicated function (as trained) against the placement before, after `strategy.run` in
cross-replica context (on a TPU: on the host), on --replicas logical CPU devices.

--torch_python runs tools/benchmark_torch_peer.py (timm B0 + two BNs, the PyTorch
AdvProp recipe) with that interpreter in the same invocation, after ours, on the
same batch, resolution and classes, and prints our AdvProp PGD-1 images/s over its.
"""

import json
import os
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "efficientnet-b0", "Model variant.")
flags.DEFINE_integer("resolution", 64, "Input size in pixels.")
flags.DEFINE_integer("batch_size", 32, "Clean images per step.")
flags.DEFINE_integer("num_classes", 10, "Classes.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 3, "Steps per round.")
flags.DEFINE_bool("jit_compile", False, "Time every method without AND with XLA (jit_compile) in this run.")
flags.DEFINE_bool("ema_placement", False, "Time the EMA inside the replicated step against after it.")
flags.DEFINE_integer("replicas", 1, "--ema_placement: logical CPU devices (MirroredStrategy when 2 or more).")
flags.DEFINE_enum("attack_bn_mode", "inference", ["batch", "inference"], "BN mode during the attack.")
flags.DEFINE_float("adv_fraction", 0.2, "fast_advprop: attacked share of the batch.")
flags.DEFINE_bool("breakdown", False, "Also time the parts of the steps: the attack alone, the 2B update with "
                  "split BN (AdvProp at epsilon 0), the 2B update through one BN, vanilla on the attacked share.")
flags.DEFINE_string("torch_python", None, "An interpreter with torch and timm: also time the PyTorch peer.")
flags.DEFINE_bool("json", False, "Print a JSON line last.")


def main(argv):
    del argv
    import tensorflow as tf

    if FLAGS.ema_placement:
        return ema_placement()

    from advprop_tf.benchmarking import time_interleaved
    from advprop_tf.attacks.pgd import AttackConfig
    from advprop_tf.domains import DEFAULT_DOMAINS
    from advprop_tf.methods import StepContext, attack, attacked_count, get_method
    from advprop_tf.models import build_model
    from advprop_tf.training.optimization import make_loss_fn, make_optimizer, make_schedule
    from advprop_tf.training.step import StepConfig, TrainStep

    size, batch = FLAGS.resolution, FLAGS.batch_size
    pixels = tf.random.uniform([batch, size, size, 3], 0, 255)
    labels = tf.random.uniform([batch], 0, FLAGS.num_classes, tf.int32)

    def make(method, pgd_steps, images=pixels, targets=labels, jit=False):
        record = get_method(method)  # its domains, fixed attack settings and default loss weight
        domains = record.domains(DEFAULT_DOMAINS[1:])
        model = build_model(FLAGS.model, num_classes=FLAGS.num_classes, domains=domains.names)
        optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 100, 100, 0), model)
        attack = record.resolve_attack(AttackConfig(epsilon=pgd_steps, num_steps=pgd_steps, step_size=1.0,
                                                    attack_bn_mode=FLAGS.attack_bn_mode))
        config = StepConfig(global_batch_size=int(images.shape[0]), num_classes=FLAGS.num_classes, attack=attack,
                            jit_compile=jit, adv_fraction=FLAGS.adv_fraction, adv_weight=record.default_adv_weight,
                            domains=domains)
        step = TrainStep(model, record, optimizer, config)
        return lambda: step.run_batch(images, targets)["loss"]

    def attack_alone():
        model = build_model(FLAGS.model, num_classes=FLAGS.num_classes, domains=DEFAULT_DOMAINS)
        ctx = StepContext(loss_fn=make_loss_fn(FLAGS.num_classes), seed=tf.constant([0, 1]),
                          attack=AttackConfig(epsilon=1, num_steps=1, step_size=1.0, attack_bn_mode=FLAGS.attack_bn_mode))
        return tf.function(lambda: attack(model, pixels, labels, "adv", ctx))

    runs = {
        "vanilla": make("vanilla", 1),
        "fast_advprop": make("fast_advprop", 1),
        "advprop_pgd1": make("advprop", 1),
        "advprop_pgd2": make("advprop", 2),
        "advprop_pgd5": make("advprop", 5),
    }
    if FLAGS.jit_compile:
        runs.update({f"{name}_xla": make(method, pgd, jit=True) for name, method, pgd in (
            ("vanilla", "vanilla", 1), ("fast_advprop", "fast_advprop", 1), ("advprop_pgd1", "advprop", 1),
            ("advprop_pgd2", "advprop", 2), ("advprop_pgd5", "advprop", 5))})
    attacked = attacked_count(batch, FLAGS.adv_fraction)
    if FLAGS.breakdown:
        runs.update({
            "attack_pgd1": attack_alone(),
            "update_2b_split": make("advprop", 0),  # epsilon 0: [clean; clean] through the two BNs, no attack
            "update_2b_one_bn": make("vanilla", 1, tf.concat([pixels, pixels], 0), tf.concat([labels, labels], 0)),
            "vanilla_attacked_share": make("vanilla", 1, pixels[:attacked], labels[:attacked]),
        })
    times = time_interleaved(runs, rounds=FLAGS.rounds, steps=FLAGS.steps)
    print(f"{FLAGS.model} {size}px batch {batch}, {FLAGS.num_classes} classes, attack BN mode {FLAGS.attack_bn_mode}")
    for name, seconds in times.items():
        print(f"  {name:22s} {seconds:.3f} s/step  {batch / seconds:6.1f} images/s  "
              f"ratio to vanilla {seconds / times['vanilla']:.2f}")
    if FLAGS.breakdown:
        t = times
        print(f"  AdvProp PGD-1 = attack {t['attack_pgd1']:.3f} + 2B split update {t['update_2b_split']:.3f} "
              f"(sum {t['attack_pgd1'] + t['update_2b_split']:.3f}, measured {t['advprop_pgd1']:.3f}); the split "
              f"costs {t['update_2b_split'] - t['update_2b_one_bn']:+.3f} s over one BN; the 2B update is "
              f"{t['update_2b_one_bn'] / t['vanilla']:.2f}x a B update")
        print(f"  fast_advprop - vanilla = {t['fast_advprop'] - t['vanilla']:.3f} s; a whole vanilla step on "
              f"the {attacked} attacked images alone costs "
              f"{t['vanilla_attacked_share']:.3f} s ({t['vanilla_attacked_share'] / t['vanilla']:.2f}x a full one)")
    result = {f"{k}_s": round(v, 4) for k, v in times.items()}
    if FLAGS.jit_compile:
        for name in ("vanilla", "fast_advprop", "advprop_pgd1", "advprop_pgd2", "advprop_pgd5"):
            ratio = times[f"{name}_xla"] / times[name]
            result[f"xla_ratio_{name}"] = round(ratio, 3)
            print(f"  {name:22s} XLA / no XLA: {ratio:.2f}")
    result.update(
        ratio_fast_advprop=round(times["fast_advprop"] / times["vanilla"], 3),
        ratio_pgd1=round(times["advprop_pgd1"] / times["vanilla"], 3),
        ratio_pgd2=round(times["advprop_pgd2"] / times["vanilla"], 3),
        ratio_pgd5=round(times["advprop_pgd5"] / times["vanilla"], 3),
        advprop_pgd1_images_per_s=round(batch / times["advprop_pgd1"], 1),
    )
    print(f"  fast_advprop attacks {attacked} of {batch} images; its compute is {1 + attacked / batch:.2f} "
          "vanilla steps (target ratio <= 1.3, stretch <= 1.1)")
    if FLAGS.torch_python:
        peer = torch_peer(size, batch)
        ratio = peer["advprop_pgd1_s"] / times["advprop_pgd1"]
        print(f"  PyTorch peer (torch {peer['torch']}, timm {peer['timm']}, {peer['threads']} threads): vanilla "
              f"{peer['vanilla_s']:.3f} s/step, AdvProp PGD-1 {peer['advprop_pgd1_s']:.3f} s/step "
              f"{batch / peer['advprop_pgd1_s']:.1f} images/s; ours / peer images/s: AdvProp PGD-1 {ratio:.2f} "
              f"(target >= 1.3), vanilla {peer['vanilla_s'] / times['vanilla']:.2f}")
        result.update(peer_vanilla_s=peer["vanilla_s"], peer_advprop_pgd1_s=peer["advprop_pgd1_s"],
                      advprop_pgd1_speedup_over_peer=round(ratio, 3))
    if FLAGS.json:
        print(json.dumps(result))


def ema_placement():
    """AdvProp step time: EMA + step counter inside strategy.run (now) vs after it, in cross-replica context
    (before). The "before" step is rebuilt here from the same parts."""
    import tensorflow as tf

    if FLAGS.replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.replicas)
    from advprop_tf.benchmarking import time_interleaved
    from advprop_tf.attacks.pgd import AttackConfig
    from advprop_tf.domains import DEFAULT_DOMAINS
    from advprop_tf.methods import get_method
    from advprop_tf.models import build_model
    from advprop_tf.training.ema import ExponentialMovingAverage
    from advprop_tf.training.optimization import make_optimizer, make_schedule
    from advprop_tf.training.step import StepConfig, TrainStep

    class MirroredShadows(ExponentialMovingAverage):
        """The shadows as they were: mirrored (written in cross-replica context)."""

        def __init__(self, model, decay):
            tf.Module.__init__(self, name="ema")
            self.decay = float(decay)
            self._model_variables = list(model.weights)
            self.shadows = [tf.Variable(tf.convert_to_tensor(v), trainable=False) for v in self._model_variables]

    class EmaAfterTheReplicatedStep(TrainStep):
        """Built without an EMA (none in the replica step); `after_ema` moves after strategy.run."""

        def _one_step(self, images, labels):
            sums = super()._one_step(images, labels)
            self.after_ema.update(self.global_step.read_value())  # cross-replica: on a TPU, the host
            return sums

    strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(FLAGS.replicas)])
                if FLAGS.replicas > 1 else tf.distribute.get_strategy())
    batch, size = FLAGS.batch_size * FLAGS.replicas, FLAGS.resolution
    data = tf.data.Dataset.from_tensors((tf.random.uniform([batch, size, size, 3], 0, 255),
                                         tf.random.uniform([batch], 0, FLAGS.num_classes, tf.int32))).repeat()
    runs = {}
    for name, step_class, ema_class in (("ema_inside", TrainStep, ExponentialMovingAverage),
                                        ("ema_after", EmaAfterTheReplicatedStep, MirroredShadows)):
        with strategy.scope():
            model = build_model(FLAGS.model, num_classes=FLAGS.num_classes, domains=DEFAULT_DOMAINS)
            optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 100, 100, 0), model)
            ema = ema_class(model, 0.9999)
            after = step_class is EmaAfterTheReplicatedStep
            step = step_class(model, get_method("advprop"), optimizer, StepConfig(
                global_batch_size=batch, num_classes=FLAGS.num_classes,
                attack=AttackConfig(epsilon=1, num_steps=1, step_size=1.0)), strategy, None if after else ema)
            step.after_ema = ema
        iterator = iter(strategy.experimental_distribute_dataset(data) if FLAGS.replicas > 1 else data)
        runs[name] = lambda step=step, iterator=iterator: step.run_loop(iterator, tf.constant(FLAGS.steps))["loss"]
    times = time_interleaved(runs, warmup=1, rounds=FLAGS.rounds, steps=1)
    per_step = {k: v / FLAGS.steps for k, v in times.items()}
    print(f"{FLAGS.model} {size}px, AdvProp PGD-1, global batch {batch} on {FLAGS.replicas} replica(s), "
          f"{FLAGS.steps}-step host loops")
    for name, seconds in per_step.items():
        print(f"  {name:12s} {seconds:.4f} s/step")
    print(f"  inside / after: {per_step['ema_inside'] / per_step['ema_after']:.3f}")
    if FLAGS.json:
        print(json.dumps({f"{k}_s": round(v, 4) for k, v in per_step.items()}))


def torch_peer(size, batch):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_torch_peer.py")
    out = subprocess.run([FLAGS.torch_python, script, f"--batch_size={batch}", f"--resolution={size}",
                          f"--num_classes={FLAGS.num_classes}", f"--rounds={FLAGS.rounds}", f"--steps={FLAGS.steps}"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    app.run(main)
