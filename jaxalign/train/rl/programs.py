"""The RL driver's compile cache: one executable per program and argument shapes, shared by
the memory analysis, the run and every run in the same process (resumes, tests), and by the
update's programs at each prompt / response bucket (`groups.buckets`)."""

from __future__ import annotations

import collections

import jax

_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None))
                          for x in leaves)


def compiled(key, make_jitted, *abstract_args):
    """`make_jitted().lower(*abstract_args).compile()`, cached on (key, the arguments' shapes,
    dtypes and shardings). One executable serves both the memory analysis and the run, and
    runs in one process (resumes, tests) compile each program once. `key` must hold every
    static input of the traced function."""
    sig = (key, _signature(abstract_args))
    if sig not in _EXECUTABLES:
        _EXECUTABLES[sig] = make_jitted().lower(*abstract_args).compile()
        while len(_EXECUTABLES) > 32:   # a few prompt / response buckets per program
            _EXECUTABLES.popitem(last=False)
    return _EXECUTABLES[sig]
