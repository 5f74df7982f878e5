"""The stage registry and the runner's config views: a stage reads only the config it declared."""
import importlib
import pickle

import pytest

from dermray.errors import UserError
from dermray.runtime import config, layout, registry
from dermray.runtime.config import load_config


def test_the_stage_list_exists_once():
    """The config's stage names, layout's folders and summaries, the pipeline's order and the CLI's commands are
    the registry's."""
    from dermray import cli
    from dermray.runtime import jobpaths

    assert config.STAGE_NAMES is registry.STAGES
    for name, spec in registry.REGISTRY.items():
        assert spec.module.STAGE == name
        assert layout.STAGE_FOLDERS[name] == spec.folder and layout.SUMMARY_FILES[name] == spec.summary_file
        assert jobpaths.STAGE_INPUTS[name] == spec.inputs
        assert name in cli.COMMANDS
    assert set(registry.REGISTRY) <= set(cli.build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("stage, plant, read, named", [
    # (a stage package's step is planted where its run looks it up: evaluate's run is in evaluate.stage)
    ("evaluate", "stage.read_definitions", "train.lr", "train"),  # a section it does not declare
    # an input it does not declare: every file a stage reads is named by a config key (or by a declared input's
    # content: the partition a model card names), so an undeclared file is an undeclared key
    ("evaluate", "stage.read_definitions", "pipeline.test_manifest", "pipeline"),
    ("train", "stage.plan", "evaluate.n_bootstrap", "evaluate.n_bootstrap"),  # a key of a section it declares keys of
    ("partition", "stage.read_inputs", "data.tasks", None),  # declared: no error of the view (the missing file's)
])
def test_a_read_of_config_a_stage_did_not_declare_fails(stage, plant, read, named, monkeypatch, tmp_path):
    """A read planted in a stage fails loudly through the runner, naming what was read - before the read's value
    could reach an output that its lineage does not cover. (The inputs exist, empty, so that the runner's
    preflight lets the stage start.)"""
    module = registry.module(stage)
    if "." in plant:
        where, plant = plant.split(".")
        module = importlib.import_module(f"{module.__name__}.{where}")
    original = getattr(module, plant)

    def planted(cfg, *args, **kwargs):
        value = cfg
        for name in read.split("."):
            value = getattr(value, name)
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(module, plant, planted)
    for name in ("p", "m.parquet", "t.csv"):
        (tmp_path / name).write_bytes(b"")
    cfg = load_config(None, [f"evaluate.predictions={tmp_path / 'p'}", f"data.manifest={tmp_path / 'm.parquet'}",
                             f"data.taxonomy={tmp_path / 't.csv'}", f"output={tmp_path / 'out'}"])
    if named is None:
        with pytest.raises(UserError):
            registry.run(stage, cfg)
        return
    with pytest.raises(registry.UndeclaredConfigRead, match=rf"^stage '{stage}' read {named}, which its StageSpec"):
        registry.run(stage, cfg)


def test_a_view_hands_declared_sections_whole_and_survives_pickling():
    cfg = load_config(None, ["evaluate.target_sensitivity=0.8", "train.epochs=3"])
    view = registry.view(cfg, "train")
    assert view.train is cfg.train and view.run_id == cfg.run_id
    assert view.evaluate.target_sensitivity == 0.8
    with pytest.raises(registry.UndeclaredConfigRead, match="it lists of evaluate: readers, target_sensitivity"):
        _ = view.evaluate.n_bootstrap
    with pytest.raises(registry.UndeclaredConfigRead):
        _ = view.saliency
    again = pickle.loads(pickle.dumps(view))
    assert again.evaluate.target_sensitivity == 0.8 and registry.unwrap(again) == cfg
    with pytest.raises(registry.UndeclaredConfigRead):
        _ = again.score.batch_size  # train declares score.tta alone
    with pytest.raises(AttributeError):
        view.train = None
