"""Build the `nextn` package from engine/ and its Cython extensions from pyx/."""

import glob
import os

import numpy

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

packages = ["nextn"] + ["nextn." + p for p in find_packages("engine")]

# Each pyx/_name.pyx becomes nextn._name, linked against the OpenCL ICD loader.
extensions = [
    Extension(
        "nextn." + os.path.splitext(os.path.basename(path))[0],
        [path],
        libraries=["OpenCL"],
        include_dirs=[numpy.get_include()],
        define_macros=[("CL_TARGET_OPENCL_VERSION", "120"), ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O2"],
    )
    for path in sorted(glob.glob("pyx/*.pyx"))
]

setup(
    packages=packages,
    package_dir={"nextn": "engine"},
    package_data={"nextn": ["kernels/*.cl", "kernels/*.h", "*.pyi", "data/*", "devtools/data/*"]},
    ext_modules=cythonize(extensions, language_level=3, include_path=["pyx"]),
)
