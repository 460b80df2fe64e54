"""Test-session hooks: say at the end of the run how many PyTorch parity tests were skipped.

torch is an optional extra (not in `[test]`), so without it the parity tests skip; pytest's own
summary only counts skips, and a developer would not know what was left unchecked."""

from __future__ import annotations

import re

# importorskip's reasons: "could not import 'torch': ..." and, for modules that need torch,
# "could not import 'tests.torch_reference': No module named 'torch'".
_TORCH_MISSING = re.compile(r"could not import 'torch'|No module named 'torch'|"
                            r"import of torch halted")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or '')


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    del exitstatus, config
    skipped = [r for r in terminalreporter.stats.get('skipped', [])
               if _TORCH_MISSING.search(_skip_reason(r))]
    if not skipped:
        return
    files = sorted({r.nodeid.split('::')[0] for r in skipped if r.when == 'collect'})
    tests = [r for r in skipped if r.when != 'collect']
    parts = ([f'{len(files)} test file(s) ({", ".join(files)})'] if files else []) + (
        [f'{len(tests)} test(s)'] if tests else [])
    terminalreporter.write_line(
        f'PyTorch parity checks not run: {" and ".join(parts)} skipped because torch is not '
        "installed; pip install -e '.[torch]' runs them (README: torch's CPU build).",
        yellow=True)
