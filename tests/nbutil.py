"""Build small stage notebooks for pipeline tests."""
from pathlib import Path

import nbformat

# a configuration file holding only `dataset: synthetic`, for tests that run their own stage notebooks
MINIMAL = str(Path(__file__).parent / "minimal.yaml")


def make_notebook(path: Path, parameters: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    p = nbformat.v4.new_code_cell(parameters)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p] + [nbformat.v4.new_code_cell(c) for c in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path
