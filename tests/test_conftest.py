"""The test suite's own rule for GPU runs: one CUDA illegal memory access skips the later GPU tests, named."""

import os
from pathlib import Path

pytest_plugins = ["pytester"]
REPO = Path(__file__).resolve().parents[1]


def test_gpu_tests_after_an_illegal_memory_access_are_skipped_with_its_name(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport, pytest_runtest_setup\n")
    pytester.makepyfile(
        test_a="""
        import pytest

        @pytest.mark.gpu
        def test_1_kernel_bug():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        def test_2_cpu():
            pass

        @pytest.mark.gpu
        def test_3_next_gpu():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*CUDA context lost in test_a.py::test_1_kernel_bug (illegal memory access)*"])
