from setuptools import find_packages, setup

setup(
    name="galdecomp",
    version="0.1.0",
    description="Unsupervised Bayesian decomposition of the multi-frequency sky with probabilistic autoencoders",
    packages=find_packages(include=["galdecomp", "galdecomp.*"]),
    python_requires=">=3.10",
    install_requires=[
        "nifty8>=8.5",
        "ducc0",
        "numpy>=1.24",
        "scipy>=1.10",
        "healpy>=1.16",
        "matplotlib>=3.6",
        "pyyaml>=6",
        "scikit-learn>=1.3",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1", "mpich"],
        "test": ["pytest>=7", "sphinx>=7", "myst-parser>=2"],
        "docs": ["sphinx>=7", "myst-parser>=2"],
        "bench": ["torch==2.13.0"],
    },
    entry_points={"console_scripts": ["galdecomp=galdecomp.cli:main"]},
    include_package_data=True,
)
