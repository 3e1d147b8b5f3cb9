"""Two real processes under torchrun on gloo: data parallel with ZeRO-1/2 and tensor parallel
reproduce the single-process run on the same global batch."""
import pytest

from conftest import TINY, assert_same_run, layouts, read_metrics, run_metrics, run_trainer

STEPS = ["--mock-data", "--train-iters", "4", "--global-batch-size", "4", "--lr-warmup-iters", "1"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp1") / "m.jsonl"
    run_trainer(TINY + STEPS + ["--micro-batch-size", "4", "--metrics-file", str(path)])
    return read_metrics(path)


@pytest.mark.parametrize("name, extra, nproc", layouts("dp2-zero1", "dp2-zero2", "tp2"))
def test_two_processes_match_single_process(tmp_path, single_process, name, extra, nproc):
    m, proc = run_metrics(TINY + STEPS + extra, tmp_path / "m.jsonl", nproc)
    if name == "tp2":
        assert "tensor-parallel size  : 2" in proc.stdout and "data-parallel size    : 1" in proc.stdout
    else:
        assert "data-parallel size    : 2" in proc.stdout
    assert sorted(m) == [1, 2, 3, 4]
    assert_same_run(m, single_process, m, rel=1e-5, abs=1e-6, name=name)
    assert_same_run(m, single_process, m, rel=1e-4, fields=("grad_norm",), name=name)
    assert all(m[it]["consumed_samples"] == 4 * it for it in m)


@pytest.mark.slow
def test_dp2_resume_is_exact(tmp_path):
    ck = tmp_path / "ck"
    common = TINY + STEPS + ["--micro-batch-size", "2", "--zero-stage", "1", "--save", str(ck), "--load", str(ck),
                             "--save-interval", "2"]
    run_trainer(common + ["--exit-interval", "2"], nproc=2)
    run_trainer(common, nproc=2)
    full = tmp_path / "full.jsonl"
    run_trainer(TINY + STEPS + ["--micro-batch-size", "2", "--zero-stage", "1", "--metrics-file", str(full)], nproc=2)
    a, b = read_metrics(full), read_metrics(ck / "metrics.jsonl")
    assert [a[i]["lm_loss"] for i in (3, 4)] == [b[i]["lm_loss"] for i in (3, 4)]
