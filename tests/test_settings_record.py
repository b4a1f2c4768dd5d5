"""record_or_check / describe_changes: the shared refusal of reruns with other settings."""

import json

import pytest

from flipjax.settings_record import describe_changes, record_or_check


def test_first_run_records_and_same_rerun_passes(tmp_path):
    path = tmp_path / "sub" / "settings.json"
    settings = {"grid": 8, "size": (32, 32), "text": "hash"}
    record_or_check(path, settings, refusal="R", remedy="M")
    assert json.loads(path.read_text()) == {"grid": 8, "size": [32, 32], "text": "hash"}
    assert not list(path.parent.glob("*.tmp*"))
    record_or_check(path, settings, refusal="R", remedy="M")  # tuples compare as read back


def test_changes_are_all_named(tmp_path):
    path = tmp_path / "settings.json"
    record_or_check(path, {"grid": 8, "seed": 0}, refusal="R", remedy="M")
    with pytest.raises(ValueError) as e:
        record_or_check(path, {"grid": 16, "seed": 0, "new": 1}, refusal="--out D is other",
                        remedy="use a new --out", recorded_as="cached")
    assert str(e.value) == ("--out D is other (grid: cached 8 vs requested 16, new: cached "
                            "None vs requested 1); use a new --out")
    assert json.loads(path.read_text()) == {"grid": 8, "seed": 0}  # untouched


def test_describe_changes_ignores_and_orders():
    assert describe_changes({"a": 1, "b": 2}, {"a": 1, "b": 2}) == ""
    assert describe_changes({"b": 1, "a": 1}, {"b": 2, "a": 3}, ignore=("a",)) == \
        "b: recorded 1 vs requested 2"
    assert describe_changes({"a": 1}, {"b": 1}) == \
        "a: recorded 1 vs requested None, b: recorded None vs requested 1"


@pytest.mark.parametrize("text, match", [("{oops", "is not valid JSON"), ("[1, 2]", "JSON object")])
def test_damaged_file_is_named(tmp_path, text, match):
    path = tmp_path / "settings.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        record_or_check(path, {"a": 1}, refusal="R", remedy="delete it")
    assert str(path) in str(e.value) and str(e.value).endswith("delete it")
