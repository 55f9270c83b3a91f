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


def _killed_in_epoch_2(train, run, monkeypatch):
    """Run tools/train.py on ``run`` and stop it in its second epoch's validation, after its first checkpoint."""
    validate = train.validate
    monkeypatch.setattr(train, "validate", interrupted_at(validate, 2))
    with pytest.raises(KeyboardInterrupt):
        train.main(run)
    monkeypatch.setattr(train, "validate", validate)


def test_a_resume_puts_back_its_own_log_and_config(tmp_path, monkeypatch):
    """Run A checkpoints epoch 1; a fresh run B of other settings in the folder logs its epoch 1 and writes its
    config, then dies before its checkpoint; resuming A kept B's line in A's log."""
    train = load_tool("train")
    run = [*TINY, "train.epochs=2", f"output={tmp_path}"]
    _killed_in_epoch_2(train, run, monkeypatch)
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


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """The folder of a one-epoch TINY run (its checkpoint of epoch index 0); copy it before changing it."""
    folder = tmp_path_factory.mktemp("one_epoch")
    assert load_tool("train").main([*TINY, "train.epochs=1", f"output={folder}"]) == 0
    return folder


def _one_process():
    """What ``_resume`` asks of accelerate, for one process: its ``load_state`` restores the random state."""
    import types

    def load_state(folder):
        torch.set_rng_state(torch.load(Path(folder) / "torch_rng_0.pt"))

    return types.SimpleNamespace(load_state=load_state, is_main_process=True, process_index=0)


def test_the_learning_rate_warms_up_linearly_then_follows_a_cosine_to_its_floor():
    """Step s < warmup trains at base * (s + 1) / warmup (from s / warmup, the first step trained at rate 0), the
    first step after the warm-up at base (a ``<=`` bound went past it), the last step of the run at the floor (a
    cosine over the whole run instead of what is left after the warm-up ended above it); an epoch of b batches takes
    ceil(b / grad_accum) optimizer steps."""
    train = load_tool("train")
    base, floor, warmup, total = 2.0, 0.2, 4, 20
    rates = [train.cosine_with_warmup(step, total, warmup, base, floor) for step in range(total + 1)]
    assert rates[:warmup] == pytest.approx([base * (step + 1) / warmup for step in range(warmup)])
    assert rates[warmup] == pytest.approx(base) and rates[total] == pytest.approx(floor)
    assert rates[(warmup + total) // 2] == pytest.approx((base + floor) / 2)  # half-way through the cosine
    assert all(later <= earlier for earlier, later in zip(rates[warmup:-1], rates[warmup + 1:], strict=True))
    for batches, accumulation in ((4, 3), (6, 3), (1, 4), (7, 1)):
        assert train.optimizer_steps_per_epoch(batches, accumulation) == -(-batches // accumulation)


def test_a_run_hands_its_settings_to_the_loaders_the_optimizer_the_seed_and_the_schedule(tmp_path, monkeypatch):
    """3 batches an epoch with grad_accum=2 are 2 optimizer steps, so warmup_epochs=1.5 warms up for 3 of the run's
    4 steps (not 4, counted in batches, nor 1, in epochs); the training loader shuffles, drops a partial batch and
    takes train.batch_size, the validation loader train.eval_batch_size; AdamW decays by train.weight_decay (timm's
    own default replaced it once); train.seed seeds the run and the data's augmentation; and every epoch tells the
    training set its number (video: fresh clips each epoch, not epoch 0's again)."""
    import math

    import accelerate.utils

    train = load_tool("train")
    seen = {"loaders": [], "schedule": [], "epochs": [], "optimizers": [], "seeds": []}
    loader, build_data, schedule = train.loader, train.build_data, train.cosine_with_warmup
    adamw, set_seed = torch.optim.AdamW, accelerate.utils.set_seed

    class EpochCounted(torch.utils.data.Dataset):  # the training set, told its epoch as a video clip set is
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            return self.dataset[index]

        def set_epoch(self, epoch):
            seen["epochs"].append(epoch)

    def built(data, seed=0, **kwargs):  # under a Subset, as data.limit puts it (accelerate tells no epoch to that)
        seen["data_seed"] = seed
        train_set, *rest = build_data(data, seed, **kwargs)
        return torch.utils.data.Subset(EpochCounted(train_set), range(len(train_set))), *rest

    class AdamW(adamw):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["optimizers"].append(self)

    monkeypatch.setattr(train, "build_data", built)
    monkeypatch.setattr(train, "loader", lambda dataset, batch_size, **kwargs: seen["loaders"].append(
        (batch_size, kwargs)) or loader(dataset, batch_size, **kwargs))
    monkeypatch.setattr(train, "cosine_with_warmup", lambda step, total, warmup, *args: seen["schedule"].append(
        (step, total, warmup)) or schedule(step, total, warmup, *args))
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(accelerate.utils, "set_seed", lambda seed, *args, **kwargs: seen["seeds"].append(seed)
                        or set_seed(seed, *args, **kwargs))
    tiny = [item for item in TINY if not item.startswith(("data.limit=", "train.eval_batch_size="))]
    assert train.main([*tiny, "train.epochs=2", "data.limit=96", "train.eval_batch_size=48", "train.grad_accum=2",
                       "train.warmup_epochs=1.5", "train.seed=7", "train.weight_decay=0.03", f"output={tmp_path}"]) == 0
    per_epoch = math.ceil((96 // 32) / 2)
    expected = [(epoch * per_epoch + batch // 2, 2 * per_epoch, int(1.5 * per_epoch))
                for epoch in range(2) for batch in range(96 // 32)]
    assert seen["schedule"][::2] == expected and seen["schedule"][1::2] == expected  # both parameter groups
    assert seen["loaders"] == [(32, {"shuffle": True, "drop_last": True, "num_workers": 0}), (48, {"num_workers": 0})]
    (optimizer,) = seen["optimizers"]
    assert sorted(group["weight_decay"] for group in optimizer.param_groups) == [0.0, 0.03]
    assert seen["seeds"] == [7] and seen["data_seed"] == 7 and seen["epochs"] == [0, 1]


def test_validation_scores_the_top1_and_top5_of_every_batch():
    """val_top1 and val_top5 are the percentages of labels among the best 1 and 5 logits over all the batches, as
    torch.topk counts them here (a top-5 that counted the top-1 hits again went unseen: both were in range)."""
    import types

    train = load_tool("train")
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(30, 10, generator=generator), torch.randint(0, 10, (30,), generator=generator)
    batches = [(logits[start:start + 8], labels[start:start + 8]) for start in range(0, 30, 8)]  # the last short
    accelerator = types.SimpleNamespace(gather_for_metrics=lambda pair: pair)  # one process
    result = train.validate(torch.nn.Identity(), batches, None, accelerator)  # the inputs are the logits
    best = logits.topk(5, dim=1).indices
    top1 = 100.0 * int((best[:, 0] == labels).sum()) / len(labels)
    top5 = 100.0 * int((best == labels[:, None]).any(1).sum()) / len(labels)
    assert top1 != top5 and result == {"val_top1": pytest.approx(top1), "val_top5": pytest.approx(top5)}


def test_training_settings_at_their_bounds():
    """clip_grad=0 (no clipping), warmup_epochs=0 and a min_lr equal to lr (a constant rate after the warm-up) are
    accepted; eval_batch_size=0 (it failed in the DataLoader after the setup) and label_smoothing=1 (a uniform
    target, nothing to learn) are refused."""
    from vistok.config import ConfigError

    train = load_tool("train")
    settings = train.DEFAULTS["train"]
    for change in ({"clip_grad": 0.0}, {"warmup_epochs": 0.0}, {"min_lr": settings["lr"]}):
        train._check_settings({**settings, **change})
    for change, message in (({"eval_batch_size": 0}, "train.eval_batch_size must be an int >= 1"),
                            ({"label_smoothing": 1.0}, "train.label_smoothing must be below 1")):
        with pytest.raises(ConfigError, match=message):
            train._check_settings({**settings, **change})


def test_a_resume_takes_the_newest_whole_checkpoint_and_cuts_a_log_it_did_not_keep(one_epoch_run, tmp_path):
    """A save cut off between its two renames leaves the new checkpoint.partial beside the old checkpoint.previous:
    the resume takes .partial (searched the other way round it resumed an older epoch). A checkpoint from before the
    log was kept in it cuts the folder's log after the epoch it ended: checkpoint epoch index e keeps logged epochs
    1 .. e + 1, drops later ones and a line a kill cut off (a bound off by one dropped the checkpoint's own epoch or
    kept the next)."""
    import shutil

    train = load_tool("train")
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    checkpoint = run / "checkpoint"
    shutil.copytree(checkpoint, run / "checkpoint.previous")  # epoch index 0
    state = json.loads((checkpoint / "vistok_state.json").read_text())
    (checkpoint / "vistok_state.json").write_text(json.dumps({**state, "epoch": 1}))
    (checkpoint / "metrics.jsonl").unlink()  # as an older vistok saved it
    checkpoint.rename(run / "checkpoint.partial")
    rows = [json.dumps({"epoch": epoch, "train_loss": 0.0}) for epoch in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(rows) + '\n{"epoch": 2, "tra')
    assert train._resume(_one_process(), checkpoint, {}, state["config"], run) == 1
    assert (run / "metrics.jsonl").read_text().splitlines() == rows[:2]


def test_a_resume_restores_the_augmentation_draws_and_lets_the_machine_settings_change(one_epoch_run, tmp_path):
    """The augmentation's generator is set to the state the checkpoint saved (a resume that only read the file
    restarted the shifts and flips from the seed); train.eval_batch_size, train.threads and data.workers, how fast
    a run goes, may differ on a resume of Fashion-MNIST data (RESUME_MAY_CHANGE; only folder data's augmentation
    depends on data.workers)."""
    import shutil

    train = load_tool("train")
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    checkpoint = run / "checkpoint"
    config = json.loads((checkpoint / "vistok_state.json").read_text())["config"]
    saved = torch.load(checkpoint / "augmentation_rng.pt")
    generator = torch.Generator().manual_seed(config["train"]["seed"])
    assert not torch.equal(generator.get_state(), saved)  # an epoch of draws moved it
    moved = {**config, "data": {**config["data"], "workers": 2},
             "train": {**config["train"], "eval_batch_size": 7, "threads": 2}}
    assert train._resume(_one_process(), checkpoint, {"augmentation_rng.pt": generator}, moved, run) == 0
    assert torch.equal(generator.get_state(), saved)


def test_a_resumed_run_draws_the_training_items_of_its_own_epochs(tmp_path, monkeypatch):
    """A training set told its epoch (a video set draws fresh clips, crops and flips each epoch) must draw the second
    epoch's items in the second epoch of a run resumed after its first, as a straight run does. The set is the
    loader's own here, as a video set without data.limit is: accelerate's loader then also tells it its count of
    passes, which starts at 0 again in the resumed process."""
    train = load_tool("train")
    build_data, drawn = train.build_data, []

    class EpochCounted(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset, self.epoch = dataset, None

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            drawn.append(self.epoch)
            return self.dataset[index]

        def set_epoch(self, epoch):
            self.epoch = epoch

    def built(*args, **kwargs):
        train_set, *rest = build_data(*args, **kwargs)
        return EpochCounted(train_set), *rest

    monkeypatch.setattr(train, "build_data", built)
    run = [*TINY, "train.epochs=2", f"output={tmp_path}"]
    _killed_in_epoch_2(train, run, monkeypatch)
    assert set(drawn) == {0, 1}  # the run straight through its first two epochs
    drawn.clear()
    assert train.main([*run, "--resume"]) == 0
    assert set(drawn) == {1}


def test_training_reads_augmented_data_and_evaluation_fixed_views():
    """With data.augment on, Fashion-MNIST's training batches are shifted and flipped and its evaluation batches
    are not; video data's training set samples its clips at random (``train=True``) through a training transform
    (random crop, flip unless data.flip=false), through the evaluation transform with data.augment off, and its
    validation set reads fixed clips through the evaluation transform in data.test_crops crops (the evaluation once
    took the training transform, the training set the evaluation one or the default flip)."""
    from vistok.config import _load_yaml
    from vistok.experiment import DATA_DEFAULTS, build_data

    for augment in (True, False):
        _, _, train_transform, val_transform = build_data({**DATA_DEFAULTS, "augment": augment}, 5, train=False)
        assert (train_transform.augment, val_transform.augment) == (augment, False)
    video = {**DATA_DEFAULTS, **_load_yaml((ROOT / "configs/fmnist_video_vit.yaml").read_text())["data"],
             "root": str(ROOT / "data" / "fmnist_clips_sample"), "short_side": 36, "flip": True, "test_crops": 3}
    train_set, val, *_ = build_data(video, seed=5)
    assert (train_set.train, train_set.transform.train, train_set.transform.flip) == (True, True, True)
    assert (val.train, val.transform.train, val.transform.num_crops) == (False, False, 3)
    train_set = build_data({**video, "augment": False, "flip": False}, seed=5)[0]
    assert (train_set.train, train_set.transform.train, train_set.transform.flip) == (True, False, False)
