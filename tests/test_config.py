import pytest
import yaml

from workbench import config as C


def _schema():
    def p(t, d, h=""):
        return {"inferred_type_name": t, "default": d, "help": h}

    return {
        "match": {"run_dir": p("str", '"x"'), "dataset": p("str", '"synthetic"'), "model": p("str", '"tiny"'),
                  "pretrained": p("Optional[str]", '"synthetic"'), "k": p("int", "5"),
                  "batch_size": p("int", "256")},
        "finetune": {"run_dir": p("str", '"x"'), "model": p("str", '"tiny"'),
                     "pretrained": p("Optional[str]", "None"), "lr": p("float", "1e-5"),
                     "batch_size": p("int", "64"), "shots": p("list", '["full", 1]')},
    }


def test_defaults_come_from_notebooks():
    cfg = C.resolve(_schema())
    assert cfg["match"] == {"model": "tiny", "pretrained": "synthetic", "k": 5, "batch_size": 256}
    assert cfg["finetune"]["shots"] == ["full", 1]
    assert cfg["dataset"] == "synthetic" and cfg["seed"] == 0 and "dataset" not in cfg["match"]


def test_merge_order_defaults_preset_file_set():
    preset = {"seed": 1, "match": {"k": 3, "batch_size": 8}}
    file = {"match": {"k": 4}}
    cfg = C.resolve(_schema(), [preset, file], ["match.k=7"])
    assert cfg["seed"] == 1
    assert cfg["match"]["k"] == 7 and cfg["match"]["batch_size"] == 8


def test_bare_key_sets_every_stage_that_has_it():
    cfg = C.resolve(_schema(), [], ["batch_size=32"])
    assert cfg["match"]["batch_size"] == 32 and cfg["finetune"]["batch_size"] == 32
    cfg = C.resolve(_schema(), [{"batch_size": 16}])  # top-level key in a file behaves the same
    assert cfg["finetune"]["batch_size"] == 16


def test_model_override_switches_pretrained_unless_given():
    preset = {"match": {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
              "finetune": {"model": "ViT-L-14-336", "pretrained": "openai"}}
    cfg = C.resolve(_schema(), [preset], ["model=tiny"])
    assert cfg["match"]["model"] == cfg["finetune"]["model"] == "tiny"
    assert cfg["match"]["pretrained"] == cfg["finetune"]["pretrained"] == "synthetic"
    cfg = C.resolve(_schema(), [preset], ["model=tiny", "pretrained=null"])
    assert cfg["match"]["pretrained"] is None and cfg["finetune"]["pretrained"] is None


def test_unknown_keys_listed():
    with pytest.raises(C.ConfigError) as e:
        C.resolve(_schema(), [{"match": {"kk": 1}}], ["nonexistent=1", "nostage.k=2"])
    msg = str(e.value)
    assert "unknown configuration key(s): match.kk, nonexistent, nostage.k" in msg
    with pytest.raises(C.ConfigError, match="run_dir"):
        C.resolve(_schema(), [], ["run_dir=/tmp"])


def test_wrong_types_listed():
    with pytest.raises(C.ConfigError) as e:
        C.resolve(_schema(), [], ["match.k=abc", "seed=true", "finetune.lr=3", "stages=[nope]"])
    msg = str(e.value)
    assert "match.k='abc' (expected int)" in msg
    assert "seed=True (expected int)" in msg
    assert "unknown stage(s) ['nope']" in msg
    assert "finetune.lr" not in msg  # an int is a fine float


@pytest.mark.parametrize("value,ann,ok", [
    (None, "Optional[str]", True), ("a", "Optional[str]", True), (1, "Optional[str]", False),
    (True, "int", False), (1, "bool", False), ([1], "list", True), ({"a": 1}, "dict", True),
    (1, "Union[str, int]", True), (1.5, "Union[str, int]", False), ("x", "SomeClass", True),
])
def test_type_ok(value, ann, ok):
    assert C.type_ok(value, ann) is ok


def test_parse_set_yaml_values():
    assert C.parse_set("a=3") == ("a", 3)
    assert C.parse_set("a=null") == ("a", None)
    assert C.parse_set("a=[1, 3, 5]") == ("a", [1, 3, 5])
    assert C.parse_set("a=ViT-B-32") == ("a", "ViT-B-32")
    # exponents without a dot are floats (PyYAML alone reads "1e-4" as a string)
    assert C.parse_set("lr=1e-4") == ("lr", 1e-4) and isinstance(C.parse_set("lr=1e-4")[1], float)
    assert C.parse_set("a=[1e-5, 5E3, .5, 1_000]") == ("a", [1e-5, 5e3, 0.5, 1000])
    assert C.parse_set("a=1e") == ("a", "1e") and C.parse_set("a=e5") == ("a", "e5")
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_set("novalue")


def test_sources_and_base(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text(yaml.safe_dump({"base": "demo", "seed": 3}))
    src = C.load_source(str(f))
    assert src["seed"] == 3 and src["dataset"] == "synthetic"
    with pytest.raises(C.ConfigError, match="unknown preset 'nope'"):
        C.load_source("nope")
    assert "demo" in C.list_presets()


def test_float_exponents_in_files_and_set_pass_validation(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("base: demo\nfinetune:\n  lr: 1e-5\n  weight_decay: 5e-2\n")
    src = C.load_source(str(f))
    assert src["finetune"]["lr"] == 1e-5 and src["finetune"]["weight_decay"] == 0.05
    cfg = C.resolve(_schema(), [], ["finetune.lr=3e-4"])
    assert cfg["finetune"]["lr"] == 3e-4


def test_dotted_key_into_common_dict():
    cfg = C.resolve(_schema(), [{"dataset_options": {"a": 1}}], ["dataset_options.metadata=m.csv"])
    assert cfg["dataset_options"] == {"a": 1, "metadata": "m.csv"}


def test_unknown_loader_option_is_named():
    from workbench.data import load_dataset

    with pytest.raises(ValueError, match=r"dataset 'cub': unknown option\(s\) \['colour'\]; accepted options"):
        load_dataset("cub", "/nonexistent", colour=1)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    """A config file that is not valid YAML is a config error like any other: exit 2, the file, the line
    and column, no traceback (it used to exit 1 with a ScannerError about "<unicode string>")."""
    from workbench import cli

    bad = tmp_path / "my.yaml"
    bad.write_text("base: demo\nmatch:\n  k: 3\n  model: [tiny\n")
    rc = cli.main(["run", str(bad), "--reports", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}, line 5, column 1: YAML syntax error" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    bad.write_text("base: demo\nseed: 1\n\tmatch: {}\n")  # a tab where YAML wants spaces
    with pytest.raises(C.ConfigError, match=r"my\.yaml, line 3, column 1: YAML syntax error"):
        C.load_source(str(bad))


def test_interactive_defaults_to_widgets_in_jupyterlab_only(monkeypatch):
    """``interactive=None`` (the notebooks' default) builds explorers in a kernel JupyterLab started
    (JPY_SESSION_NAME) and not headless; a run always passes False unless told otherwise."""
    from workbench.config import load_schema, resolve, stage_parameters
    from workbench.params import interactive_view

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert interactive_view(None) is False and interactive_view(True) is True
    monkeypatch.setenv("JPY_SESSION_NAME", "/lab/05_align.ipynb")
    assert interactive_view(None) is True and interactive_view(False) is False
    schema = load_schema()
    for stage in ("describe", "match", "align"):
        assert schema[stage]["interactive"]["default"] == "None", stage
    cfg = resolve(schema)
    assert cfg["interactive"] is None
    assert stage_parameters(cfg, "align", schema)["interactive"] is False  # a run stays static, even from Lab
    assert stage_parameters(resolve(schema, sets=["interactive=true"]), "align", schema)["interactive"] is True
