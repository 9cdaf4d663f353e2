"""Every command's --help as a user reads it: one way of writing defaults, each default the one the command
uses, dpo's batch counted in pairs, and the names --lora-targets and --columns list are the names the
registry and the data reader take."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from microft import options
from microft.cli import app
from microft.config import RunConfig
from microft.data.instruct import ALIASES, map_columns
from microft.models.config import parse_lora_targets
from microft.models.families import FAMILIES

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def shown(command: str) -> str:
    """`microft COMMAND --help` as printed on a wide terminal, the box and the wrapping taken out."""
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    return re.sub(r"[\s│╭╮╰╯─]+", " ", res.output)


def param_help(command: str, flag: str) -> str:
    return next(p.help for p in COMMANDS[command].params if flag in p.opts)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_default_is_written_one_way(command):
    text = shown(command)
    assert "[default" not in text  # typer's own marker is off: the help says the default itself
    assert not re.search(r"\(default(?!: )", text), re.findall(r"\(default[^)]*\)", text)
    assert " (default)" not in text


RUN_OPTIONS = {"pretrain": options.PRETRAIN, "finetune": options.FINETUNE, "dpo": options.DPO,
               "estimate-mem": options.ESTIMATE}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_stated_default_is_the_one_the_command_uses(command):
    """A flag with a default of its own (generate's --temperature) or a run option with a RunConfig default
    (the flag itself defaults to None, 'not given') says that value in its help."""
    fields, run_options = RunConfig.model_fields, RUN_OPTIONS.get(command, ())
    checked = 0
    for p in COMMANDS[command].params:
        if not isinstance(p, typer.core.TyperOption) or p.name == "help":
            continue
        default = p.default
        field = fields.get("max_seq_len" if p.name == "seq_len" else p.name)  # --recipe is no field
        if p.name in run_options and field is not None:
            default = field.get_default(call_default_factory=True)
        if default in (None, []) or (default is False and not p.secondary_opts):
            continue  # not given, or a plain switch: the help says what happens then in its own words
        assert f"(default: {options.shown_default(default)}" in p.help, (p.name, p.help)
        checked += 1
    assert checked or command == "merge", command


def test_defaults_are_shown_plainly():
    assert [options.shown_default(v) for v in (3e-4, 1e-8, 16.0, 0.0, True, False, "auto", 20)] == [
        "0.0003", "1e-8", "16", "0", "on", "off", "auto", "20"]
    assert options.with_default("Peak learning rate.", "0.0003") == "Peak learning rate (default: 0.0003)."


def test_dpo_counts_its_batch_in_pairs_and_finetune_in_samples():
    for flag in ("--micro-bs", "--global-bs"):
        assert param_help("dpo", flag).startswith("Pairs per"), flag
        assert param_help("finetune", flag).startswith("Samples per"), flag
        assert param_help("pretrain", flag).startswith("Samples per"), flag
        assert param_help("estimate-mem", flag).startswith("Samples (--method dpo: pairs) per"), flag
    assert "2N sequences" in param_help("dpo", "--micro-bs")
    assert "pairs" not in shown("finetune")
    # the rest of the shared wording stays shared: one text, one unit word apart
    dpo_words = param_help("dpo", "--global-bs").replace("Pairs", "Samples")
    assert dpo_words == param_help("finetune", "--global-bs")


def _targets_in_help() -> list[tuple[list[str], set[str]]]:
    """--lora-targets' help read back: each list of names and the families it says take them."""
    text = param_help("finetune", "--lora-targets")
    listed = text.split("adapt: ", 1)[1].split(". ", 1)[0]
    parts = []
    for part in listed.split("; "):
        names, who = re.fullmatch(r"(.+) \((.+)\)", part).groups()
        if who == "every family":
            fams = set(FAMILIES)
        elif who.startswith("every family but "):
            fams = set(FAMILIES) - set(who.removeprefix("every family but ").split(", "))
        else:
            fams = set(who.split(", "))
        parts.append((names.split(", "), fams))
    return parts


def test_lora_targets_help_says_which_families_take_each_name():
    parts = _targets_in_help()
    listed = [n for names, _ in parts for n in names]
    every = {n for f in FAMILIES.values() for n in (*f.lora_targets, *f.lora_groups)}
    assert sorted(listed) == sorted(every)  # each registry name once
    assert {"q_proj", "down_proj", "qkv", "mlp_proj", "all"} <= every
    for names, fams in parts:
        for model_type in FAMILIES:
            for name in names:
                if model_type in fams:
                    assert parse_lora_targets(name, model_type), (name, model_type)
                else:
                    with pytest.raises(Exception, match="unknown LoRA target"):
                        parse_lora_targets(name, model_type)
    assert "(default: qkv,proj)." in param_help("finetune", "--lora-targets")


def test_the_aliases_the_help_names_are_the_ones_the_reader_takes():
    said = options.aliases_help()
    assert said in shown("finetune")  # the description
    assert said in param_help("finetune", "--columns")
    clauses = re.findall(r"(.+?) as the (\w+)(?:, |$)", said)
    assert {field for _, field in clauses} == set(ALIASES)
    for keys, field in clauses:
        names = re.split(r", | or ", keys)
        assert tuple(names) == ALIASES[field], (field, names)
        for key in names:  # a record of that key alone is read as the field
            mapped, renamed = map_columns({key: "x"})
            assert mapped[field] == "x" and renamed[field] == key


def test_descriptions_keep_their_paragraphs_whole():
    """A help string's line break is a line break in --help: a paragraph is one string with none inside."""
    for command in ("finetune", "dpo", "download", "estimate-mem", "generate", "merge"):
        for paragraph in (COMMANDS[command].help or "").split("\n\n"):
            assert "\n" not in paragraph, (command, paragraph)


def test_a_dry_run_of_auto_points_to_the_estimate_of_its_own_step():
    said = {}
    for command in ("finetune", "dpo"):
        res = runner.invoke(app, [command, "--dry-run", "--micro-bs", "auto"])
        assert res.exit_code == 0, res.output
        said[command] = res.output.splitlines()[-1]
    assert "estimate-mem --method dpo --micro-bs auto --gpu-mem X" in said["dpo"]
    assert "estimate-mem --micro-bs auto --gpu-mem X" in said["finetune"]
