"""The users' note's spelling of ``scripts/create_comparison_grid.py`` (``python utils/create_comparison_grid.py ...``).

The tool itself is a script; its grid function is :func:`utils.images.create_comparison_grid`. This file only keeps
the note's command line working.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "create_comparison_grid.py"), run_name="__main__")
else:
    from utils.images import create_comparison_grid  # noqa: F401 (the function under its old module path)
