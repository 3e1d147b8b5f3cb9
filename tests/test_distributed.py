"""Two real processes under torchrun on gloo: data parallel with ZeRO-1/2 and tensor parallel
reproduce the single-process run on the same global batch."""
import pytest

from conftest import TINY, read_metrics, run_trainer

STEPS = ["--mock-data", "--train-iters", "4", "--global-batch-size", "4", "--lr-warmup-iters", "1"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp1") / "m.jsonl"
    run_trainer(TINY + STEPS + ["--micro-batch-size", "4", "--metrics-file", str(path)])
    return read_metrics(path)


@pytest.mark.parametrize("name, extra", [
    ("dp2-zero1", ["--zero-stage", "1", "--micro-batch-size", "2"]),
    ("dp2-zero2", ["--zero-stage", "2", "--micro-batch-size", "1"]),  # with accumulation 2
    ("tp2", ["--tensor-model-parallel-size", "2", "--micro-batch-size", "4"]),
])
def test_two_processes_match_single_process(tmp_path, single_process, name, extra):
    path = tmp_path / "m.jsonl"
    proc = run_trainer(TINY + STEPS + extra + ["--metrics-file", str(path)], nproc=2)
    if name == "tp2":
        assert "tensor-parallel size  : 2" in proc.stdout and "data-parallel size    : 1" in proc.stdout
    else:
        assert "data-parallel size    : 2" in proc.stdout
    m = read_metrics(path)
    assert sorted(m) == [1, 2, 3, 4]
    for it in m:
        assert m[it]["lm_loss"] == pytest.approx(single_process[it]["lm_loss"], rel=1e-5, abs=1e-6), (name, it)
        assert m[it]["grad_norm"] == pytest.approx(single_process[it]["grad_norm"], rel=1e-4), (name, it)
        assert m[it]["consumed_samples"] == 4 * it


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
