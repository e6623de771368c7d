"""The inference network and its SavedModel: what `python -m advprop_tf.export` and the train command write.

`export()` builds a NEW, plain inference network with ONE BN set, copies into
it the weights of the chosen domain (the main one by default; "adv" gives the
adversarially-normalized, robust variant) from the EMA averages, and writes a
float32 SavedModel under export_dir/<version>/, the layout TF Serving watches,
whatever precision the training used.

Signatures:
  serving_default(image_bytes: string [N]) -> classes int64 [N], probabilities float32 [N, C]
      (decode + the evaluation preprocessing inside the graph)
  predict_pixels(pixels: float32 [N, H, W, 3] in [0, 255]) -> classes, probabilities, logits
Assets: labels.txt (class names, when known) and metadata.json (model, input
normalization, resolution, training method, domain, step).
"""

from __future__ import annotations

import json

import tensorflow as tf

from advprop_tf.data.preprocessing import is_decodable_image, preprocess_eval
from advprop_tf.domains import MAIN
from advprop_tf.errors import ConfigError
from advprop_tf.models.base import MultiDomainNetwork
from advprop_tf.models.registry import model_from_config
from advprop_tf.models.transfer import copy_weights
from advprop_tf.paths import join
from advprop_tf.training.run_dir import RunDir, publish_directory
from advprop_tf.training.trained import float32_policy, load_trained


class ExportError(ConfigError):
    """A request that cannot be exported; nothing was written. `field` names the setting."""


def inference_network(trained: MultiDomainNetwork, domain: str) -> MultiDomainNetwork:
    """A float32, one-BN-set copy of `trained` whose BNs hold `domain`'s statistics and affine weights."""
    if domain not in trained.domains:
        raise ExportError("domain", f"unknown domain {domain!r}; the model has {', '.join(trained.domains)}")
    with float32_policy():
        network = model_from_config(dict(trained.get_config(), domains=[MAIN]))
    copy_weights(trained, network, domain_of=lambda _: domain)
    return network


class ServingModule(tf.Module):
    """The exported object: the inference network's variables and its two signatures.

    The signatures capture the tf.Variables inside Keras 3's variables. Saved
    through the Keras network, only Keras' wrappers would be restorable, and a
    graph loader (TF Serving, `saved_model_cli run`) would find the captured
    variables uninitialized ("Could not find variable ..."). So the module
    tracks exactly the captured tf.Variables, by their Keras paths, and not the
    network object itself.
    """

    def __init__(self, network: MultiDomainNetwork, assets: dict):
        super().__init__(name="advprop_serving")
        self.__dict__["_network"] = network  # used by the signatures, deliberately not tracked
        self.resolution = network.resolution
        self.assets = {name: tf.saved_model.Asset(path) for name, path in assets.items()}
        size = self.resolution
        serve_bytes = tf.function(
            self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")]
        )
        serve_pixels = tf.function(
            self._serve_pixels, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")]
        )
        # Traced once, here; untracked, because save would trace tracked tf.functions a second time.
        self.__dict__["serving_signatures"] = {
            "serving_default": serve_bytes.get_concrete_function(),
            "predict_pixels": serve_pixels.get_concrete_function(),
        }
        by_id = {id(v.value): v.path for v in network.variables}
        captured = {}
        for function in self.serving_signatures.values():
            for variable in function.variables:
                if id(variable) not in by_id:
                    raise ExportError("model_dir", f"the inference network uses a variable outside its own: "
                                      f"{variable.name}")
                captured[by_id[id(variable)]] = variable
        self.variables_by_path = dict(sorted(captured.items()))

    @property
    def network(self):
        return self._network

    def _outputs(self, pixels):
        logits = tf.cast(self.network(pixels, training=False), tf.float32)
        return {
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
            "probabilities": tf.nn.softmax(logits),
            "logits": logits,
        }

    def _serve_pixels(self, pixels):
        return self._outputs(pixels)

    def _serve_bytes(self, image_bytes):
        def decode(data):
            check = tf.debugging.Assert(
                is_decodable_image(data),
                ["an image in image_bytes could not be decoded (not a complete JPEG, PNG, GIF, BMP or WebP)"],
            )
            with tf.control_dependencies([check]):
                return preprocess_eval(data, self.resolution)

        pixels = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec(
            [self.resolution, self.resolution, 3], tf.float32))
        outputs = self._outputs(pixels)
        return {"classes": outputs["classes"], "probabilities": outputs["probabilities"]}


def rest_request_inputs(body: dict) -> dict:
    """The named input arrays TF Serving's REST predict API makes of a request body, decoded as the server does.

    Row format {"instances": [{"image_bytes": {"b64": "..."}}, ...]} (or bare values for a one-input
    signature) and columnar {"inputs": {"image_bytes": [{"b64": "..."}, ...]}}; {"b64": ...} is binary
    data. For running a request offline (saved_model_cli run --inputs, or a signature call) where the
    model server itself cannot be installed. ValueError for a body the server would reject.
    """
    import base64

    import numpy as np

    def decode(value):
        if isinstance(value, dict):
            if set(value) != {"b64"}:
                raise ValueError(f"a binary value is written {{\"b64\": \"...\"}}, got {sorted(value)}")
            return base64.b64decode(value["b64"])
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    def array(values):
        values = decode(values)
        flat = values
        while isinstance(flat, list) and flat:
            flat = flat[0]
        return np.array(values, dtype=object if isinstance(flat, bytes) else None)

    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise ValueError('"instances" must be a non-empty list')
        if not all(isinstance(i, dict) and "b64" not in i for i in instances):
            return {"inputs": array(instances)}  # one unnamed input
        names = set(instances[0])
        if any(set(i) != names for i in instances):
            raise ValueError("every instance must name the same inputs")
        return {name: array([i[name] for i in instances]) for name in sorted(names)}
    if "inputs" in body:
        inputs = body["inputs"]
        return {name: array(v) for name, v in inputs.items()} if isinstance(inputs, dict) else {"inputs": array(inputs)}
    raise ValueError('a predict request holds "instances" (row format) or "inputs" (columnar format)')


def next_version(export_dir):
    versions = [int(d.strip("/")) for d in (tf.io.gfile.listdir(export_dir) if tf.io.gfile.isdir(export_dir) else [])
                if d.strip("/").isdigit()]
    return max(versions, default=0) + 1


def export(model_dir, export_dir, domain=MAIN, use_ema=None, version=None):
    """Write the SavedModel of a training directory's newest checkpoint; returns its directory. Raises
    ExportError (or another ConfigError naming the setting), writing nothing, on bad requests."""
    trained, run, step, use_ema = load_trained(model_dir, use_ema, domain)
    return export_network(trained, export_dir, domain, version, class_names=run.get("class_names"),
                          metadata={"method": run.get("method"), "ema": bool(use_ema), "step": step,
                                    "dataset": run.get("dataset")})


def export_network(trained, export_dir, domain=MAIN, version=None, class_names=None, metadata=None):
    """Write the SavedModel of a multi-domain network in memory (e.g. trained with AdvPropModel.fit): its
    `domain`'s inference network under export_dir/<version>; returns that directory."""
    version = next_version(export_dir) if version is None else int(version)
    target = join(export_dir, str(version))
    if tf.io.gfile.exists(target):
        raise ExportError("version", f"{target!r} already exists; not overwriting it")
    network = inference_network(trained, domain)
    metadata = {"model": trained.model_name, "input_normalization": trained.input_normalization,
                "resolution": trained.resolution, "num_classes": trained.num_classes, "domain": domain,
                **(metadata or {})}
    staging = RunDir.staging_dir(export_dir, version)
    if tf.io.gfile.exists(staging):  # left by an export that was interrupted
        tf.io.gfile.rmtree(staging)
    tf.io.gfile.makedirs(staging)
    assets = {"metadata": join(staging, "metadata.json")}
    with tf.io.gfile.GFile(assets["metadata"], "w") as f:
        json.dump(metadata, f, indent=2)
    if class_names:
        assets["labels"] = join(staging, "labels.txt")
        with tf.io.gfile.GFile(assets["labels"], "w") as f:
            f.write("\n".join(class_names) + "\n")
    module = ServingModule(network, assets)
    saved = join(staging, "saved_model")
    tf.saved_model.save(module, saved, signatures=module.serving_signatures)
    # Appear under export_dir/<version> only when complete (TF Serving picks it up then).
    publish_directory(saved, target)
    tf.io.gfile.rmtree(staging)
    return target
