import subprocess
import sys

from typer.testing import CliRunner

import latentx
from latentx.cli import app


def test_version_flag():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"latentx {latentx.__version__}"


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "latentx.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert latentx.__version__ in out.stdout
