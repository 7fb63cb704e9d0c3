"""Build configuration that pyproject.toml cannot express: the repository's configs/ and jobs/ ship
inside the package as mpigls/_recipes and mpigls/_jobs (one source: the files of the repository are
the files packaged; mpigls.recipes finds them in either place). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import find_namespace_packages, setup

SHIPPED = {"mpigls._recipes": "configs", "mpigls._jobs": "jobs"}  # package -> repository folder


def data_packages() -> list[str]:
    """The shipped folders and their subfolders (configs/paper -> mpigls._recipes.paper) as packages."""
    found = []
    for package, folder in SHIPPED.items():
        subs = sorted(d for d in Path(folder).rglob("*") if d.is_dir() and not d.name.startswith((".", "_")))
        found += [package] + [".".join((package, *d.relative_to(folder).parts)) for d in subs]
    return found


setup(
    packages=find_namespace_packages(include=["mpigls", "mpigls.*"], exclude=["*.__pycache__"]) + data_packages(),
    package_dir=SHIPPED,
    package_data={package: ["*.yaml", "*.sh", "*.sbatch"] for package in data_packages()},
)
