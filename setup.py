"""Build of the core distribution's Cython extension.

``TCONV_SANITIZE=address`` builds it with AddressSanitizer (see README,
"Guarantees"); ``TCONV_DEBUG=1`` builds without optimisation, for a debugger.
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

compile_args = ["-O3"]
link_args = []
# Bounds checks are switched off per function in the .pyx, where the indices
# were validated in Python before; nothing is switched off globally.
directives = {"language_level": 3}

if os.environ.get("TCONV_DEBUG"):
    compile_args = ["-O0", "-g"]
if os.environ.get("TCONV_SANITIZE") == "address":
    compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    link_args += ["-fsanitize=address"]

extensions = [
    Extension(
        "tconv._blas_core",
        # the AVX-512 GEMM kernels in a C unit of their own (see tconv/_small_gemm.h)
        ["tconv/_blas_core.pyx", "tconv/_small_gemm.c"],
        # NumPy's C API (ScatterCall reads arrays through it), tconv/_simd.h, tconv/_small_gemm.h
        include_dirs=[numpy.get_include(), "tconv"],
        depends=["tconv/_simd.h", "tconv/_small_gemm.h"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
