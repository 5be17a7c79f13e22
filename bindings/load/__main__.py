"""``python -m interlink.load SCENARIO [options]``: the same command as ``interlink load``."""

from interlink.cli import load

load(prog_name="python -m interlink.load")
