"""Data-source lists (DATA_FILE_LIST files and --data-path tokens): parsing, blending, and error
messages that point at every bad FILE:LINE at once."""
import math

import pytest

from megatron_ext.data.data_list import (DataListError, DataSource, blend_of, check_sources_exist,
                                         parse_data_file_list, parse_data_path)


def write(tmp_path, text, name="list.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_good_list_with_comments_blanks_and_corpus_names(tmp_path):
    path = write(tmp_path, """# AuroraGPT-style list
0.5 /data/books/books_text_document books

   # indented comment
1.5 /data/web/cc-0001_text_document   # trailing comment, corpus from the basename
2e-1\t/data/code/code_text_document\tcode
""")
    assert parse_data_file_list(path) == [
        DataSource(0.5, "/data/books/books_text_document", "books"),
        DataSource(1.5, "/data/web/cc-0001_text_document", "cc-0001_text_document"),
        DataSource(0.2, "/data/code/code_text_document", "code"),
    ]


def test_relative_prefix_kept_as_written(tmp_path):
    path = write(tmp_path, "1 data/part_text_document\n")
    assert parse_data_file_list(path)[0].prefix == "data/part_text_document"


def test_blend_is_normalised():
    prefixes, weights = blend_of([DataSource(1, "a", "a"), DataSource(3, "b", "b"),
                                  DataSource(4, "c", "c")])
    assert prefixes == ["a", "b", "c"]
    assert weights == pytest.approx([0.125, 0.375, 0.5]) and math.fsum(weights) == pytest.approx(1)


def test_blend_of_nothing():
    with pytest.raises(DataListError):
        blend_of([])


@pytest.mark.parametrize("line,problem", [
    ("0.5", "got 1 field"),
    ("0.5 /a/b corpus extra", "got 4 fields"),
    ("half /a/b", "'half' is not a number"),
    ("0 /a/b", "must be a finite number > 0"),
    ("-1 /a/b", "must be a finite number > 0"),
    ("nan /a/b", "must be a finite number > 0"),
    ("inf /a/b", "must be a finite number > 0"),
])
def test_each_bad_line_reports_file_and_line(tmp_path, line, problem):
    path = write(tmp_path, f"# header\n1.0 /ok/prefix\n{line}\n")
    with pytest.raises(DataListError) as e:
        parse_data_file_list(path)
    assert f"{path}:3: " in str(e.value) and problem in str(e.value)


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "x /a\n1.0 /ok\n\n0 /b\n1 2 3 4\n")
    with pytest.raises(DataListError) as e:
        parse_data_file_list(path)
    message = str(e.value)
    assert message.startswith(f"3 problems in data file list {path}: ")
    assert "\n" not in message
    problems = message.split(": ", 1)[1].split("; ")
    assert [p.split(": ")[0] for p in problems] == [f"{path}:1", f"{path}:4", f"{path}:5"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   \n"])
def test_empty_list(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(DataListError, match="no data sources"):
        parse_data_file_list(path)


def test_missing_list_file(tmp_path):
    with pytest.raises(DataListError, match=f"not found: {tmp_path / 'nope.txt'}"):
        parse_data_file_list(str(tmp_path / "nope.txt"))


def test_data_path_single_prefix():
    assert parse_data_path(["/d/web_text_document"]) == [
        DataSource(1.0, "/d/web_text_document", "web_text_document")]


def test_data_path_pairs():
    sources = parse_data_path(["0.3", "/d/a", "0.7", "/d/b"])
    assert sources == [DataSource(0.3, "/d/a", "a"), DataSource(0.7, "/d/b", "b")]
    assert blend_of(sources)[1] == pytest.approx([0.3, 0.7])


@pytest.mark.parametrize("tokens,problem", [
    ([], "no data prefix"),
    (["0.5"], "weight with no path prefix"),
    (["0.5", "/d/a", "0.5"], "got 3 values"),
    (["/d/a", "/d/b"], "pair 1 (/d/a /d/b): weight '/d/a' is not a number"),
    (["0.5", "/d/a", "0", "/d/b"], "pair 2 (0 /d/b): weight '0' must be"),
    (["0.5", "0.5"], "expected a path prefix after the weight"),
])
def test_data_path_errors(tokens, problem):
    with pytest.raises(DataListError) as e:
        parse_data_path(tokens)
    assert problem in str(e.value) and "--data-path" in str(e.value)


def test_data_path_reports_every_bad_pair():
    with pytest.raises(DataListError, match=r"^2 problems in --data-path: pair 1 .*; pair 3 "):
        parse_data_path(["x", "/a", "1", "/b", "-2", "/c"])


def test_missing_bin_or_idx_named(tmp_path):
    for name in ("full.bin", "full.idx", "nobin.idx", "noidx.bin"):
        (tmp_path / name).write_bytes(b"")
    sources = [DataSource(1, str(tmp_path / p), p) for p in ("full", "nobin", "noidx", "none")]
    with pytest.raises(DataListError) as e:
        check_sources_exist(sources)
    message = str(e.value)
    assert message.startswith("4 data files missing: ")
    missing = message.split(": ", 1)[1].split("; ")
    expected = ("nobin.bin", "noidx.idx", "none.bin", "none.idx")
    assert missing == [str(tmp_path / f) for f in expected]
    check_sources_exist(sources[:1])  # complete pair: no error
