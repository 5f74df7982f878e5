"""The ``dermray`` command line. User errors print one line and exit with code 2; no traceback."""
from __future__ import annotations

import argparse
import logging
import sys

from dermray.core.formatting import strict_json
from dermray.errors import UserError
from dermray.runtime.registry import REGISTRY

EXIT_USER_ERROR = 2
EXIT_FLOOR_MISSED = 3  # dermray nightly: the run finished, a quality floor was not met


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (local path or URI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set partition.folds=5 (repeatable; every key, with its "
                   "type, default and meaning: docs/configuration.md)")
    p.add_argument("--run-id", help="(config: run_id)")
    p.add_argument("--output", help="(config: output)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an in-process local Ray)")
    p.add_argument("--json", action="store_true", help="print the stage summary as JSON")


def _flag_values(args: argparse.Namespace, mapping: dict[str, str]) -> dict:
    """The command's flags that were given, as config key -> value as argparse typed it (never re-parsed: a run id
    "null" or "2026" stays that text)."""
    return {key: getattr(args, attr) for attr, key in mapping.items() if getattr(args, attr, None) is not None}


COMMON_FLAGS = {"run_id": "run_id", "output": "output", "address": "ray.address"}


def build_parser() -> argparse.ArgumentParser:
    # long: one declaration per command and flag, read top to bottom like the --help it produces
    from dermray import __version__
    from dermray.store.lineage import git_commit

    commit = git_commit()
    parser = argparse.ArgumentParser(prog="dermray", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"dermray {__version__}" + (f" ({commit})" if commit else ""))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="everything on the console (Ray's own lines too) instead of in the log file")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("partition", help="build training classes and folds from a manifest and a taxonomy")
    _add_config_args(p)
    p.add_argument("--manifest", help="(config: data.manifest)")
    p.add_argument("--taxonomy", help="(config: data.taxonomy)")
    p.add_argument("--tasks", help="(config: data.tasks)")
    p.add_argument("--max-class-size", type=int, help="largest training class, in images: bigger disease nodes "
                   "are split (paper: 1000; config: partition.max_class_size)")
    p.add_argument("--folds", type=int,
                   help="cross-validation folds, lesion-grouped (paper: 9; config: partition.folds)")
    p.add_argument("--seed", type=int, help="(config: partition.seed)")

    p = sub.add_parser("train", help="fine-tune the CNN, one Ray Train TorchTrainer per fold, folds concurrently")
    _add_config_args(p)
    p.add_argument("--manifest", help="manifest Parquet URI (config: data.manifest)")
    p.add_argument("--partition", help="partition outputs (default <output>/partition)")
    p.add_argument("--arch", help="(config: train.arch)")
    p.add_argument("--epochs", type=int, help="(config: train.epochs)")
    p.add_argument("--force", action="store_const", const="true",
                   help="folds whose checkpoints have another lineage are trained afresh (config: train.force)")

    p = sub.add_parser("score", help="score images with trained fold models (Ray Data actor pool) -> predictions")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="fold dir, model.pt or train run dir; comma-separated = ensemble "
                   "(config: score.checkpoints)")
    p.add_argument("--input", help="manifest Parquet, image folder/prefix, or .tar shards (config: score.input)")
    p.add_argument("--labels", help="folder input: labels CSV/Parquet with image_id, label (config: score.labels)")
    p.add_argument("--tasks", help="evaluation tasks YAML for task columns (config: data.tasks)")
    p.add_argument("--taxonomy", help="taxonomy Parquet/CSV for task columns (config: data.taxonomy)")
    p.add_argument("--partition", help="partition outputs with task_membership.parquet (config: score.partition)")
    p.add_argument("--incremental", action="store_const", const="true",
                   help="score only images this model has not scored in this run yet (config: score.incremental)")
    p.add_argument("--tta", help="test-time augmentation: none | flips | dihedral (config: score.tta)")

    p = sub.add_parser("saliency", help="attribution maps (gradient, smoothgrad, integrated gradients, Grad-CAM) "
                       "for chosen images, with sanity checks and a gallery")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="one fold directory or model.pt (config: saliency.checkpoints)")
    p.add_argument("--predictions", help="predictions Parquet from dermray score (config: saliency.predictions)")
    p.add_argument("--method", help="comma-separated: gradient, smoothgrad, integrated_gradients, gradcam "
                   "(config: saliency.methods)")
    p.add_argument("--tasks", help="evaluation tasks YAML (config: data.tasks)")
    p.add_argument("--taxonomy", help="taxonomy Parquet/CSV (config: data.taxonomy)")
    p.add_argument("--masks", help="(config: saliency.masks)")

    p = sub.add_parser("nightly", help="score new images incrementally, evaluate, keep the night's metrics, check "
                       "floors (exit 3 when one is missed)")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="the trained run (fold directories) that scores tonight's images "
                   "(config: score.checkpoints)")
    p.add_argument("--input", help="tonight's archive: manifest, folder or shards (config: score.input)")
    p.add_argument("--date", help="(config: nightly.date)")

    p = sub.add_parser("evaluate", help="ROC/AUC with CIs, rates, confusion, calibration, readers: tables + report")
    _add_config_args(p)
    p.add_argument("--predictions", help="predictions Parquet URI (config: evaluate.predictions)")
    p.add_argument("--tasks", help="evaluation tasks YAML (config: data.tasks)")
    p.add_argument("--taxonomy", help="taxonomy Parquet/CSV (config: data.taxonomy)")
    p.add_argument("--partition", help="partition outputs with task_membership.parquet (default <output>/partition)")
    p.add_argument("--readers", help="readers table: reader_id, image_id, task, decision/score")
    p.add_argument("--compare", help="another run's predictions: DeLong test of the AUC difference")
    p.add_argument("--model-id", help="which model's predictions, when the table holds several")
    p.add_argument("--distributed", action="store_const", const="true",
                   help="AUCs from per-block histograms over Ray Data (inputs larger than memory)")

    p = sub.add_parser("pipeline", help="partition -> train -> score -> evaluate -> saliency, skipping stages "
                       "already done for this run")
    _add_config_args(p)
    p.add_argument("--force", action="store_const", const="true",
                   help="run every stage, whatever its recorded lineage (config: pipeline.force)")

    p = sub.add_parser("lineage", help="the chain behind a run's numbers: manifest -> partition -> models -> "
                       "predictions -> metrics -> saliency, with fingerprints and whether each link holds")
    p.add_argument("--output", required=True, help="the run's output root URI")
    p.add_argument("--run-id", required=True, help="the run id whose chain to show")
    p.add_argument("--json", action="store_true", help="print the chain as JSON")

    p = sub.add_parser("doctor", help="what this environment can do before a long run: Ray, auth, CPUs/GPUs, torch "
                       "threads, bf16, S3 reachable and writable, pretrained weights (one line per check)")
    _add_config_args(p)
    p.add_argument("--s3", help="an s3:// prefix to check for reading and writing (default: the config's output "
                   "when it is on S3)")

    p = sub.add_parser("synth", help="write a synthetic demo dataset (images, manifests, taxonomy, tasks, readers)")
    p.add_argument("--output", required=True, help="folder or s3:// prefix")
    p.add_argument("--lesions", type=int, default=1200, help="training/validation lesions (1-3 images each)")
    p.add_argument("--test-lesions", type=int, default=300, help="held-out lesions")
    p.add_argument("--size", type=int, default=96, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed draws the same study")
    p.add_argument("--json", action="store_true", help="print the study's summary as JSON")

    p = sub.add_parser("import", help="turn public dataset metadata, or a hospital's labelled image folder, into "
                       "manifest, taxonomy and tasks")
    imp = p.add_subparsers(dest="dataset", required=True, metavar="{ham10000,isic,folder}")
    images_help = "folder or s3:// prefix holding <image_id>.jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp (subfolders too)"
    for name, what in (("ham10000", "HAM10000 metadata CSV"), ("isic", "ISIC Archive metadata CSV")):
        q = imp.add_parser(name, help=f"the {what} and its images")
        q.add_argument("--metadata", required=True, help=what)
        q.add_argument("--images", required=True, help=images_help)
        q.add_argument("--output", required=True, help="folder or s3:// prefix for manifest/taxonomy/tasks")
        if name == "isic":
            q.add_argument("--group", default="lesion", choices=["lesion", "patient"], help="group folds by")
        q.add_argument("--json", action="store_true", help="print the import's summary as JSON")
    q = imp.add_parser("folder", help="a folder of images + a labels CSV in the hospital's own label names + a "
                       "mapping of those names onto taxonomy nodes")
    q.add_argument("--images", required=True, help=images_help + "; image_id = file name without extension")
    q.add_argument("--labels", required=True, help="labels CSV: image_id and label columns (+ optional lesion_id/"
                   "patient_id, label_source, modality; other columns are carried into the manifest)")
    q.add_argument("--mapping", required=True, help="CSV with columns label,node or YAML of label: node (node = a "
                   "taxonomy node_id or unique name; empty = excluded); unmapped labels are quarantined")
    q.add_argument("--output", required=True, help="folder or s3:// prefix for manifest/taxonomy/tasks")
    q.add_argument("--taxonomy", help="taxonomy Parquet/CSV (default: the packaged ISIC Archive taxonomy)")
    q.add_argument("--tasks", help="evaluation tasks YAML (default: the packaged HAM10000 tasks, ISIC taxonomy)")
    q.add_argument("--source", help="where the images come from, for the model card (default: the folder's name)")
    q.add_argument("--modality", choices=["clinical", "dermoscopy"], help="for rows without a modality value")
    q.add_argument("--label-source", choices=["biopsy", "clinical"], help="for rows without a label_source value")
    q.add_argument("--id-column", help="labels column of image ids (default: image_id, isic_id, filename, ...)")
    q.add_argument("--label-column", help="labels column of the hospital's labels (default: label, diagnosis, dx)")
    q.add_argument("--group-column", help="labels column grouping images into folds (default: group_id, lesion_id, "
                   "patient_id; none: one image per group)")
    q.add_argument("--json", action="store_true", help="print the import's summary as JSON")
    _document(parser)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(command path, its one-line help, its parser) for every command, nested ones (`import folder`) too."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sp in action.choices.items():
                out.append((name, helps.get(name, ""), sp))
                out += [(f"{name} {n}", h, q) for n, h, q in _subparsers(sp)]
    return out


def _document(parser: argparse.ArgumentParser) -> None:
    """Every command's --help opens with what it does (its line in the command list), and every option that sets a
    config key ("config: <key>" in its help) shows the key's default, read from the config itself so that the
    help cannot drift from it. An option whose help is only "(config: <key>)" says what the key's
    ``Field(description=...)`` says: the text of the docs' configuration reference."""
    from dermray.runtime.config import default_value, description

    for _, line, sp in _subparsers(parser):
        if not sp.description:
            sp.description = line[:1].upper() + line[1:] + "."
        for action in sp._actions:
            text = action.help
            if not text or "default" in text:
                continue
            key = _config_key(text)
            if key is not None and text.startswith("(config: "):
                text = f"{description(key) or key} {text}".replace("%", "%%")
            if key is None:
                if action.default not in (None, False, [], argparse.SUPPRESS):
                    action.help = f"{text} (default: {action.default})"
                continue
            value = default_value(key)
            shown = ("unset" if value in (None, "", []) else repr(value)).replace("%", "%%")
            action.help = f"{text[:-1]}; default: {shown})" if text.endswith(")") else f"{text} (default: {shown})"


def _config_key(help_text: str) -> str | None:
    import re

    m = re.search(r"config: ([a-z_]+(?:\.[a-z_]+)*)", help_text)
    return m.group(1) if m else None


def _run_stage(stage: str, args, flags: dict[str, str]) -> dict:
    """The stage commands' common shape: the config file with --set overrides and the command's flags (``flags``:
    flag name -> config key), the stage module's ``run``, and its summary printed (as JSON with --json); the
    command's log file is kept beside the stage's outputs."""
    import importlib

    from dermray.runtime import console, jobpaths, layout, registry
    from dermray.runtime.config import load_config

    # a stage's module, or an application's (nightly, pipeline)
    module = registry.module(stage) if stage in registry.REGISTRY else importlib.import_module(f"dermray.apps.{stage}")
    cfg = load_config(args.config, list(args.overrides), _flag_values(args, COMMON_FLAGS | flags))
    jobpaths.check_paths(cfg, stage)  # in a Ray job: paths that cannot work
    args.stage_dir = layout.stage_dir(cfg.output, stage, cfg.run_id)
    summary = registry.run(stage, cfg) if stage in registry.REGISTRY else module.run(cfg)
    kept = console.keep_log(args.console, args.stage_dir, stage)
    args.stage_dir = None  # the log is kept
    out = args.console.out
    print(strict_json(summary) if args.json else module.format_summary(summary), file=out)
    if kept and not args.json:
        print(f"  log: {kept}", file=out)
    return summary


def cmd_nightly(args) -> dict:
    return _run_stage("nightly", args, {
        "checkpoint": "score.checkpoints", "input": "score.input", "date": "nightly.date"})


def cmd_pipeline(args) -> dict:
    return _run_stage("pipeline", args, {"force": "pipeline.force"})


def cmd_lineage(args) -> dict:
    from dermray.apps import lineage_report

    c = lineage_report.chain(args.output, args.run_id)
    print(strict_json(c) if args.json else lineage_report.format_chain(c), file=args.console.out)
    return c


def cmd_doctor(args) -> dict:
    from dermray.apps import doctor
    from dermray.runtime.config import load_config

    cfg = load_config(args.config, list(args.overrides), _flag_values(args, COMMON_FLAGS))
    configured = bool(args.config) or any(o.startswith("train.") for o in args.overrides)
    checks = doctor.run(cfg, args.s3, configured)
    print(strict_json(checks) if args.json else doctor.format_checks(checks), file=args.console.out)
    if any(c["status"] == "fail" for c in checks):
        raise UserError(f"{sum(c['status'] == 'fail' for c in checks)} check(s) failed (see above)")
    return {"checks": checks}


def cmd_synth(args) -> dict:
    from dermray.apps import synth

    if args.lesions < 10 or args.test_lesions < 10 or args.size < 32:
        raise UserError("synth: --lesions and --test-lesions must be at least 10 and --size at least 32")
    summary = synth.write(args.output, synth.SynthSpec(n_lesions=args.lesions, n_test_lesions=args.test_lesions,
                                                       size=args.size, seed=args.seed))
    if args.json:
        print(strict_json(summary), file=args.console.out)
    else:
        # Within 120 columns with the demo's output folder (issue 29); --json has every count.
        print(f"synth: {summary['images']:,} images of {summary['lesions']:,} lesions ({summary['train_images']:,} to "
              f"train, {summary['test_images']:,} held out), {summary['readers']} readers: {args.output}",
              file=args.console.out)
    return summary


def cmd_import(args) -> dict:
    from dermray.apps import importers

    if args.dataset == "folder":
        result = importers.import_folder(
            args.images, args.labels, args.mapping, taxonomy=args.taxonomy, tasks=args.tasks, source=args.source,
            modality=args.modality, label_source=args.label_source, id_column=args.id_column,
            label_column=args.label_column, group_column=args.group_column)
    elif args.dataset == "ham10000":
        result = importers.import_ham10000(args.metadata, args.images)
    else:
        result = importers.import_isic(args.metadata, args.images, args.group)
    summary = importers.write_import(result, args.output)
    out = args.console.out
    if args.json:
        print(strict_json(summary), file=out)
        return summary
    line = (f"import {args.dataset}: {summary['rows_in']} rows = {summary['manifest_rows']} in the manifest + "
            f"{summary['quarantined']} quarantined")
    if args.dataset == "folder":
        line += (f" (rows: {summary['images_found']} image files + {summary['labels_rows_unused']} labels rows "
                 "that label no image file)")
    print(line, file=out)
    for reason, n in list(summary["quarantine_reasons"].items())[:10]:  # the commonest, so a mapping can be fixed
        print(f"  quarantined {n}: {reason}", file=out)
    print(f"  outputs: {args.output}", file=out)
    return summary


def _stage_command(stage: str):
    """The command of a stage: its flags (StageSpec.flags) onto the config, then ``_run_stage``."""
    return lambda args: _run_stage(stage, args, REGISTRY[stage].flags)


COMMANDS = {**{stage: _stage_command(stage) for stage in REGISTRY},
            "nightly": cmd_nightly, "pipeline": cmd_pipeline, "lineage": cmd_lineage, "doctor": cmd_doctor,
            "synth": cmd_synth, "import": cmd_import}


def main(argv: list[str] | None = None) -> int:
    from dermray.runtime import console

    parser = build_parser()
    _check_command(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    with console.session(args.command, args.verbose) as con:
        args.console, args.stage_dir = con, None
        return _dispatch(args, con)


def _check_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An unknown command is answered with the closest one ("did you mean"), not argparse's list of every command."""
    import difflib

    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None or first in COMMANDS:
        return
    close = difflib.get_close_matches(first, list(COMMANDS), n=1, cutoff=0.6)
    parser.error(f"unknown command {first!r}: " + (f"did you mean {close[0]!r}?" if close else
                                                   f"the commands are {', '.join(sorted(COMMANDS))}"))


def _dispatch(args, con) -> int:
    """Run the command; every way it can end is one line on the console (the details are in the log file)."""
    import traceback

    from dermray.apps.nightly import FloorMissed
    from dermray.runtime import console

    try:
        COMMANDS[args.command](args)
    except FloorMissed as e:
        print(f"dermray {args.command}: floor missed: {e}", file=con.err)
        return EXIT_FLOOR_MISSED
    except UserError as e:
        print(f"dermray {args.command}: error: {e}", file=con.err)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"dermray {args.command}: interrupted", file=con.err)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or an infrastructure failure: the traceback goes to the log
        logging.getLogger("dermray.cli").debug("%s", traceback.format_exc())
        if con.log_path:
            traceback.print_exc()  # into the log file (stderr is redirected there)
            where = console.keep_log(con, args.stage_dir, args.command) or con.log_path
            print(f"dermray {args.command}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  f" (the traceback is in {where})", file=con.err)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
