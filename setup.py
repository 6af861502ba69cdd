"""Only the compiled part of the package; everything else is in pyproject.toml.

l4lb/maglev_assign.c is plain C loaded with ctypes (l4lb/maglevc.py); it is built as
an extension module so that pip (editable or not) puts it next to the Python code.
No -ffast-math and no FP contraction: its doubles must round exactly as numpy's do.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("l4lb._maglev_assign", ["l4lb/maglev_assign.c"],
                             extra_compile_args=["-O2", "-std=c11", "-ffp-contract=off", "-fno-fast-math"])])
