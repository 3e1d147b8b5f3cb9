import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# The start-up hook of megatron_ext.megatron_deepspeed: a .pth line Python runs at every start.
# It imports megatron_ext only when MEGATRON_EXT_PLUGINS asks for the plug-ins (unset or "off":
# one environment lookup, nothing imported), so the fork's own launcher needs no change.
STARTUP_PTH = "megatron_ext_plugins.pth"
STARTUP_LINE = (
    "import os; os.environ.get('MEGATRON_EXT_PLUGINS', '').strip().lower() not in ('', 'off') "
    "and __import__('megatron_ext.megatron_deepspeed.startup')\n"
)


class BuildPyWithStartupHook(build_py):
    """A regular install (wheel): the .pth goes to the top of site-packages with the package."""

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, STARTUP_PTH), "w") as f:
            f.write(STARTUP_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, STARTUP_PTH)]


class EditableWheelWithStartupHook(editable_wheel):
    """``pip install -e .``: the editable wheel carries the .pth too (written where the wheel's own
    files are collected)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        with open(os.path.join(installation_dir, STARTUP_PTH), "w") as f:
            f.write(STARTUP_LINE)


# Hugging Face interop (megatron-ext export-hf / import-hf, hub tokenizers without tokenizer.json);
# protobuf reads SentencePiece model files when exporting their tokenizer.
HF = ["transformers>=5.24,<6", "safetensors>=0.6,<1", "accelerate>=1.10,<2", "protobuf>=7.36.1,<8"]
# megatron-ext eval: EleutherAI lm-evaluation-harness on an export
EVAL = HF + ["lm-eval>=0.4.13,<0.5"]

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
        # hub names resolved through the local cache (megatron_ext/hf/hub.py); tokenizers needs it anyway
        "huggingface_hub>=0.26,<3",
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
        "hf": HF,
        "eval": EVAL,
        # megatron-ext run: OpenSeek-style experiment configs (Hydra's ${...} interpolation)
        "experiments": ["omegaconf>=2.3,<2.4"],
        # matplotlib: the plots (LR finder, coord-check, schedule) are tested too; so are export/import/
        # eval (EVAL) and megatron-ext run (omegaconf). The rest are what the Megatron-DeepSpeed fixture
        # imports at module level (tests/megatron_deepspeed: the plug-ins and checkpoint conversion
        # tested inside the real fork).
        "test": ["pytest>=8,<10", "matplotlib>=3.8,<4", "omegaconf>=2.3,<2.4", "tensorboard>=2.15,<3",
                 "nltk>=3.8,<4", "pybind11>=2.11,<4", "regex>=2023.0,<2027", "six>=1.16,<2", "einops>=0.7,<1",
                 "rich>=13,<16", "wandb>=0.17,<1"] + EVAL,
    },
    entry_points={"console_scripts": ["megatron-ext=megatron_ext.cli:main"]},
    cmdclass={"build_py": BuildPyWithStartupHook, "editable_wheel": EditableWheelWithStartupHook},
)
