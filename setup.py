"""advprop_tf: AdvProp (Xie et al., CVPR 2020) for TensorFlow 2 / Keras 3.

TensorFlow itself is an extra so that each machine installs its own build:
  pip install -e ".[cpu]"   # tensorflow-cpu (laptops, CI)
  pip install -e ".[gpu]"   # tensorflow with CUDA
  pip install -e ".[tpu]"   # TPU VMs: tensorflow-tpu, which brings its matching libtpu
or install `tensorflow` yourself and then `pip install -e .`.
"""

from setuptools import find_packages, setup

TF_VERSION = "2.21.*"
# TensorFlow's TPU build is the `tensorflow-tpu` package (it pins a matching
# libtpu); its newest release on the package index is 2.20.
TF_TPU_VERSION = "2.20.*"

setup(
    name="advprop_tf",
    version="0.1.0",
    description="AdvProp: adversarial examples improve image recognition, in TensorFlow 2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["advprop_tf", "advprop_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.5",
        "tensorflow-datasets>=4.9",
        "keras-cv>=0.9",
        "absl-py>=1.0",
        "tensorboard>=2.15",
        "numpy>=1.26",
    ],
    extras_require={
        "cpu": [f"tensorflow-cpu=={TF_VERSION}"],
        "gpu": [f"tensorflow[and-cuda]=={TF_VERSION}"],
        "tpu": [f"tensorflow-tpu=={TF_TPU_VERSION}"],
        "tools": ["matplotlib>=3.7"],  # the chart of tools/compare_methods.py
        # The ImageNet-C code (with its frost images) for --corruption_backend=imagecorruptions.
        "corruptions": ["imagecorruptions==1.1.2"],
        # keras-hub is not an extra: its releases require tensorflow-text, which requires the full
        # `tensorflow` package beside our tensorflow-cpu/-tpu, and an older kagglesdk than keras-cv's
        # kagglehub. The tests install it with --no-deps (README); these are its other needs.
        # The TPU compiler without a TPU (tools/tpu_compile.py): libtpu through jax[tpu], which compiles for a
        # compile-only topology description. jax 0.10.2 is the newest for Python 3.11 (0.11 needs 3.12).
        "tpu-compile": ["jax[tpu]==0.10.2; python_version >= '3.11'"],
        "test": ["pytest>=7", "matplotlib>=3.7", "imagecorruptions==1.1.2", "regex", "sentencepiece", "tokenizers",
                 "jax[tpu]==0.10.2; python_version >= '3.11'"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
