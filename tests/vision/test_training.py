"""tools/train.py's runs as they are cut off and resumed: several processes, a run started in the folder since, a
kill while the weights are written; and settings accelerate cannot train with."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, interrupted_at, load_tool
from safetensors.torch import load_file

TINY = ["--config", str(ROOT / "configs/fmnist_vit.yaml"), "model_kwargs.depth=1", "data.limit=64",
        "train.batch_size=32", "train.eval_batch_size=64", "train.threads=1"]

# run under torchrun: a run straight through, the same run cut off in epoch 2 and resumed; rank 0 compares them
_TWO_PROCESSES = """
import importlib.util, os, sys
from pathlib import Path
root, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("train_tool", root / "tools/train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
base = ["--config", str(root / "configs/fmnist_vit.yaml"), "train.epochs=3", "model_kwargs.depth=1",
        "data.limit=256", "train.batch_size=32", "train.eval_batch_size=128", "data.augment=false",
        "train.threads=1", "model_kwargs.drop_path_rate=0.0"]
assert train.main([*base, f"output={out / 'straight'}"]) == 0
calls, validate = [], train.validate
def cut(*args):
    calls.append(args)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return validate(*args)
train.validate = cut
try:
    train.main([*base, f"output={out / 'resumed'}"])
except KeyboardInterrupt:
    pass
train.validate = validate
assert train.main([*base, f"output={out / 'resumed'}", "--resume"]) == 0
"""


@pytest.mark.slow
def test_a_resume_of_several_processes_continues_their_data_order(tmp_path):
    """accelerate gives the shuffling sampler of a multi-process run a generator of its own, which its save_state
    does not save: a resume replayed the previous epoch's order and trained other weights."""
    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESSES)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(ROOT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    straight, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_a_resume_puts_back_its_own_log_and_config(tmp_path, monkeypatch):
    """Run A checkpoints epoch 1; a fresh run B of other settings in the folder logs its epoch 1 and writes its
    config, then dies before its checkpoint; resuming A kept B's line in A's log."""
    train = load_tool("train")
    run = [*TINY, "train.epochs=2", f"output={tmp_path}"]
    validate = train.validate
    monkeypatch.setattr(train, "validate", interrupted_at(validate, 2))  # in epoch 2
    with pytest.raises(KeyboardInterrupt):
        train.main(run)
    monkeypatch.setattr(train, "validate", validate)
    logged_by_a = (tmp_path / "metrics.jsonl").read_text().splitlines()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main([*run, "train.lr=0.5"])
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() != logged_by_a  # B replaced the log
    monkeypatch.undo()
    monkeypatch.setattr(train, "validate", killed)  # the resume cut off too, before its first epoch is logged
    with pytest.raises(KeyboardInterrupt):
        train.main([*run, "--resume"])
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == logged_by_a
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] != 0.5
    monkeypatch.undo()
    assert train.main([*run, "--resume"]) == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[:1] == logged_by_a and [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_a_kill_while_the_weights_are_written_leaves_no_broken_file(tmp_path, monkeypatch):
    """model.safetensors was written in place after the checkpoint: a kill mid-write left a broken file, and a
    resume with no epoch left trained nothing and left it broken."""
    import safetensors.torch

    train = load_tool("train")
    run = [*TINY, "train.epochs=1", f"output={tmp_path}"]
    save_file = safetensors.torch.save_file

    def dies_midway(tensors, path, *args, **kwargs):
        if Path(path).parent != tmp_path:  # accelerate's checkpoint (it may bind save_file when first imported)
            return save_file(tensors, path, *args, **kwargs)
        with open(path, "wb") as cut_off:  # what a kill mid-write leaves
            cut_off.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        train.main(run)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert not (tmp_path / "model.safetensors").exists()  # no file rather than a broken one
    assert train.main([*run, "--resume"]) == 0
    weights, checkpointed = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "checkpoint" /
                                                                                 "model.safetensors")
    assert weights.keys() == checkpointed.keys()
    for name, value in weights.items():
        assert torch.equal(value, checkpointed[name]), name


def test_a_mixed_precision_accelerate_cannot_run_is_a_config_error(tmp_path, capsys):
    """fp8 without transformer_engine or torchao passed the check, then raised accelerate's bare ValueError."""
    from accelerate.utils import is_fp8_available

    if is_fp8_available():
        pytest.skip("an fp8 backend is installed")
    train = load_tool("train")
    assert train.main([*TINY, "train.epochs=1", "train.mixed_precision=fp8", f"output={tmp_path}"]) == 2
    assert "train.py: error: train.mixed_precision=fp8: accelerate cannot train with it" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_several_process_resume_of_a_checkpoint_without_the_sampler_state_is_refused(tmp_path):
    """A checkpoint from one process (or an older vistok) has no sampler_rng.pt: resuming it with several processes
    would restart their shuffling from its seed, so it is refused."""
    import types

    from vistok.config import ConfigError

    train = load_tool("train")
    assert train.main([*TINY, "train.epochs=1", f"output={tmp_path}"]) == 0
    checkpoint = tmp_path / "checkpoint"
    config = json.loads((checkpoint / "vistok_state.json").read_text())["config"]
    def load_state(folder):  # what accelerate restores that _resume checks: the random state
        torch.set_rng_state(torch.load(Path(folder) / "torch_rng_0.pt"))

    accelerator = types.SimpleNamespace(load_state=load_state, is_main_process=True, process_index=0)
    assert train._resume(accelerator, checkpoint, {}, config, tmp_path) == 0  # one process: nothing to restore
    (checkpoint / "torch_rng_0.pt").unlink()  # as an older vistok wrote it: accelerate's word is taken
    accelerator.load_state = lambda folder: torch.manual_seed(12345)
    assert train._resume(accelerator, checkpoint, {}, config, tmp_path) == 0
    with pytest.raises(ConfigError, match="has no sampler_rng.pt .* data order of several processes"):
        train._resume(accelerator, checkpoint, {"sampler_rng.pt": torch.Generator()}, config, tmp_path)
