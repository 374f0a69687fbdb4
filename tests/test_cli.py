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


def _raugment(args: list[str], cwd) -> subprocess.CompletedProcess:
    """The installed ``raugment`` console script, run in ``cwd`` (the CLI path end to end)."""
    import os
    from pathlib import Path

    exe = Path(sys.executable).with_name("raugment")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


HOSTILE_CONFIGS = {
    "NaN learning rate": ("run:\n  root: out\ntrain:\n  lr: .nan\n", "config error: train.lr: nan is not a finite"),
    "duplicate key": ("run:\n  root: out\ntrain:\n  lr: 0.1\n  lr: 5.0\n",
                      "line 5: key 'lr' is given twice (first on line 4)"),
    "alias": ("run:\n  root: out\nstudy:\n  ratios: &r [100]\n", "line 4: YAML anchors and aliases (&r)"),
    "not UTF-8": ("run:\n  root: out\n# caf\xe9\n", "input error: config file 'study.yaml' is not UTF-8"),
    "duplicate seeds": ("run:\n  root: out\ntrain:\n  seeds: [0, 0]\n", "train.seeds lists 0 more than once"),
}


def test_hostile_config_end_to_end_one_line_exit_2_nothing_written(tmp_path):
    for name, (text, fragment) in HOSTILE_CONFIGS.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / "study.yaml").write_bytes(text.encode("latin-1"))
        out = _raugment(["run", "--config", "study.yaml"], d)
        assert out.returncode == 2, (name, out.stderr[-2000:])
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("raugment run: "), (name, out.stderr)
        assert fragment in out.stderr, (name, out.stderr)
        assert not (d / "out").exists(), name  # run.root not created
