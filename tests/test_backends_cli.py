"""Backend registry and command line."""

import logging
import subprocess
import sys

import pytest
import torch

from peftcore import backends
from peftcore.cli import main


def test_import_is_lazy():
    code = "import sys, peftcore; print('triton' in sys.modules, 'peftcore._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_env_override_and_errors(monkeypatch):
    backends.ops()
    monkeypatch.setenv("PEFTCORE_BACKEND", "reference")
    assert backends.select("lora_linear", "cpu", torch.float32) == "reference"
    monkeypatch.setenv("PEFTCORE_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailable, match="'cuda' unavailable: cuda runs on CUDA devices"):
        backends.select("lora_linear", "cpu", torch.float32)
    monkeypatch.delenv("PEFTCORE_BACKEND")
    with pytest.raises(backends.BackendUnavailable, match="cpp takes float32, float64, got float16"):
        backends.select("phm_linear", "cpu", torch.float16, backend="cpp")


def test_automatic_choice_falls_back_and_logs_once(monkeypatch, caplog):
    backends.ops()
    monkeypatch.setattr(backends, "native_status", lambda cuda=False: "pretend the extension is missing")
    backends._warned.clear()
    with caplog.at_level(logging.INFO, logger="peftcore"):
        assert backends.select("lora_linear", "cpu", torch.float32) == "reference"
        assert backends.select("lora_linear", "cpu", torch.float32) == "reference"
    msgs = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(msgs) == 1 and "pretend the extension is missing" in msgs[0]


def test_info_lists_every_backend_with_a_reason(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "lora_linear:" in out and "torch " in out
    for b in backends.BACKENDS:
        assert f"      {b}" in out
    assert "cuda       unavailable: cuda runs on CUDA devices" in out or torch.cuda.is_available()


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
