"""tools/mix_datasets.py and `megatron-ext mix-datasets`: the mixing arithmetic, and every bad input
reported at once, before anything is written."""
import os
import subprocess
import sys
from fractions import Fraction

import pytest

from conftest import REPO, error_lines, run_module
from megatron_ext.data.data_list import DataListError, parse_data_file_list
from megatron_ext.data.mix_datasets import mix

TOOL = os.path.join(REPO, "tools", "mix_datasets.py")


def tool(*args, cwd=None):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def data(tmp_path):
    """Prefixes a..e with both .bin and .idx present, and helpers to write lists."""
    for name in "abcde":
        for ext in (".bin", ".idx"):
            (tmp_path / f"{name}{ext}").write_bytes(b"")
    return tmp_path


def write(folder, name, text):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_weights_normalised_per_list_then_scaled(data):
    new = write(data, "new.txt", f"# new data\n1 {data}/a books\n\n3 {data}/b   # web, corpus from basename\n")
    old = write(data, "old.txt", f"0.2 {data}/c code\n0.2 {data}/d\n0.6 {data}/e math\n")
    out = tool("--inputs", "0.7", new, "0.3", old)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # Exact decimal arithmetic, rounded once: 0.7 x 3/4 prints as 0.525, not 0.5249999999999999.
    assert lines == [
        f"0.175 {data}/a books",
        f"0.525 {data}/b b",
        f"0.06 {data}/c code",
        f"0.06 {data}/d d",
        f"0.18 {data}/e math",
    ]
    # The trainer's own parser reads the result back; each list keeps its W_i / sum(W) share.
    listed = write(data, "mixed.txt", out.stdout)
    sources = parse_data_file_list(listed)
    expected = [Fraction(7, 10) * Fraction(1, 4), Fraction(7, 10) * Fraction(3, 4),
                Fraction(3, 10) * Fraction(2, 10), Fraction(3, 10) * Fraction(2, 10), Fraction(3, 10) * Fraction(6, 10)]
    assert [s.weight for s in sources] == [float(w) for w in expected]
    assert [s.corpus for s in sources] == ["books", "b", "code", "d", "math"]
    assert mix([("0.7", new), ("0.3", old)]) == sources  # the library call behind the tool
    with pytest.raises(DataListError, match=r"^1 problem: --inputs pair 2 \(0 .*\): weight '0' must be"):
        mix([("0.7", new), ("0", old)])


def test_unnormalised_outer_weights_and_one_list(data):
    a = write(data, "a.txt", f"5 {data}/a\n15 {data}/b\n")
    b = write(data, "b.txt", f"1 {data}/c\n")
    out = tool("--input", "2", a, "6", b)  # --input is the same flag
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["0.0625", "0.1875", "0.75"]
    single = tool("--inputs", "3", a)
    assert [line.split()[0] for line in single.stdout.splitlines()] == ["0.25", "0.75"]


def test_output_file_written_atomically_and_same_as_stdout(data):
    a = write(data, "a.txt", f"1 {data}/a x\n1 {data}/b y\n")
    out = data / "out.txt"
    out.write_text("old contents\n")
    os.chmod(out, 0o640)
    proc = tool("--inputs", "1", a, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert out.read_text() == tool("--inputs", "1", a).stdout == f"0.5 {data}/a x\n0.5 {data}/b y\n"
    assert os.stat(out).st_mode & 0o777 == 0o640  # replaced, permissions kept
    assert sorted(os.listdir(data)) == sorted([f"{n}{e}" for n in "abcde" for e in (".bin", ".idx")] + ["a.txt", "out.txt"])


def test_every_problem_reported_at_once_and_nothing_written(data):
    good = write(data, "good.txt", f"1 {data}/a\n")
    bad = write(data, "bad.txt", "\n".join([
        "# header",
        f"x {data}/b",            # 2: non-numeric weight
        f"0 {data}/c",            # 3: non-positive
        f"-1.5 {data}/d",         # 4: non-positive
        f"1 {data}/e corpus extra",  # 5: malformed (4 fields)
        "0.5",                    # 6: malformed (1 field)
        f"1 {data}/nobin",        # 7: .bin and .idx missing
        f"nan {data}/a",          # 8: not finite
    ]) + "\n")
    (data / "half.idx").write_bytes(b"")
    half = write(data, "half.txt", f"2 {data}/half  # only .idx exists\n")
    out = data / "out.txt"
    out.write_text("keep me\n")
    proc = tool("--inputs", "1", good, "zero", bad, "-2", half, "1", str(data / "absent.txt"), "--output", str(out))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("mix_datasets.py: error: 12 problems: ")
    message = lines[0]
    for expected in [
        f"--inputs pair 2 (zero {bad}): weight 'zero' is not a number",
        f"{bad}:2: weight 'x' is not a number",
        f"{bad}:3: weight '0' must be a finite number > 0",
        f"{bad}:4: weight '-1.5' must be a finite number > 0",
        f"{bad}:5: expected 'weight path-prefix [corpus]', got 4 fields",
        f"{bad}:6: expected 'weight path-prefix [corpus]', got 1 field",
        f"missing {bad}:7: {data}/nobin.bin",
        f"missing {bad}:7: {data}/nobin.idx",
        f"{bad}:8: weight 'nan' must be a finite number > 0",
        f"--inputs pair 3 (-2 {half}): weight '-2' must be a finite number > 0",
        f"missing {half}:1: {data}/half.bin",
        f"data file list not found: {data}/absent.txt",
    ]:
        assert expected in message, expected
    assert out.read_text() == "keep me\n"  # the existing output is untouched
    assert not [n for n in os.listdir(data) if n.startswith(".")]  # no temporary left behind


def test_no_check_skips_only_the_existence_check(data):
    lst = write(data, "l.txt", f"1 {data}/gone\n1 {data}/a\n")
    assert tool("--inputs", "1", lst).returncode == 2
    proc = tool("--inputs", "1", lst, "--no-check")
    assert proc.returncode == 0 and proc.stdout == f"0.5 {data}/gone gone\n0.5 {data}/a a\n"
    bad = write(data, "bad.txt", f"oops {data}/a\n")
    proc = tool("--inputs", "1", bad, "--no-check")
    assert proc.returncode == 2 and f"{bad}:1: weight 'oops' is not a number" in proc.stderr


@pytest.mark.parametrize("argv,problem", [
    (["--inputs", "1"], "expected pairs 'W1 LIST1 W2 LIST2 ...', got 1 value: 1"),
    ([], "the following arguments are required: --inputs"),
    (["--inputs", "1", "{lst}", "--output", "{data}/no/such/dir/out.txt"], "directory {data}/no/such/dir does not exist"),
    (["--inputs", "1", "{lst}", "--output", "{data}"], "is a directory"),
    (["--inputs", "1", "{empty}"], "no data sources (every line is blank or a comment)"),
])
def test_argument_errors_one_line(data, argv, problem):
    lst = write(data, "l.txt", f"1 {data}/a\n")
    empty = write(data, "empty.txt", "# nothing\n\n")
    fill = lambda s: s.format(lst=lst, data=data, empty=empty)  # noqa: E731
    proc = tool(*map(fill, argv))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("mix_datasets.py: error: ") and fill(problem) in lines[0]


def test_cli_subcommand_shares_the_tool(data):
    new = write(data, "new.txt", f"1 {data}/a\n3 {data}/b\n")
    old = write(data, "old.txt", f"1 {data}/c\n")
    proc = run_module("megatron_ext.cli", ["mix-datasets", "--inputs", "0.9", new, "0.1", old])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == tool("--inputs", "0.9", new, "0.1", old).stdout
    assert proc.stdout.splitlines()[0] == f"0.225 {data}/a a"
    proc = run_module("megatron_ext.cli", ["mix-datasets", "--inputs", "0.9", new, "x", old])
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f"megatron-ext mix-datasets: error: 1 problem: --inputs pair 2 (x {old}): "
                                        "weight 'x' is not a number"]


def test_mixed_list_trains(data, tmp_path_factory):
    """The output is a --data-file-list the trainer accepts (validated with real files)."""
    from megatron_ext.launcher.demo import prepare

    built = prepare(str(tmp_path_factory.mktemp("demo")))  # the demo corpus, as train_alcf.sh builds it
    demo = built["data_file_list"]
    prefix = parse_data_file_list(demo)[0].prefix
    replay = write(data, "replay.txt", f"1 {prefix} old\n")
    out = str(data / "mix.txt")
    assert tool("--inputs", "0.8", demo, "0.2", replay, "--output", out).returncode == 0
    assert [s.corpus for s in parse_data_file_list(out)] == ["shakespeare", "old"]
    from megatron_ext.plan import parse_args

    args = parse_args(["--data-file-list", out, "--tokenizer-model", built["tokenizer_model"],
                       "--train-iters", "1"], world_size=1)
    assert args.data_file_list == out
