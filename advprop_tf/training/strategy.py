"""Distribution strategy from flags: TPU VM, GPUs, several workers, or the default."""

from __future__ import annotations

import json
import os

import tensorflow as tf


def make_strategy(tpu: str = "", num_gpus: int = -1, worker_hosts: str = "", task_index: int = 0):
    """`tpu` ("local" on a TPU VM) -> TPUStrategy; `worker_hosts` or TF_CONFIG -> MultiWorkerMirroredStrategy;
    more than one GPU (all visible when num_gpus < 0) -> MirroredStrategy; else the default strategy."""
    if tpu:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if worker_hosts:
        workers = [h.strip() for h in worker_hosts.split(",") if h.strip()]
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": task_index}}
        )
    if "TF_CONFIG" in os.environ:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if num_gpus >= 0:
        if num_gpus > len(gpus):
            raise ValueError(f"--num_gpus={num_gpus} but only {len(gpus)} GPUs are visible")
        gpus = gpus[:num_gpus]
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    if len(gpus) == 1:
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.get_strategy()



def multi_worker_resolver(strategy):
    """The cluster resolver of a MultiWorkerMirroredStrategy spanning several workers, else None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return None
    return resolver if resolver.cluster_spec().jobs else None


def worker_role(strategy):
    """(is this worker the chief, its task id): only the chief writes the run directory."""
    resolver = multi_worker_resolver(strategy)
    return bool(strategy.extended.should_checkpoint), int(resolver.task_id or 0) if resolver else 0
