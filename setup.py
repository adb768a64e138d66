from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="mdistiller",
    version="0.1.0",
    description="Config-driven knowledge-distillation benchmark: KD, DKD, CRD, ReviewKD, KD++ and the DOT trainer",
    packages=find_packages(include=["mdistiller", "mdistiller.*"]),
    package_data={"mdistiller": ["reference/*.csv"]},  # the published numbers tools/reproduce.py compares with
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=requirements,
    extras_require={"test": ["pytest>=7"]},
)
