"""Packaging beyond what pyproject.toml can say: the stage notebooks ship inside the package.

``notebooks/`` stays the one copy (JupyterLab, nbval and the tests use it where it is, with the
repository's ``reports/`` next to it); the package-dir mapping installs it as ``workbench/notebooks``,
where ``workbench.config.notebooks_dir`` finds it with importlib.resources.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["workbench", "workbench.*"]) + ["workbench.notebooks"],
    package_dir={"workbench.notebooks": "notebooks"},
)
