"""Atomic writes: a failure leaves the previous file or folder and no temporary litter."""

import json

import pytest

from ospo.io import atomic_dir, write_json, write_jsonl, write_text


def test_write_text_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "out.txt"
    write_text(path, "one")
    write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_failed_json_keeps_the_previous_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"b": 1, "a": 2.5})
    assert list(json.loads(path.read_text())) == ["a", "b"]  # sorted keys
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": 2.5, "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_jsonl_one_object_per_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "é"}, {"q": 2}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"q": "é"}, {"q": 2}]


def test_atomic_dir_replaces_on_success_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "policy"
    with atomic_dir(target) as tmp:
        (tmp / "w.txt").write_text("v1")
    assert (target / "w.txt").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w.txt").write_text("v2")
            raise RuntimeError("interrupted")
    assert (target / "w.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]
    with atomic_dir(target) as tmp:
        (tmp / "other.txt").write_text("v3")
    assert sorted(p.name for p in target.iterdir()) == ["other.txt"]
