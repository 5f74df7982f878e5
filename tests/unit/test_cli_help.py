"""The command line explains itself (issue 29): every command's --help says what it does, every option what it
means, and an option that sets a config key shows that key's default - read from the config, so it cannot drift."""
import argparse
import re

import pytest

from dermray import cli
from dermray.runtime.config import default_value

PARSER = cli.build_parser()
COMMANDS = cli._subparsers(PARSER)


def test_every_command_is_documented():
    names = {name for name, _, _ in COMMANDS}
    assert {"partition", "train", "score", "evaluate", "saliency", "pipeline", "nightly", "lineage", "doctor", "synth",
            "import", "import ham10000", "import isic", "import folder"} <= names


@pytest.mark.parametrize("name, line, parser", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_command_says_what_it_does_and_every_option_what_it_means(name, line, parser):
    assert line and parser.description and parser.description.lower().startswith(line[:20].lower())
    text = parser.format_help()
    assert parser.description.split()[0] in text
    undocumented = [a.option_strings for a in parser._actions
                    if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
                    and not a.help]
    assert not undocumented, f"dermray {name}: options without help: {undocumented}"


@pytest.mark.parametrize("name, line, parser", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_an_option_that_sets_a_config_key_shows_the_keys_default(name, line, parser):
    for action in parser._actions:
        m = re.search(r"config: ([a-z_.]+); default: (.*)\)$", action.help or "")
        if "config: " not in (action.help or "") or "default: RAY_ADDRESS" in action.help:
            continue
        assert m, f"dermray {name} {action.option_strings}: {action.help!r} shows no default"
        value = default_value(m.group(1))
        assert m.group(2) == ("unset" if value in (None, "", []) else repr(value).replace("%", "%%")), action.help


def test_default_value_reads_the_config_s_defaults():
    from dermray.runtime.config import load_config

    cfg = load_config(None)
    assert default_value("train.epochs") == cfg.train.epochs and default_value("run_id") == cfg.run_id
    assert default_value("no.such.key") is None and default_value("train") == cfg.to_dict()["train"]


@pytest.mark.parametrize("typed, meant", [("scroe", "score"), ("partiton", "partition"), ("pipline", "pipeline")])
def test_a_mistyped_command_gets_a_did_you_mean(typed, meant, capsys):
    """Issue 29: argparse answered a mistyped command with the list of every command and no suggestion."""
    with pytest.raises(SystemExit) as e:
        cli.main([typed, "--output", "x"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"unknown command {typed!r}: did you mean {meant!r}?" in err, err


def test_an_option_for_a_config_key_says_what_the_docs_say():
    """Issue 30: an option whose help is only its config key shows that key's Field(description=...), the text of
    docs/configuration.md (generated from the same models), so the two cannot say different things."""
    from dermray.runtime.config import description

    shown = 0
    for *_, parser in COMMANDS:
        for action in parser._actions:
            m = re.search(r"\(config: ([a-z_.]+);", action.help or "")
            if m and (action.help or "").startswith(description(m.group(1)) or "\0"):
                shown += 1
    assert shown >= 10
    help_text = " ".join(dict((n, p) for n, _, p in COMMANDS)["train"].format_help().split())
    assert " ".join(description("train.epochs").split()) in help_text
    assert description("no.such.key") is None and description("train.no_such_key") is None
