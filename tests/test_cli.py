"""python -m mxfp8_compat: the report, its JSON, and its exit status."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from mxfp8_compat.cli import main


def test_json_report_has_the_documented_keys(no_torchao):
    out = io.StringIO()
    status = main(["--json", "--device", "cpu"], stdout=out)
    report = json.loads(out.getvalue())
    for key in ("torch_version", "torchao_version", "device", "capability", "generation", "modes"):
        assert key in report
    assert set(report["modes"]) == {"auto", "native", "emulated", "off"}
    for entry in report["modes"].values():
        assert {"backend", "reasons", "smoke_sqnr_db"} <= set(entry)
    assert report["modes"]["emulated"]["smoke_sqnr_db"] >= 27
    assert report["modes"]["native"]["backend"] is None
    assert status == 0


def test_exit_status_follows_the_requested_mode(no_torchao):
    assert main(["--mode", "native", "--device", "cpu"], stdout=io.StringIO()) == 1
    assert main(["--mode", "emulated", "--device", "cpu"], stdout=io.StringIO()) == 0


def test_text_report_has_no_colour_codes_off_a_terminal(no_torchao):
    out = io.StringIO()
    main(["--device", "cpu"], stdout=out)
    text = out.getvalue()
    assert "\033[" not in text
    assert "verdict:" in text and "emulated" in text


def test_module_entry_point_runs_in_a_fresh_process():
    result = subprocess.run(
        [sys.executable, "-m", "mxfp8_compat", "--json", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["device"] == "cpu"


def test_bad_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--device", "nonsense"])
    assert info.value.code == 2
    assert "device" in capsys.readouterr().err


@pytest.mark.parametrize("colour", [False, True])
def test_mode_lines_keep_their_columns(no_torchao, colour):
    """Every mode line's 'smoke' column starts at the same place, emulated labels and colours included."""
    import re

    from mxfp8_compat.cli import format_report
    from mxfp8_compat.cli import environment_report

    report = environment_report("cpu")
    report["modes"]["emulated"]["emulation"] = "reference"  # the longest label there is
    text = re.sub(r"\033\[[0-9;]*m", "", format_report(report, colour=colour))
    mode_lines = [line for line in text.splitlines() if " -> " in line]
    assert len(mode_lines) == 4
    assert len({line.index("smoke") for line in mode_lines}) == 1, "\n".join(mode_lines)
    assert len({line.index("->") for line in mode_lines}) == 1


_NO_TORCH_HELP = """
import sys
sys.argv = [sys.argv[1], "--help"]
from mxfp8_compat.cli import main
try:
    main()
except SystemExit as done:
    assert done.code == 0, done.code
assert "torch" not in sys.modules, "--help imported torch"
"""


@pytest.mark.parametrize("argv0, shown", [("/venv/bin/mxfp8-compat", "mxfp8-compat"),
                                          ("/x/site-packages/mxfp8_compat/__main__.py", "python -m mxfp8_compat")])
def test_help_names_the_command_used_and_imports_no_torch(argv0, shown):
    done = subprocess.run([sys.executable, "-c", _NO_TORCH_HELP, argv0], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {shown} "), done.stdout[:200]
    for option in ("--mode", "--device", "--json", "--validate", "exit status", "mxfp8-compat"):
        assert option in done.stdout, option


def test_python_m_help_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-m", "mxfp8_compat", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m mxfp8_compat "), done.stdout[:200]


def test_the_console_script_where_installed():
    import shutil

    script = shutil.which("mxfp8-compat")
    if script is None:
        pytest.skip("mxfp8-compat is not on PATH (the package is not installed here; tox envs install it)")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: mxfp8-compat "), done.stdout[:200]


def test_cli_modes_are_resolves_modes():
    from mxfp8_compat import cli, resolution

    assert tuple(cli.MODES) == tuple(resolution.MODES)


def test_a_usage_error_exits_2_before_torch(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--mode", "fast"])
    assert info.value.code == 2
    assert "--mode" in capsys.readouterr().err


def test_the_report_survives_a_torchao_that_aborts_at_import(tmp_path):
    """Before: `python -m mxfp8_compat` died silently (exit -6, no output), the one tool meant to explain it."""
    import os

    import fakes

    root = fakes.write_fake_torchao(tmp_path / "site", "0.18.0", fakes.import_raising("import os; os.abort()"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")])),
               MXFP8_COMPAT_CACHE_DIR=str(tmp_path / "verdicts"))
    result = subprocess.run(
        [sys.executable, "-m", "mxfp8_compat", "--json", "--device", "cpu", "--mode", "emulated"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode in (0, 1), (result.returncode, result.stderr[-2000:])
    report = json.loads(result.stdout)
    reasons = " ".join(report["modes"]["emulated"]["reasons"])
    assert "killed the isolated probe process" in reasons, reasons
    assert report["modes"]["emulated"]["ok"] and report["modes"]["emulated"]["emulation"] != "torchao"
