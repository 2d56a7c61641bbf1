"""sympy (which onnx-ir imports for symbolic shapes) loads only when used, and then works."""

from __future__ import annotations

import subprocess
import sys


def test_importing_ptqconv_does_not_load_sympy_until_it_is_used():
    code = (
        "import sys, ptqconv.cli, ptqconv.conversion, onnx_ir as ir\n"
        "loaded = lambda: any(m.startswith('sympy.') for m in sys.modules)\n"
        "assert not loaded(), 'sympy loaded at import'\n"
        "d = ir.SymbolicDim('max(N, 3)') \n"
        "assert str(d._expr) == 'Max(3, N)' and str((ir.SymbolicDim('N') * 2)._expr) == '2*N'\n"
        "assert loaded()\n"
        "import sympy\n"
        "assert sympy.Symbol('x') + 1 - 1 == sympy.Symbol('x')\n"
        "from sympy.core import Add; assert Add is sympy.Add\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_a_module_already_imported_or_missing_is_left_alone():
    from ptqconv.lazy import defer

    assert defer("json") is False  # imported by now: left as it is
    assert defer("no_such_module_for_ptqconv") is False
    assert "no_such_module_for_ptqconv" not in sys.modules
    assert defer("onnx_ir.nothing_here", "onnx_ir") is False
