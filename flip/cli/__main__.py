"""``python -m flip.cli train|eval [overrides]``: Hydra reads the overrides from sys.argv."""

import importlib
import sys

COMMANDS = ("train", "eval")

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    raise SystemExit(f"usage: python -m flip.cli {{{','.join(COMMANDS)}}} [overrides]")
command = sys.argv.pop(1)
sys.argv[0] = f"flip-{command}"
importlib.import_module(f"flip.cli.{command}").main()
