"""drn's messages render in the caller's terms: Python's argument names by default, or
another interface's (the CLI's flags) through a Spelling."""
from __future__ import annotations

import pickle

import pytest

import drn
from drn.errors import PYTHON, ModelError, Setting, Spelling

FLAGS = Spelling(argument=lambda n: "--" + n.replace("_", "-"),
                 setting=lambda n, v: f"--{n} {v}", listing={"models": "`tool models`",
                                                            "weights": "`tool models`"})


def test_a_template_renders_in_each_spelling_and_survives_pickling():
    exc = ModelError.spelled("{name}: pass {arg:num_classes} or use {use}; {list:models} has all",
                             name="drn_d_22", use=Setting("model", "drn_d_38"))
    assert str(exc) == ("drn_d_22: pass num_classes or use create_model('drn_d_38', ...); "
                        "drn.list_models() has all")
    assert exc.render(FLAGS) == "drn_d_22: pass --num-classes or use --model drn_d_38; `tool models` has all"
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is ModelError and again.render(FLAGS) == exc.render(FLAGS)


def test_values_are_inserted_verbatim_and_literal_messages_stay_literal():
    exc = ModelError.spelled("{source}: no such file; {arg:weights}", source="/tmp/{odd}.pth")
    assert str(exc) == "/tmp/{odd}.pth: no such file; weights"
    literal = ModelError('label file x: expected a JSON object like {"classes": [...]}')
    assert literal.render(FLAGS) == str(literal) == 'label file x: expected a JSON object like {"classes": [...]}'
    assert PYTHON.argument("model") == "create_model's name"


def test_create_model_errors_name_the_arguments_to_change(tmp_path):
    with pytest.raises(ModelError) as info:
        drn.create_model("drn_d_22")
    assert info.value.render(FLAGS).startswith(
        "drn_d_22: the number of classes is unknown; pass --num-classes, --classes (a preset such "
        "as 'cityscapes' or a label file) or --weights that carry them")
    with pytest.raises(ModelError) as info:
        drn.create_model("drn_x_1", num_classes=2)
    assert info.value.render(FLAGS).endswith("`tool models` lists all 16")
    with pytest.raises(drn.CheckpointError) as info:
        drn.create_model("drn_d_22", weights=str(tmp_path / "missing.pth"))
    assert "a released checkpoint's name (drn_c_26:imagenet" in info.value.render(FLAGS)
    assert info.value.render(FLAGS).endswith("...; `tool models` has them all)")
