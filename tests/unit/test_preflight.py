"""What a run needs is checked before Ray starts or any work is done (issue 29: a missing output bucket was found
after 83 s of partition work, a missing manifest in `dermray pipeline` after Ray had started, a readers file that
does not exist only after training). In the unit tier a start of Ray fails the test, so each case below proves that
the check came first."""
import time

import pytest

from dermray.cli import main
from dermray.errors import UserError
from dermray.runtime import registry
from dermray.runtime.config import load_config


def one_line_error(capsys, argv) -> str:
    t0 = time.time()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and time.time() - t0 < 10, err
    return err


def test_partition_names_a_missing_manifest_before_any_work(tmp_path, capsys):
    err = one_line_error(capsys, ["partition", "--manifest", str(tmp_path / "nope.parquet"), "--output",
                                  str(tmp_path / "out")])
    assert f"data.manifest {tmp_path / 'nope.parquet'}: no such file or object" in err
    assert not (tmp_path / "out").exists()


def test_the_pipeline_checks_every_stage_s_inputs_before_ray(tmp_path, capsys):
    manifest = tmp_path / "m.parquet"
    manifest.write_bytes(b"not checked here: it exists")
    err = one_line_error(capsys, ["pipeline", "--set", f"data.manifest={manifest}", "--set",
                                  f"evaluate.readers={tmp_path / 'readers.parquet'}", "--set",
                                  f"pipeline.test_manifest={manifest}", "--output", str(tmp_path / "out")])
    # train is the first stage that reads it (it locks the readers' operating point)
    assert f"train: evaluate.readers {tmp_path / 'readers.parquet'}: no such file or object" in err
    err = one_line_error(capsys, ["pipeline", "--set", f"data.manifest={manifest}", "--set",
                                  f"pipeline.test_manifest={tmp_path / 'test.parquet'}", "--output",
                                  str(tmp_path / "out")])
    assert f"pipeline.test_manifest {tmp_path / 'test.parquet'}: no such file or object" in err


def test_every_element_of_a_list_input_is_checked_and_patterns_and_weight_names_are_not(tmp_path):
    fold = tmp_path / "fold=0"
    fold.mkdir()
    cfg = load_config(None, [f"score.checkpoints=[{fold}, {tmp_path / 'fold=1'}]", "score.input=x.parquet"])
    with pytest.raises(UserError, match=r"score.checkpoints .*fold=1: no such file or object"):
        registry.preflight("score", cfg)
    registry.preflight("saliency", load_config(None, [f"saliency.masks={tmp_path}/masks/{{image_id}}.png"]))
    registry.preflight("train", load_config(None, ["train.weights=imagenet"]))
    with pytest.raises(UserError, match="train.weights"):
        registry.preflight("train", load_config(None, [f"train.weights={tmp_path / 'w.pt'}"]))
