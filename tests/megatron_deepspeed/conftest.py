"""The Megatron-DeepSpeed fixture, prepared once per test session (fork_harness.py)."""
import os

import pytest

from megatron_deepspeed import fork_harness


@pytest.fixture(scope="session")
def fork(tmp_path_factory):
    source = fork_harness.fixture_dir()
    if not os.path.isdir(os.path.join(source, "megatron")):
        pytest.skip(f"the Megatron-DeepSpeed fixture is not at {source} (set {fork_harness.FIXTURE_ENV} to its folder)")
    problem = fork_harness.check_packages()
    if problem:
        pytest.fail(problem)
    return fork_harness.prepare(str(tmp_path_factory.mktemp("megatron-deepspeed")))


@pytest.fixture(scope="session")
def fork_alone(fork):
    """The fork by itself: AdamW + cosine, a checkpoint at 10 (also the AuroraGPT-style source of
    the checkpoint tests)."""
    save = os.path.join(fork.work, "fork-alone")
    run = fork.run(["--optimizer", "adamw", "--lr-decay-style", "cosine", "--save", save, "--save-interval", "10"])
    return run, save


@pytest.fixture(scope="session")
def fork_with_ours(fork):
    """The same command with MEGATRON_EXT_PLUGINS=all (the start-up hook): our AdamW and cosine."""
    save = os.path.join(fork.work, "fork-with-ours")
    run = fork.run(["--optimizer", "adamw", "--lr-decay-style", "cosine", "--save", save, "--save-interval", "10"],
                   plugins="all", via="env")
    return run, save
