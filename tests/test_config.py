"""Settings: precedence flags > SEEKSERVE_* env > YAML file > defaults, list values from env, clear errors for
bad files, and the `seekserve` command line (every setting has a flag; unsupported options fail clearly)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import seekserve.config as config_mod
from seekserve import cli
from seekserve.config import FILE_ONLY_SETTINGS, ConfigFileError, Settings, load_settings


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SEEKSERVE_* variable of the caller's shell, and no /etc/seekserve/config.yaml, leaks in."""
    for name in list(os.environ):
        if name.startswith("SEEKSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_FILE", tmp_path / "no-default-config.yaml")


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    s = load_settings({})
    assert (s.host, s.port, s.batch_size, s.api_key, s.drain_timeout) == ("127.0.0.1", 8080, 64, [], 30.0)


def test_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "batch_size: 8\nport: 9001\ndrain_timeout: 7\nhost: 0.0.0.0\n")
    # file alone
    s = load_settings({}, cfg)
    assert (s.batch_size, s.port, s.drain_timeout, s.host) == (8, 9001, 7.0, "0.0.0.0")
    # env beats the file
    monkeypatch.setenv("SEEKSERVE_BATCH_SIZE", "16")
    monkeypatch.setenv("SEEKSERVE_PORT", "9002")
    s = load_settings({}, cfg)
    assert (s.batch_size, s.port, s.drain_timeout, s.host) == (16, 9002, 7.0, "0.0.0.0")
    # flags beat env and file; None flags (not given on the command line) fall through
    s = load_settings({"batch_size": 32, "port": None, "drain_timeout": None}, cfg)
    assert (s.batch_size, s.port, s.drain_timeout, s.host) == (32, 9002, 7.0, "0.0.0.0")


def test_file_keys_may_use_dashes_and_nulls_are_empty(tmp_path: Path) -> None:
    s = load_settings({}, write(tmp_path, "max-request-body-bytes: 4096\nserved-model-name: [a, b]\n"))
    assert s.max_request_body_bytes == 4096 and s.served_model_name == ["a", "b"]
    assert load_settings({}, write(tmp_path, "", "empty.yaml")) == load_settings({})


def test_seekserve_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEKSERVE_CONFIG", write(tmp_path, "batch_size: 5\n"))
    assert load_settings({}).batch_size == 5
    # an explicit --config wins over SEEKSERVE_CONFIG
    assert load_settings({}, write(tmp_path, "batch_size: 6\n", "other.yaml")).batch_size == 6
    monkeypatch.setenv("SEEKSERVE_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigFileError, match="missing.yaml does not exist"):
        load_settings({})


def test_default_config_file_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = Path(write(tmp_path, "log_level: debug\n", "default.yaml"))
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_FILE", default)
    assert load_settings({}).log_level == "debug"
    default.unlink()
    assert load_settings({}).log_level == "info"     # absent default file: no error


def test_config_file_does_not_leak_into_later_loads(tmp_path: Path) -> None:
    """--config applies to that load only: it is not left behind in os.environ or for the next Settings."""
    assert load_settings({}, write(tmp_path, "batch_size: 3\n")).batch_size == 3
    assert "SEEKSERVE_CONFIG" not in os.environ
    assert load_settings({}).batch_size == 64
    assert Settings().batch_size == 64


def test_comma_separated_env_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEKSERVE_API_KEY", "a,b")
    monkeypatch.setenv("SEEKSERVE_SERVED_MODEL_NAME", " deepseek-chat , tiny ,")
    s = load_settings({})
    assert s.api_key == ["a", "b"]
    assert s.served_model_name == ["deepseek-chat", "tiny"]
    monkeypatch.setenv("SEEKSERVE_API_KEY", "single")
    assert load_settings({}).api_key == ["single"]
    assert load_settings({"api_key": ["flag-key"]}).api_key == ["flag-key"]   # a flag list replaces env


def test_env_bool_and_float(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEKSERVE_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("SEEKSERVE_KV_CACHE_MEMORY", "0.25")
    s = load_settings({})
    assert s.enable_prefix_caching is False and s.kv_cache_memory == 0.25


def test_invalid_value_in_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as e:
        load_settings({}, write(tmp_path, "batch_size: lots\n"))
    assert e.value.error_count() == 1
    err = e.value.errors()[0]
    assert err["loc"] == ("batch_size",) and err["input"] == "lots"
    assert "batch_size" in str(e.value) and "valid integer" in str(e.value)
    with pytest.raises(ValidationError, match="batch_size"):
        load_settings({}, write(tmp_path, "batch_size: 0\n", "zero.yaml"))     # ge=1
    with pytest.raises(ValidationError, match="dtype"):
        load_settings({}, write(tmp_path, "dtype: float8\n", "dtype.yaml"))


def test_invalid_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEKSERVE_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        load_settings({})


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as e:
        load_settings({}, write(tmp_path, "batch_size: 8\nbatchsize: 9\n"))
    errors = e.value.errors()
    assert [(x["loc"], x["type"]) for x in errors] == [(("batchsize",), "extra_forbidden")]


def test_unreadable_or_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot be read"):
        load_settings({}, write(tmp_path, "batch_size: [unclosed\n"))
    with pytest.raises(ConfigFileError, match="must hold a mapping"):
        load_settings({}, write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigFileError, match=f"config file {missing} does not exist"):
        load_settings({}, str(missing))


def test_cli_serve_reports_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad settings stop `serve` before any model is loaded: exit 2 and a one-line reason."""
    assert cli.main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "invalid settings: config file" in capsys.readouterr().err
    assert cli.main(["serve", "--config", write(tmp_path, "drain_timeout: soon\n")]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "drain_timeout" in err
    assert cli.main(["serve", "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err


# -- the command line, as users run it -----------------------------------------------------------------


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEKSERVE_")}
    env["COLUMNS"] = "1000"   # argparse wraps help at the terminal width; keep each flag's help on one line
    return subprocess.run([sys.executable, "-m", "seekserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def test_top_level_help() -> None:
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert "serve" in r.stdout and "generate" in r.stdout
    assert "command-line flags > SEEKSERVE_* environment > config file > defaults" in r.stdout


def test_serve_help_mentions_every_setting() -> None:
    r = run_cli("serve", "--help")
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout and "SEEKSERVE_CONFIG" in r.stdout
    # one entry per option: "--flag METAVAR" then its help, which may start on the next line
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", r.stdout.split("options:", 1)[1])]
    missing = []
    assert all(name in " ".join(r.stdout.split()) for name in FILE_ONLY_SETTINGS)   # named in the epilog
    for name in set(Settings.model_fields) - set(FILE_ONLY_SETTINGS):
        # the flag's own entry names the flag and its environment variable
        if not any(e.startswith((flag(name) + " ", flag(name) + ",")) for e in entries
                   if f"[env SEEKSERVE_{name.upper()}]" in e):
            missing.append(name)
    assert missing == []
    # every flag maps back to a setting: parse a full command line and load it
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--port", "1234", "--api-key", "k1", "k2", "--no-enable-prefix-caching",
                              "--drain-timeout", "2.5", "--served-model-name", "m"])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config_file")}
    assert set(flags) == set(Settings.model_fields) - set(FILE_ONLY_SETTINGS)
    s = load_settings(flags)
    assert (s.port, s.api_key, s.enable_prefix_caching, s.drain_timeout, s.served_model_name) == \
        (1234, ["k1", "k2"], False, 2.5, ["m"])


def test_serve_tensor_parallel_is_refused(chat_model_path: Path) -> None:
    r = run_cli("serve", "--tensor-parallel", "2", "--model-path", str(chat_model_path), "--port", "0",
                "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "0.05")
    assert r.returncode == 2, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("seekserve: error: ") and "tensor_parallel" in last and "not supported" in last
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def chat_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.factory import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tp"), "llama", max_position_embeddings=256)
