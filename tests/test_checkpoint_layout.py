"""The checkpoint layout module names files as DeepSpeed's own naming code does (engine, ZeRO 3,
pipeline layers), tells every kind apart in a folder, reads DeepSpeed's constants without importing
DeepSpeed; the staged-folder helper publishes only a complete folder and leaves nothing behind."""
import os
import subprocess
import sys
import types

import pytest

from conftest import REPO, _env
from megatron_ext import checkpoint_layout as layout
from megatron_ext import fileio


def test_names_are_the_ones_deepspeeds_naming_code_writes():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology

    def engine(zero3):
        return types.SimpleNamespace(zero_optimization_partition_weights=lambda: zero3,
                                     _get_zero_ckpt_prefix=lambda dp, bf16_mode: DeepSpeedEngine._get_zero_ckpt_prefix(
                                         None, dp, bf16_mode))

    def theirs(path):
        return os.path.basename(path)

    assert theirs(DeepSpeedEngine._get_ckpt_name(engine(False), "", "t", mp_placeholder="03")) == \
        layout.model_states_name(3)
    assert theirs(DeepSpeedEngine._get_ckpt_name(engine(True), "", "t", mp_placeholder="03", pp_placeholder=12)) == \
        layout.model_states_name(3, zero3_dp_rank=12)
    for bf16 in (False, True):
        assert theirs(DeepSpeedEngine._get_rank_zero_ckpt_name(engine(False), "", "t", 3, 12, bf16)) == \
            layout.optim_states_name(3, 12, bf16=bf16)
    # the pipeline engine's per-layer files: with a tensor-parallel axis (rank 3: pipe 1, model 1) and without
    for topo, rank, tp in ((PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1), 3, 1),
                           (PipeDataParallelTopology(num_pp=2, num_dp=1), 1, None)):
        module = types.SimpleNamespace(_local_start=5, global_rank=rank, _grid=types.SimpleNamespace(_topo=topo))
        assert theirs(PipelineModule.ckpt_layer_path(module, "", 2)) == layout.layer_states_name(7, tp)


def touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), "w").close()
    return str(folder)


def test_every_kind_of_file_is_told_apart(tmp_path):
    zero1 = touch(tmp_path / "global_step1", *[layout.model_states_name(tp) for tp in (0, 1)],
                  *[layout.optim_states_name(tp, dp, bf16=True) for tp in (0, 1) for dp in (0, 1)])
    zero3 = touch(tmp_path / "global_step2", *[layout.model_states_name(0, zero3_dp_rank=dp) for dp in range(11)],
                  *[layout.optim_states_name(0, dp) for dp in range(11)])
    pipe = touch(tmp_path / "global_step3", layout.model_states_name(0), layout.model_states_name(1),
                 *[layout.layer_states_name(layer, tp) for layer in (0, 1, 2) for tp in (0, 1)])
    moe = touch(tmp_path / "global_step4", layout.model_states_name(0), "expert_0_mp_rank_00_model_states.pt",
                "layer_1_expert_3_mp_rank_00_model_states.pt", "expp_rank_0_mp_rank_00_optim_states.pt", "notes.txt")

    assert [os.path.basename(f) for f in layout.model_states_files(zero1)] == \
        ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    assert len(layout.optim_states_files(zero1)) == 4 and not layout.is_zero3(zero1)
    assert layout.tp_ranks(zero1) == [0, 1]
    assert [os.path.basename(f) for f in layout.tp_rank_files(zero1, 1)] == [
        "mp_rank_01_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt"]
    assert os.path.basename(layout.optim_states_file(zero1, 1, 0)) == "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt"

    assert layout.is_zero3(zero3) and len(layout.model_states_files(zero3)) == 11 and layout.tp_ranks(zero3) == [0]
    assert os.path.basename(layout.client_state_file(zero3)) == "zero_pp_rank_0_mp_rank_00_model_states.pt"
    assert sorted(layout.dp_rank_of(f) for f in layout.optim_states_files(zero3)) == list(range(11))

    assert len(layout.layer_states_files(pipe)) == 6 and layout.tp_ranks(pipe) == [0, 1]  # not counted as model states
    assert [layout.layer_of(f) for f in layout.layer_states_files(pipe)][-1] == (2, 1)
    assert layout.layer_of(layout.layer_states_name(12)) == (12, None)
    assert layout.model_states_files(moe) == [os.path.join(moe, "mp_rank_00_model_states.pt")]
    assert len(layout.expert_states_files(moe)) == 3 and layout.optim_states_files(moe) == []

    # --keep-last and find_checkpoint know a ZeRO 3 folder as a checkpoint
    assert [it for it, _ in layout.own_checkpoints(str(tmp_path))] == [1, 2, 3, 4]
    (tmp_path / "latest").write_text("global_step2")
    assert layout.find_checkpoint(str(tmp_path)) == (str(tmp_path), "global_step2")
    assert layout.find_checkpoint(zero3) == (str(tmp_path), "global_step2")


def test_find_checkpoint_names_what_it_looked_for(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(layout.CheckpointFileError, match="zero_pp_rank_\\*_mp_rank_\\*_model_states.pt .*'latest' or "
                                                           "'latest_universal'"):
        layout.find_checkpoint(str(tmp_path / "run"), universal=True)
    (tmp_path / "run" / "latest_universal").write_text("global_step4_universal")
    touch(tmp_path / "run" / "global_step4_universal", layout.model_states_name(0))
    assert layout.find_checkpoint(str(tmp_path / "run"), universal=True)[1] == "global_step4_universal"
    with pytest.raises(layout.CheckpointFileError, match="no such checkpoint directory"):
        layout.find_checkpoint(str(tmp_path / "missing"))


def test_deepspeeds_constants_are_read_without_importing_deepspeed():
    code = ("import sys; from megatron_ext import checkpoint_layout as l; "
            "assert 'deepspeed' not in sys.modules, 'imported'; print(l.MODEL_PREFIX, l.ZERO_PREFIX, l.OPTIM_SUFFIX)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    from deepspeed.checkpoint import constants

    assert proc.stdout.split() == [constants.MODEL_FILE_PREFIX, constants.ZERO_FILE_PREFIX, constants.OPTIM_FILE_SUFFIX]


# -- the staged-folder helper ---------------------------------------------------------------------
def test_a_failed_build_publishes_nothing_and_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.staged_folder(str(final), ".x.") as staged:
            os.makedirs(staged)
            open(os.path.join(staged, "new.txt"), "w").close()
            raise RuntimeError("the writer failed half-way")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(final) == ["old.txt"]


def test_a_complete_build_replaces_the_folder_and_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with fileio.staged_folder(str(final), ".x.") as staged:
        os.makedirs(os.path.join(staged, "sub"))
        (tmp_path / "seen").write_text(str(os.path.isdir(final)))  # the old folder stays until the end
        open(os.path.join(staged, "sub", "new.txt"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["out", "seen"] and (tmp_path / "seen").read_text() == "True"
    assert os.listdir(final) == ["sub"] and os.listdir(final / "sub") == ["new.txt"]
