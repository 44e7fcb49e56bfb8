"""The plugin through pytester: how a variant's out-of-memory ends its tests and no other variant's."""

from __future__ import annotations

from fixtures.user_runs import quick_profile

# A test body that runs out of memory for r8 only, as a latency round or a batched generate can.
OOM_IN_A_TEST_BODY = """
import torch

def test_generates(variant_name):
    if variant_name == "r8":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")

def test_after(variant_name):
    pass
"""


def test_oom_in_a_test_body_ends_that_variant_with_one_message_and_no_other(pytester, tmp_path):
    """The OOM fails r8's test with variant, phase, ceiling and memory (no traceback), r8's later test fails with
    the same message instead of running on a half-dead model, and every other variant passes."""
    profile = quick_profile(tmp_path / "p", {"vram_ceilings_gib": {"inference": {"r8": 3.0}}})
    pytester.makepyfile(test_oom=OOM_IN_A_TEST_BODY)
    result = pytester.runpytest("--profile", str(profile), "--runs-dir", str(tmp_path / "runs"),
                                "--card", str(tmp_path / "MODEL_CARD.md"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=1, errors=1)
    output = result.stdout.str()
    message = ("r8: out of memory during inference (CUDA out of memory. Tried to allocate 1.00 GiB (injected)); "
               "memory at failure: ")
    result.stdout.fnmatch_lines(["*ERROR at setup of test_after[[]r8[]]*", f"{message}*",
                                 "*test_generates[[]r8[]]*", f"{message}*"])  # each section: the message alone
    assert output.count("vram_ceilings_gib.inference.r8 = 3.0 GiB") >= 2 and "Traceback" not in output
    assert not (tmp_path / "runs" / "tiny" / "results.json").exists() and not (tmp_path / "MODEL_CARD.md").exists()


def test_latency_runs_below_one_is_a_usage_error(pytester):
    result = pytester.runpytest("--latency-runs", "0")
    errors = [line for line in result.errlines if line.strip()]
    assert result.ret == 4 and errors == ["ERROR: --latency-runs 0: give at least 1 timed round"], errors
