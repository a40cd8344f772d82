"""Packaging for the engagement pipeline; Dataflow workers install it from this file (--setup_file)."""

from pathlib import Path

import setuptools

HERE = Path(__file__).resolve().parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="engagement-pipeline",
    version="0.1.0",
    description="Real-time and historical engagement analytics for content platforms, on Apache Beam.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.13",
    packages=setuptools.find_packages(include=["pipelines", "pipelines.*", "transforms", "transforms.*"]),
    package_data={"": ["*.sql"]},
    install_requires=_requirements(),
)
