"""Progress of the long conversions (megatron_ext/progress.py): on a terminal a bar by bytes with
the rate, the time remaining and the tensors done; elsewhere one line per stage with the counts,
the time and the rate; a stage can count what another library writes by polling; export-hf and
import-hf report their stages (convert's: tests/megatron_deepspeed/test_fork_checkpoints.py)."""
import io
import re
import threading
import time

import pytest

from conftest import run_module
from hf_fixtures import command_env, tiny_hf_model  # noqa: F401 (fixtures)
from megatron_ext.progress import Progress, folder_bytes, human_bytes

SIZE = r"[\d.]+ (B|KiB|MiB|GiB)"
LINE = SIZE + r" in [\d.]+ s( \(" + SIZE + r"/s\))?"  # what follows the tensors in a stage's line


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_not_on_a_terminal_each_stage_is_one_line():
    out = io.StringIO()
    progress = Progress("export-hf", out)
    with progress.stage("writing", tensors=3, nbytes=3 * 2**20) as stage:
        for _ in range(3):
            stage.add(1, 2**20)
    with pytest.raises(RuntimeError):
        with progress.stage("failing", tensors=1) as stage:
            raise RuntimeError("no line for a stage that did not finish")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"export-hf: writing: 3 tensors, " + LINE, lines[0]), lines
    assert lines[0].startswith("export-hf: writing: 3 tensors, 3.0 MiB in ")
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(10) == "10 B"


def test_on_a_terminal_a_bar_shows_bytes_rate_remaining_and_tensors():
    out = Terminal()
    with Progress("import-hf", out).stage("reading", tensors=4, nbytes=4 * 2**20) as stage:
        for _ in range(4):
            time.sleep(0.12)  # past tqdm's minimum refresh interval
            stage.add(1, 2**20)
    text = out.getvalue().replace("\r", "\n")
    last = [line for line in text.splitlines() if line.startswith("import-hf: reading")][-1]
    # bytes done / total, [elapsed<remaining, rate, tensors]
    assert re.fullmatch(r"import-hf: reading: 100%\|#+\| 4\.00M/4\.00M \[\d\d:\d\d<00:00, [\d.]+[kMG]?iB/s, "
                        r"4/4 tensors\]", last), last
    halfway = [line for line in text.splitlines() if "2/4 tensors" in line]
    assert halfway and re.search(r" 50%.* 2\.00M/4\.00M \[\d\d:\d\d<\d\d:\d\d, ", halfway[0]), halfway


def test_a_polled_stage_counts_files_another_library_writes(tmp_path):
    """The stage asks ``poll`` twice a second; bytes never exceed the stage's total (file headers)."""
    out = io.StringIO()
    stop = threading.Event()

    def writer():  # stands in for DeepSpeed's converter writing zero/<name>/fp32.pt
        for i in range(3):
            (tmp_path / f"p{i}").mkdir()
            (tmp_path / f"p{i}" / "fp32.pt").write_bytes(b"x" * 1100)
            time.sleep(0.3)
        stop.set()

    def poll():
        return len(list(tmp_path.glob("*/fp32.pt"))), folder_bytes(str(tmp_path))

    with Progress("convert", out).stage("converting", tensors=3, nbytes=3000, poll=poll) as stage:
        thread = threading.Thread(target=writer)
        thread.start()
        stop.wait(10)
        thread.join()
        assert 0 < stage.tensors <= 3  # seen while the writer ran
    assert out.getvalue().startswith("convert: converting: 3 tensors, 2.9 KiB in ")  # 3000 B, not 3300


def test_export_and_import_report_each_stage(tmp_path, command_env):  # noqa: F811
    source = tiny_hf_model(tmp_path / "llama")
    imported = run_module("megatron_ext.cli", ["import-hf", str(source), str(tmp_path / "ck"), "--seq-length", "64"])
    assert imported.returncode == 0, imported.stderr[-2000:]
    exported = run_module("megatron_ext.cli", ["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")])
    assert exported.returncode == 0, exported.stderr[-2000:]
    stages = [line for line in (imported.stderr + exported.stderr).splitlines() if re.match(r"(import|export)-hf: ", line)]
    expected = [rf"import-hf: reading LlamaForCausalLM from {re.escape(str(source))}: 21 tensors, ",
                r"import-hf: writing the checkpoint \(tensor-parallel size 1\): 15 tensors, ",
                rf"export-hf: reading {re.escape(str(tmp_path / 'ck' / 'global_step0'))}: 15 tensors, ",
                r"export-hf: converting to LlamaForCausalLM tensors \(float32\): 21 tensors, ",
                r"export-hf: writing safetensors: 21 tensors, "]
    assert len(stages) == len(expected), stages
    for line, pattern in zip(stages, expected):
        assert re.fullmatch(pattern + LINE, line), (line, pattern)
