import subprocess
import sys

from raugment.cli import main


def test_help_without_torch():
    code = ("import sys; from raugment.cli import build_parser;"
            "build_parser().format_help();"
            "sys.exit(1 if ('torch' in sys.modules or 'ray' in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    out = subprocess.run([sys.executable, "-m", "raugment.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout and "demo" in out.stdout


def test_config_error_exit_code(capsys):
    assert main(["train", "--set", "train.lr=abc"]) == 2
    assert "train.lr" in capsys.readouterr().err
