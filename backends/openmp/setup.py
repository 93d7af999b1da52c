"""Build of ``tconv_openmp._kernels`` with the compiler's OpenMP flags.

The flags are probed: a compiler without OpenMP support still builds the
extension (its ``prange`` loops then run serially), and the backend then
reports itself unavailable with that reason instead of failing to install.
``TCONV_OPENMP=0`` builds without OpenMP on purpose (to test that path).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup

# (compile flags, link flags) to try, in order: GCC/Clang on Linux, Apple
# Clang with libomp, MSVC.
CANDIDATES = [
    (["-fopenmp"], ["-fopenmp"]),
    (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),
    (["/openmp"], []),
]

PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
}
"""


def openmp_flags():
    """The first flag set that compiles and links an OpenMP program, or None."""
    if os.environ.get("TCONV_OPENMP", "1") == "0":
        return None
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = compiler.split()
    if shutil.which(compiler[0]) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as handle:
            handle.write(PROBE)
        for compile_flags, link_flags in CANDIDATES:
            command = compiler + compile_flags + [source, "-o", os.path.join(tmp, "probe")] + link_flags
            try:
                result = subprocess.run(command, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                continue
            if result.returncode == 0:
                return compile_flags, link_flags
    return None


flags = openmp_flags()
compile_args, link_args = ["-O3"], []
if flags is None:
    print("tconv-openmp: no OpenMP support found; building serial kernels "
          "(the backend will report itself unavailable)", file=sys.stderr)
else:
    compile_args += flags[0]
    link_args += flags[1]

extensions = [
    Extension(
        "tconv_openmp._kernels",
        ["tconv_openmp/_kernels.pyx"],
        include_dirs=["tconv_openmp"],  # _simd.h
        depends=["tconv_openmp/_simd.h"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}))
