import pytest

from dermray.errors import ConfigError
from dermray.runtime.config import load_config


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_file_and_overrides(tmp_path):
    path = write(tmp_path, "run_id: r1\npartition:\n  folds: 5\ndata:\n  manifest: s3://b/m.parquet\n")
    cfg = load_config(path, ["partition.seed=3", "partition.max_class_size=50", "output=s3://b/out",
                             "ray.address=null"])
    assert (cfg.run_id, cfg.partition.folds, cfg.partition.seed, cfg.partition.max_class_size) == ("r1", 5, 3, 50)
    assert cfg.data.manifest == "s3://b/m.parquet" and cfg.output == "s3://b/out" and cfg.ray.address is None
    assert load_config(None, ["data.tasks=t.yaml"]).data.tasks == "t.yaml"
    assert cfg.to_dict()["partition"]["max_class_size"] == 50


@pytest.mark.parametrize("text, overrides, fragment", [
    ("partition:\n  fold: 5\n", [], "unknown key 'partition.fold'"),
    ("bogus: 1\n", [], "unknown key 'bogus'"),
    ("partition:\n  folds: five\n", [], "key 'partition.folds' must be int"),
    ("partition: 3\n", [], "must be a mapping"),
    ("", ["partition.folds=x"], "key 'partition.folds' must be int"),
    ("", ["partition.nope=1"], "unknown key 'partition.nope'"),
    ("", ["partition=1"], "is a section"),
    ("", ["folds"], "expected key=value"),
    ("- a\n- b\n", [], "must be a mapping"),
    ("a: [\n", [], "not valid YAML"),
])
def test_bad_keys_name_the_key_and_the_file(tmp_path, text, overrides, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert fragment in str(e.value)
    if not overrides:
        assert "run.yaml" in str(e.value)


@pytest.mark.parametrize("text, overrides, line", [
    ("", ["train.epoch=1"], "--set: unknown key 'train.epoch': did you mean 'train.epochs'?"),
    ("partition:\n  max_class_sise: 10\n", [], "unknown key 'partition.max_class_sise': did you mean "
                                                "'partition.max_class_size'?"),
    ("evaluate:\n  n_bootstraps: 10\n", [], "unknown key 'evaluate.n_bootstraps': did you mean "
                                            "'evaluate.n_bootstrap'?"),
    ("", ["scor.tta=flip"], "--set: unknown key 'scor.tta': did you mean 'score.tta'?"),
])
def test_a_misspelt_key_gets_the_nearest_known_key_instead_of_a_list(tmp_path, text, overrides, line):
    """Issue 29: `--set train.epoch=1` answered with a 463-character list of keys and no "did you mean epochs"."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text) if text else None, overrides)
    assert str(e.value).endswith(line) and "known under" not in str(e.value), str(e.value)
    assert len(str(e.value)) < 200


def test_a_key_close_to_nothing_lists_the_known_keys_of_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.zzzz' \(known under train: partition, arch, .*epochs"):
        load_config(None, ["train.zzzz=1"])


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[2] / "configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert cfg.run_id and cfg.data.manifest


def test_a_command_s_flags_are_taken_as_typed_not_re_parsed(tmp_path, capsys):
    """Issue 27: the commands' typed flags were turned back into key=value text and parsed as YAML, so
    `--run-id null` was refused ("key 'run_id' must be str, got None") and `--run-id 2026` became a number. A flag's
    value is the value; --set keeps YAML's reading."""
    from dermray.cli import main
    from dermray.runtime.config import load_config

    assert load_config(None, values={"run_id": "null"}).run_id == "null"
    assert load_config(None, values={"run_id": "2026", "partition.folds": 3}).partition.folds == 3
    with pytest.raises(ConfigError, match="unknown key 'partition.nope'"):
        load_config(None, values={"partition.nope": 1})
    # At the command line: the run id passes, and the command stops at its own first check (no manifest).
    (tmp_path / "t.csv").write_text("")  # it exists: the runner's preflight lets the stage start
    assert main(["partition", "--run-id", "null", "--output", str(tmp_path), "--taxonomy",
                 str(tmp_path / "t.csv")]) == 2
    err = capsys.readouterr().err
    assert "no manifest given" in err and "run_id" not in err, err
