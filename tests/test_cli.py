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


def test_config_command_prints_every_key_with_overrides(capsys):
    import yaml

    from raugment.config import Config
    from raugment.core.config import to_dict

    assert main(["config", "--set", "filter.min_side=20", "--set", "train.lr=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = to_dict(Config())
    expected["filter"]["min_side"], expected["train"]["lr"] = 20, 0.5
    assert shown == expected   # every section and key, plug-in keys included
    assert main(["config", "retrieve", "dataset"]) == 0
    assert set(yaml.safe_load(capsys.readouterr().out)) == {"retrieve", "dataset"}
    assert main(["config", "retriev"]) == 2 and "unknown section 'retriev'" in capsys.readouterr().err
