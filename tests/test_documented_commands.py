"""Every documented ``python train.py …``/``python eval.py …`` command that sets
``data.shards`` (conf/ comments, README.md, docs/*.md) runs as written: split as bash splits
it (``shlex``: quotes removed, nothing brace-expanded inside quotes), its ``-m`` sweeps
expanded as Hydra's basic sweeper does, and each job composed with Hydra's compose API
(no run). The shards value that reaches the config is the one the page shows. An unquoted
pattern fails here as it fails for a user: Hydra's grammar rejects a bare ``{`` (and a
pattern quoted for bash alone reaches Hydra bare), as it rejects a non-ASCII ``…``."""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SOURCES = [*sorted(CONF.rglob("*.yaml")), ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python (train|eval)\.py\b[^`]*")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) of each documented command line with a ``data.shards=`` override:
    shell continuations joined, the command up to a closing backtick (tables, prose)."""
    found = []
    for path in SOURCES:
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())  # "\" continuations
        for n, line in enumerate(text.splitlines(), 1):
            for m in COMMAND.finditer(line):
                if "data.shards=" in m.group(0):
                    found.append((f"{path.relative_to(ROOT)}:{n}", m.group(0)))
    return found


COMMANDS = documented_commands()


def test_the_documented_commands_are_found():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"conf/data/laion.yaml", "README.md", "docs/data.md", "docs/scaling.md"} <= where
    assert sum(w.startswith("conf/experiment/") for w in where) >= 30
    assert any("{00000..41407}" in c for _, c in COMMANDS)


def shell_value(word: str) -> str:
    """The value Hydra receives for ``key=value`` after bash removed its quotes: the
    literal text, with Hydra's own quotes (``"…"``, ``'…'``) still around it if any."""
    value = word.split("=", 1)[1]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_shard_command_composes_with_its_shards_intact(where, command):
    argv = shlex.split(command, comments=True)
    assert argv[:2] in (["python", "train.py"], ["python", "eval.py"]), where
    config_name = argv[1].removesuffix(".py")
    args = [a for a in argv[2:] if a not in ("-m", "--multirun", "…")]
    (shards_arg,) = [a for a in args if a.startswith("data.shards=")]
    expected = shell_value(shards_arg)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(args)
        (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        for job in jobs:
            cfg = compose(config_name, overrides=[*job, "output_dir=/tmp/flip-doc-test"])
            assert cfg.data.shards == expected, where
