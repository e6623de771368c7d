"""A run's input functions: the training iterator (resumable) and the evaluation dataset, per strategy."""

from __future__ import annotations

import tensorflow as tf

from advprop_tf.config import TrainConfig
from advprop_tf.data.pipeline import DecodeStats, eval_dataset, train_dataset


class TrainInputs:
    """Distributed datasets of one run: `images_per_replica` images per step and replica (its method's rule),
    each domain's input view, the run's seed; evaluation batches padded to full size."""

    def __init__(self, config: TrainConfig, source, strategy, resolution: int, images_per_replica: int, seed: int):
        self.config = config
        self.source = source
        self.strategy = strategy
        self.resolution = resolution
        self.images_per_replica = images_per_replica
        self.images_per_step = images_per_replica * strategy.num_replicas_in_sync
        self.views = config.method.domains.views
        self.seed = seed
        self.decode_stats = DecodeStats()

    def train_iterator(self, resume_step: int = 0):
        """The training iterator; `resume_step` > 0 skips what the run consumed when its position was not saved."""

        def dataset_fn(ctx):
            # Each input pipeline (one per worker) feeds all of its local replicas: after `step` steps it has
            # produced step x images per step / pipelines examples.
            data = self.config.data
            return train_dataset(
                self.source, self.resolution, self.images_per_replica, augment=data.augment,
                randaugment_layers=data.randaugment_layers, randaugment_magnitude=data.randaugment_magnitude,
                views=self.views, seed=self.seed, shuffle_buffer=data.shuffle_buffer, stats=self.decode_stats,
                skip_examples=resume_step * self.images_per_step // ctx.num_input_pipelines,
                crop_min_area=data.crop_min_area, input_context=ctx,
            )

        return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

    def iterator_can_be_saved(self, iterator, changed=()) -> bool:
        """Whether the iterator's position goes into checkpoints: its pipeline is stateless (no keras-cv
        RandAugment), the strategy's iterator supports it (the default strategy's does; Mirrored and TPU ones
        do not), and no allowed config change made a saved position meaningless. Otherwise a resume skips the
        consumed elements instead."""
        return (self.config.run.checkpoint_input_pipeline and self.config.data.augment != "keras_cv_randaugment"
                and not set(changed) & {"train_batch_size", "dataset", "resolution", "aux_domains", "method"}
                and isinstance(iterator, tf.__internal__.tracking.Trackable))

    def eval_dataset(self):
        """Per-replica batches padded to full size (label -1, not counted), sharded by worker."""
        per_replica = -(-self.config.optimization.eval_batch_size // self.strategy.num_replicas_in_sync)

        def dataset_fn(ctx):
            return eval_dataset(self.source, self.resolution, per_replica, input_context=ctx, pad_to_batch=True,
                                batches_multiple_of=ctx.num_replicas_in_sync // ctx.num_input_pipelines,
                                crop=self.config.data.eval_crop)

        return self.strategy.distribute_datasets_from_function(dataset_fn)
