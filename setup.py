"""twinflow_jax: TwinFlow one-step generation in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="twinflow_jax",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of TwinFlow (arXiv 2512.05150): one-step "
        "generation with self-adversarial flows."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["twinflow_jax", "twinflow_jax.*"]),
    include_package_data=True,
    package_data={"twinflow_jax": ["data/assets/*", "evaluation/assets/*"]},
    install_requires=[
        # Tested: jax 0.10.2 (Python 3.11) and 0.12.0.1 (Python 3.12, which it needs).
        "jax>=0.10.2,<0.13",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.12.0,<0.13",
        "grain>=0.2.12,<0.3",
        "ml_collections>=1.0,<2",
        "tensorflow-datasets>=4.9.8,<5",
        "clu>=0.0.12,<0.1",
        "numpy>=1.26,<3",
        # diffusers-format weights in and out (models/convert/), no torch.
        "safetensors>=0.4",
    ],
    extras_require={
        # scipy (also a jax dependency): reference sqrtm in the FID tests. tokenizers: the
        # caption-embedding tests read the tiny tokenizers of tests/fixtures. Pillow: the
        # latent-preparation tests decode PNG / JPEG / CMYK images.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "tokenizers>=0.20", "pillow>=10"],
        # Data preparation (python -m twinflow_jax.data.prepare / .captions): text
        # tokenizers (Rust, no torch) and image decoding. The text encoders run in JAX.
        "prep": ["tokenizers>=0.20", "pillow>=10"],
        # TensorBoard summaries through clu.metric_writers (imports TensorFlow).
        "tensorboard": ["tensorflow-cpu>=2.16", "tensorboard>=2.16"],
        # Decoding PNG/JPEG of TFDS image datasets and image folders without TensorFlow.
        "images": ["pillow>=10"],
        # Only to read PyTorch `.pt` / `.pth` checkpoints (DiT/SiT, FID Inception) in the
        # converters.
        "torch": ["torch>=2.1"],
    },
)
