from setuptools import find_packages, setup

setup(
    name="megatron_ext",
    version="0.1.0",
    description="Megatron-DeepSpeed compatible LLM pretraining with plug-in optimizers, LR schedules "
    "and parametrizations, on megatron-core + DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ext", "megatron_ext.*"]),
    install_requires=[
        # A range that admits the CPU build (2.13.0) so no CUDA build is pulled on CPU machines;
        # install torch first on GPU clusters with the build that fits them.
        "torch>=2.4,<2.14",
        "deepspeed==0.19.8",
        "megatron-core==0.16.1",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.20,<1",
        "numpy>=1.24,<3",
        "tqdm>=4.60,<5",
        # optimizer plug-ins: Lion and ADOPT (pytorch-optimizer), schedule-free AdamW/SGD
        "pytorch-optimizer==4.1.0",
        "schedulefree==1.4.1",
        # experiment configs of `megatron-ext sweep --config` (already pulled in by tokenizers)
        "pyyaml>=5.1,<7",
    ],
    extras_require={
        "tensorboard": ["tensorboard>=2.15,<3"],
        "wandb": ["wandb>=0.17,<1"],
        "plots": ["matplotlib>=3.8,<4"],
        # megatron-ext run: OpenSeek-style experiment configs (Hydra's ${...} interpolation)
        "experiments": ["omegaconf>=2.3,<2.4"],
        # matplotlib: the plots (LR finder, coord-check, schedule) are tested too; omegaconf: megatron-ext run
        "test": ["pytest>=8,<10", "matplotlib>=3.8,<4", "omegaconf>=2.3,<2.4"],
    },
    entry_points={"console_scripts": ["megatron-ext=megatron_ext.cli:main"]},
)
