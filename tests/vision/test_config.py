"""vistok.config on what a config file holds, beside test_tools' checks of overrides: a key written twice inside a
list, and the kinds of the keys that default to unset."""

import pytest

from vistok.config import ConfigError, load_config
from vistok.experiment import DATA_DEFAULTS, MODEL_DEFAULTS, UNSET_KINDS

DEFAULTS = {**MODEL_DEFAULTS, "data": DATA_DEFAULTS}


def test_a_key_written_twice_in_a_mapping_inside_a_list_is_refused(tmp_path):
    """``method: [[ats, {k: 40, k: 8}]]`` kept k=8 and dropped k=40 unseen when the check looked into mappings but
    not into lists; the same key in two of the list's mappings is no repeat."""
    file = tmp_path / "c.yaml"
    file.write_text("method: [[ats, {k: 40, k: 8}]]\n")
    with pytest.raises(ConfigError, match="'k' is written twice"):
        load_config(DEFAULTS, file, None, UNSET_KINDS)
    file.write_text("method: [[ats, {k: 40}], [merge, {k: 8}]]\n")
    assert load_config(DEFAULTS, file, None, UNSET_KINDS)["method"] == [["ats", {"k": 40}], ["merge", {"k": 8}]]


@pytest.mark.parametrize("text, message", [
    ("checkpoint: true\n", "checkpoint should be str"), ("data:\n  root: 5\n", "data.root should be str"),
    ("data:\n  input_size: true\n", "data.input_size should be int or list"),
    ("method: 5\n", "method should be str or list")])
def test_keys_that_default_to_unset_are_type_checked_in_a_file_too(tmp_path, text, message):
    """A config file's value of a key that defaults to unset is checked against its kinds (UNSET_KINDS) as a
    command line's is: ``checkpoint: true`` in a file passed, to fail later with a TypeError."""
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULTS, file, None, UNSET_KINDS)
    file.write_text("checkpoint: runs/a/model.safetensors\ndata:\n  root: data\n  input_size: [24, 24]\n")
    config = load_config(DEFAULTS, file, None, UNSET_KINDS)
    assert (config["checkpoint"], config["data"]["root"], config["data"]["input_size"]) == (
        "runs/a/model.safetensors", "data", [24, 24])
