"""Compile a config's TPU step with the TPU compiler, on a machine without a TPU: does it fit a chip?

  python tools/tpu_compile.py --flagfile=configs/b3.flags --topology=v5e:2x2 [--per_core_batch=N]
      [--step=train|eval|pgd_eval] [--find_batch] [--json=out.json]

The step is built as a TPUStrategy run builds it (the config's method, attack, resolution and model,
bfloat16, the EMA, the optimizer; one replica: what each TPU core runs), lowered by TensorFlow's XLA
bridge to an HLO module, and compiled by libtpu's TPU compiler for one core of a compile-only topology
description (jax's `get_topology_desc`: MaxText's train_compile.py checks its pods the same way). It
prints whether it compiled (or the compiler's error), the HBM it needs (arguments, outputs,
temporaries, code) against the chip's HBM, and the compile time; --find_batch bisects the largest
per-core batch that fits. Steps: train (the whole replica step: attack, forward, backward, BN
statistics, optimizer, EMA, step counter), eval (inference logits), pgd_eval (the evaluation's PGD).

The TPU compiler comes with `pip install -e ".[tpu-compile]"` (jax[tpu] with libtpu; the test extra has
it). It runs in its own process (jax and TensorFlow each bring an XLA): this interpreter's, or
$TPU_COMPILER_PYTHON's. What it does not check: docs/tpu.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from advprop_tf.startup import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from advprop_tf import cli, train_flags  # noqa: E402
from advprop_tf.errors import ConfigError  # noqa: E402

# HBM of one TPU device (a TPUStrategy replica), Cloud TPU documentation: per chip from v4 on (one device a chip),
# per core on v2/v3 (two cores a chip).
HBM_BYTES = {"v2": 8 * 2**30, "v3": 16 * 2**30, "v4": 32 * 2**30, "v5e": 16 * 10**9, "v5p": 95 * 10**9,
             "v6e": 32 * 10**9}
TOPOLOGIES = ("v2:2x2", "v3:2x2", "v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2")
STEPS = ("train", "eval", "pgd_eval")
PROGRAM = "tpu_compile"

train_flags.define_train_flags()
flags.DEFINE_enum("topology", "v5e:2x2", list(TOPOLOGIES), "Compile-only TPU topology (kind:shape).")
flags.DEFINE_integer("per_core_batch", None, "Clean images per core; default: --train_batch_size (or "
                     "--eval_batch_size) over the topology's chips.")
flags.DEFINE_enum("step", "train", list(STEPS), "Which step to compile.")
flags.DEFINE_bool("find_batch", False, "Bisect the largest per-core batch that fits the chip's HBM.")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS

# Runs in the TPU compiler's interpreter (jax with libtpu); reads an HloModuleProto, prints one JSON line.
COMPILER = r"""
import json, sys, time
from jax.experimental import topologies
from jax._src import compiler
from jax._src.interpreters import mlir
from jax._src.lib import xla_client
from jax._src.lib.mlir import ir

path, topology = sys.argv[1], sys.argv[2]
device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
started = time.time()
try:
    stablehlo = xla_client._xla.mlir.hlo_to_stablehlo(open(path, "rb").read())
    with mlir.make_ir_context():
        module = ir.Module.parse(stablehlo)
        executable = device.client.compile(module, executable_devices=xla_client.DeviceList((device,)),
                                           compile_options=compiler.get_compile_options(1, 1))
    m = executable.get_compiled_memory_stats()
    costs = executable.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) and costs else costs
    result = dict(compiled=True, argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                  temp_bytes=m.temp_size_in_bytes, code_bytes=m.generated_code_size_in_bytes,
                  alias_bytes=m.alias_size_in_bytes, flops=float((costs or {}).get("flops", 0.0)))
except Exception as e:
    message = str(e).strip().splitlines()
    result = dict(compiled=False, error=f"{type(e).__name__}: {message[0] if message else ''}"[:400])
result["compile_seconds"] = round(time.time() - started, 1)
print("RESULT " + json.dumps(result))
"""


class CompilerMissing(ConfigError):
    pass


def compiler_python() -> str:
    """The interpreter that has jax with libtpu: $TPU_COMPILER_PYTHON, else this one."""
    python = os.environ.get("TPU_COMPILER_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import jax, libtpu"], capture_output=True, text=True)
    if probe.returncode:
        raise CompilerMissing("topology", f"the TPU compiler is not installed for {python}: pip install -e "
                              "\".[tpu-compile]\" (jax[tpu] with libtpu), or set TPU_COMPILER_PYTHON to an "
                              "interpreter that has it")
    return python


def without_copies(serialized: bytes) -> bytes:
    """The HLO module with its `copy` instructions bypassed: every use of a copy takes the copy's operand.

    TensorFlow's bridge emits layout copies that the HLO -> StableHLO conversion cannot legalize
    ("failed to legalize operation 'mhlo.copy'"); a copy changes no value, and the TPU compiler assigns
    its own layouts."""
    from tensorflow.compiler.xla.service import hlo_pb2

    module = hlo_pb2.HloModuleProto.FromString(serialized)
    for computation in module.computations:
        source = {i.id: i.operand_ids[0] for i in computation.instructions if i.opcode == "copy"}
        if not source:
            continue

        def resolve(instruction_id):
            while instruction_id in source:
                instruction_id = source[instruction_id]
            return instruction_id

        kept = [i for i in computation.instructions if i.opcode != "copy"]
        for instruction in kept:
            instruction.operand_ids[:] = [resolve(i) for i in instruction.operand_ids]
            instruction.control_predecessor_ids[:] = [i for i in instruction.control_predecessor_ids
                                                      if i not in source]
        computation.root_id = resolve(computation.root_id)
        del computation.instructions[:]
        computation.instructions.extend(kept)
    return module.SerializeToString()


def tpu_config():
    """The config as a TPU run builds it: bfloat16, XLA, no data needed (the synthetic source stands in)."""
    classes = FLAGS.num_classes or (10 if FLAGS.dataset == "synthetic" else 1000)
    FLAGS.dataset, FLAGS.num_classes, FLAGS.mixed_precision, FLAGS.jit_compile = "synthetic", classes, "bfloat16", True
    FLAGS.model_dir = FLAGS.model_dir or tempfile.mkdtemp(prefix="tpu_compile_")
    return train_flags.config_from_flags(FLAGS)


def lowered_step(config, step_kind: str, per_core_batch: int) -> bytes:
    """The HloModuleProto of one core's step at `per_core_batch` clean images."""
    import keras

    from advprop_tf.attacks.pgd import AttackConfig
    from advprop_tf.evaluation.classifiers import Classifier
    from advprop_tf.evaluation.loop import attack_measure
    from advprop_tf.training import builders
    from advprop_tf.training.builders import Length

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    num_classes = config.model.num_classes
    model = builders.build_model(config, num_classes)
    size = model.resolution
    if step_kind == "train":
        global_batch = per_core_batch
        images = config.method.record.images_per_replica(config.method, per_core_batch)
        length = Length(steps_per_epoch=max(1, 1281167 // global_batch), total_steps=100000)
        _, optimizer, ema = builders.build_optimization(config, model, length)
        step = builders.build_train_step(config, model, optimizer, ema, tf.distribute.get_strategy(),
                                         num_classes=num_classes, total_steps=length.total_steps, seed=0)
        specs = (tf.TensorSpec([images, size, size, 3], tf.float32), tf.TensorSpec([images], tf.int64))
        return step._replica_part.experimental_get_compiler_ir(*specs)(stage="hlo_serialized")
    logits = lambda x: tf.cast(model(x, training=False), tf.float32)  # noqa: E731
    pixels = tf.TensorSpec([per_core_batch, size, size, 3], tf.float32)
    if step_kind == "eval":
        return tf.function(logits, jit_compile=True).experimental_get_compiler_ir(pixels)(stage="hlo_serialized")
    attack = AttackConfig(config.method.attack.epsilon, config.method.attack.num_steps, config.method.attack.step_size,
                          targeted=False)
    measure = attack_measure(Classifier(logits, size, num_classes, {}), attack)
    labels, seed = tf.TensorSpec([per_core_batch], tf.int32), tf.TensorSpec([2], tf.int32)
    return tf.function(measure, jit_compile=True).experimental_get_compiler_ir(pixels, labels, seed)(
        stage="hlo_serialized")


def compile_for_tpu(python, hlo: bytes, topology: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".pb") as f:
        f.write(without_copies(hlo))
        f.flush()
        # (libtpu warns that it finds no TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES: none is needed to compile)
        done = subprocess.run([python, "-c", COMPILER, f.name, topology], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(compiled=False, error=f"the TPU compiler's process failed: {tail}"[:400])
    return json.loads(lines[-1][len("RESULT "):])


def measure(config, python, per_core_batch: int) -> dict:
    started = time.time()
    hlo = lowered_step(config, FLAGS.step, per_core_batch)
    lowered = time.time() - started
    result = compile_for_tpu(python, hlo, FLAGS.topology)
    hbm = HBM_BYTES[FLAGS.topology.split(":")[0]]
    result.update(per_core_batch=per_core_batch, lower_seconds=round(lowered, 1), hbm_bytes=hbm)
    if result["compiled"]:
        used = result["argument_bytes"] + result["output_bytes"] + result["temp_bytes"] + result["code_bytes"] \
            - result.get("alias_bytes", 0)
        result.update(hbm_used_bytes=used, fits=used <= hbm)
    else:
        result["fits"] = False
    return result


def describe(r: dict) -> str:
    gib = 2.0**30
    head = f"{FLAGS.step} step, {r['per_core_batch']} images per core, {FLAGS.topology}:"
    if not r["compiled"]:
        verdict = "does NOT fit" if "RESOURCE_EXHAUSTED" in r["error"] else "did not compile"
        return f"{head} {verdict} ({r['error']}) [lowered {r['lower_seconds']} s, compiler {r['compile_seconds']} s]"
    return (f"{head} compiled in {r['compile_seconds']} s (lowered in {r['lower_seconds']} s); HBM "
            f"{r['hbm_used_bytes'] / gib:.2f} GiB of {r['hbm_bytes'] / gib:.2f} GiB "
            f"({'fits' if r['fits'] else 'does NOT fit'}): arguments {r['argument_bytes'] / gib:.2f}, outputs "
            f"{r['output_bytes'] / gib:.2f}, temporaries {r['temp_bytes'] / gib:.2f}, code "
            f"{r['code_bytes'] / 2**20:.0f} MiB; {r.get('flops', 0):.2e} flops per step")


def find_batch(config, python, start: int) -> tuple:
    """(largest fitting per-core batch, its result, every result), by doubling then bisection."""
    tried = {}

    def fits(batch):
        if batch not in tried:
            tried[batch] = measure(config, python, batch)
            print(describe(tried[batch]), flush=True)
        return tried[batch]["fits"]

    low, high = 0, max(1, start)
    while fits(high):
        low, high = high, high * 2
    while high - low > max(1, low // 16):  # within ~6%
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, tried.get(low), list(tried.values())


def main(argv):
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}")
    try:
        python = compiler_python()
        config = tpu_config()
    except ConfigError as e:
        cli.fail_setting(PROGRAM, e, train_flags.flag_of)
    chips = math.prod(int(d) for d in FLAGS.topology.split(":")[1].split("x"))
    batch = FLAGS.train_batch_size if FLAGS.step == "train" else FLAGS.eval_batch_size
    per_core = FLAGS.per_core_batch or max(1, batch // chips)
    if FLAGS.per_core_batch is not None and FLAGS.per_core_batch < 1:
        cli.fail(PROGRAM, f"--per_core_batch: must be >= 1, got {FLAGS.per_core_batch}")
    results = {"config": {"model": config.model.model, "method": config.method.method,
                          "resolution": config.model.resolution, "topology": FLAGS.topology, "step": FLAGS.step}}
    result = measure(config, python, per_core)
    print(describe(result), flush=True)
    results["at_config_batch"] = result
    if FLAGS.find_batch:
        largest, _, tried = find_batch(config, python, per_core)
        results["largest_per_core_batch"], results["tried"] = largest, tried
        print(f"largest per-core batch that fits: {largest}")
    if FLAGS.json:
        with tf.io.gfile.GFile(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    cli.run(main, PROGRAM, usage=__doc__)
