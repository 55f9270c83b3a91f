"""The reference VLM and CLIP training tools (tools/train_vlm.py, tools/train_video_vlm.py, tools/train_clip.py) and
their training loop (vistok.models.reference_vlm.train_trained_tensors): bad settings refused before any work, a
resumed run's log its own, saves written whole. The VLMs run a tiny Llama with SmolLM2's tokenizer."""

import json
import pathlib
from pathlib import Path

import pytest
import torch
from helpers import interrupted_at, load_tool, tiny_llama


@pytest.fixture(scope="module")
def tiny_language_model():
    """``(tiny Llama, SmolLM2's tokenizer)``: the VLM tools run end to end in a second."""
    from vistok.samplers import load_smollm2

    tokenizer = load_smollm2()[1]

    def build():
        return tiny_llama(len(tokenizer), tokenizer.pad_token_id), tokenizer

    return build


def test_a_method_and_budget_the_model_cannot_take_is_refused_before_the_first_step(tiny_language_model, tmp_path,
                                                                                      capsys, monkeypatch):
    """pool at 7 tokens of the 6 x 6 grid, any method at 40 tokens of 36: refused when the model is built, not at
    the step that first draws them (after the work since the last checkpoint)."""
    train = load_tool("train_vlm")
    monkeypatch.setattr(train, "answer_loss", lambda *args: pytest.fail("a step ran"))
    for tokens, message in ((["24", "7"], "--compress-methods pool at --compress-tokens 7"),
                            (["40"], "--compress-tokens 40")):
        out = tmp_path / f"run{tokens[-1]}"
        assert train.main(["--out", str(out), "--steps", "3", "--batch-size", "1", "--compressed", "0.75",
                           "--compress-tokens", *tokens], language_model=tiny_language_model()) == 2
        error = capsys.readouterr().err
        assert message in error and "train_vlm.py: error:" in error
        assert not (out / "log.jsonl").exists() and not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("spec,message", [("pool:tokens=9", "the budget comes from --compress-tokens"),
                                          ("pool:keep=0.5", "the budget comes from --compress-tokens"),
                                          ("random_select:seed=5", "random_select's seed comes from --seed")])
def test_a_budget_or_seed_inside_a_method_word_is_refused(spec, message, tmp_path, capsys, monkeypatch):
    """A budget in a --compress-methods word was a raw TypeError; random_select's seed was silently replaced by the
    tool's own per-step seed."""
    train = load_tool("train_vlm")
    monkeypatch.setattr(train, "create_reference_vlm", lambda **kwargs: pytest.fail("the model built"))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--out", str(tmp_path / "run"), "--compress-methods", "pool", spec])
    assert stopped.value.code == 2 and f"--compress-methods {spec}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("tool,builder", [("train_vlm", "create_reference_vlm"),
                                          ("train_video_vlm", "create_video_vlm"), ("train_clip", "create_clip")])
def test_an_out_that_is_a_file_is_refused_before_any_work(tool, builder, tmp_path, capsys, monkeypatch):
    """--out naming a file (or a path under one) was a raw FileExistsError, for the VLMs after the models loaded."""
    train = load_tool(tool)
    monkeypatch.setattr(train, builder, lambda **kwargs: pytest.fail("the model built"))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out, message in ((afile, "a file, not a folder"), (afile / "run", f"{afile} is a file, not a folder")):
        assert train.main(["--out", str(out), "--steps", "1", "--batch-size", "2"]) == 2
        assert f"{tool}.py: error: --out {out}: {message}" in capsys.readouterr().err
    assert afile.read_text() == "not a folder"


def test_clip_refuses_a_batch_of_one(tmp_path, capsys, monkeypatch):
    """The contrastive loss over one pair is 0: a batch of one trained nothing and reported success."""
    train = load_tool("train_clip")
    monkeypatch.setattr(train, "create_clip", lambda **kwargs: pytest.fail("the model built"))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--out", str(tmp_path / "run"), "--batch-size", "1"])
    assert stopped.value.code == 2 and "--batch-size must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class _Projector(torch.nn.Module):
    """What train_trained_tensors trains (its name is a trained tensor's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.multi_modal_projector = torch.nn.Linear(8, 8)

    def loss(self, step: int) -> tuple[torch.Tensor, dict]:
        x = torch.Generator().manual_seed(step)
        return self.multi_modal_projector(torch.randn(4, 8, generator=x)).pow(2).mean(), {}


def _train(out: Path, lr: float, resume: bool = False, cut_at: int | None = None) -> list[dict]:
    from vistok.models.reference_vlm import TrainingRun, train_trained_tensors

    model = _Projector()
    step_loss = model.loss if cut_at is None else interrupted_at(model.loss, cut_at)
    run = TrainingRun(out, steps=8, minutes=5.0, lr=lr, warmup=1, save_every=4, resume=resume)
    try:
        train_trained_tensors(model, run, step_loss)
    except KeyboardInterrupt:
        pass
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_resumed_vlm_run_logs_its_own_lines_only(tmp_path):
    """Run A checkpoints at step 4 and is cut off in step 7; run B (another lr) starts in the same folder and is
    cut off before its first checkpoint; A resumed logged B's lines up to step 4 as its own."""
    straight = _train(tmp_path / "straight", 1e-2)
    _train(tmp_path / "run", 1e-2, cut_at=7)
    assert [line["lr"] for line in _train(tmp_path / "run", 5e-2, cut_at=3)] == [line["lr"] for line in
                                                                                  _train(tmp_path / "b", 5e-2)[:2]]
    resumed = _train(tmp_path / "run", 1e-2, resume=True)
    assert [line["step"] for line in resumed] == list(range(1, 9))
    for mine, expected in zip(resumed, straight, strict=True):
        assert mine["lr"] == expected["lr"] and mine["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_the_vlm_weights_are_written_whole(tmp_path, monkeypatch):
    """A run killed while writing model.safetensors left half a file; the previous save now stays whole."""
    import safetensors.torch

    from vistok.models.reference_vlm import TrainingRun, train_trained_tensors

    real, calls = safetensors.torch.save_file, []

    def killed_mid_write(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second save of the weights
            real(tensors, path, *args, **kwargs)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", killed_mid_write)
    model = _Projector()
    with pytest.raises(KeyboardInterrupt):
        train_trained_tensors(model, TrainingRun(tmp_path, steps=4, minutes=5.0, lr=1e-2, warmup=1, save_every=1),
                              model.loss)
    saved = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))  # the first save, whole
    assert torch.equal(saved["multi_modal_projector.weight"],
                       torch.load(tmp_path / "checkpoint.pt", weights_only=False)["trained"]
                       ["multi_modal_projector.weight"])


def _clip(out: Path, *extra: str) -> int:
    train = load_tool("train_clip")
    train.zero_shot_accuracy = lambda *args, **kwargs: 0.5  # the 10,000 test images are not the point here
    return train.main(["--out", str(out), "--steps", "50", "--batch-size", "2", "--warmup", "2", "--checkpoint-every",
                       "25", *extra])


def test_a_resumed_clip_run_logs_what_a_straight_run_logs(tmp_path, monkeypatch):
    """A log line every 50 steps, a checkpoint every 25: the resumed line averaged the 25 steps since the
    checkpoint, not the 50; and a run started in the folder since, cut off, left its lines in the resumed log."""
    import open_clip.loss

    assert _clip(tmp_path / "straight") == 0
    real = open_clip.loss.ClipLoss

    class CutOff(real):
        calls = 0

        def forward(self, *args, **kwargs):
            CutOff.calls += 1
            if CutOff.calls == 40:
                raise KeyboardInterrupt
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(open_clip.loss, "ClipLoss", CutOff)
    with pytest.raises(KeyboardInterrupt):
        _clip(tmp_path / "run")
    monkeypatch.setattr(open_clip.loss, "ClipLoss", real)
    (tmp_path / "run" / "log.jsonl").write_text(json.dumps({"step": 10, "loss": 9.0}) + "\n")  # another run's
    assert _clip(tmp_path / "run", "--resume") == 0
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in resumed] == [line["step"] for line in straight] == [50]
    assert resumed[0]["loss"] == pytest.approx(straight[0]["loss"], rel=1e-5)


def test_clip_weights_and_metrics_are_written_whole(tmp_path, monkeypatch):
    """model.safetensors and metrics.json were written in place: a run killed half-way through left a broken file
    where the previous run's was."""
    import safetensors.torch

    out = tmp_path / "run"
    out.mkdir()
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(out / "model.safetensors"))
    (out / "metrics.json").write_text(json.dumps({"zero_shot_top1": 0.25}))
    real_save, real_write = safetensors.torch.save_file, pathlib.Path.write_text

    def save_killed_half_way(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise KeyboardInterrupt

    def metrics_killed_half_way(self, text, *args, **kwargs):
        if not self.name.startswith("metrics.json"):
            return real_write(self, text, *args, **kwargs)
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        _clip(out, "--steps", "1")
    assert torch.equal(safetensors.torch.load_file(str(out / "model.safetensors"))["x"], torch.zeros(2))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    monkeypatch.setattr(pathlib.Path, "write_text", metrics_killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        _clip(out, "--steps", "1")
    assert json.loads((out / "metrics.json").read_text()) == {"zero_shot_top1": 0.25}


def test_a_clip_run_keeps_its_weight_decay_scores_the_test_split_and_resumes_its_own_settings(tmp_path,
                                                                                               monkeypatch):
    """--weight-decay reaches the optimizer (its checkpointed param groups); a run ended by --minutes reports the
    steps it did, not --steps; metrics.json's zero-shot top-1 is scored on the 10,000 test images (not the 60,000
    it trained on); --resume under another --lr is refused (the resumed schedule would be neither run's), under
    the same settings it goes on."""
    train = load_tool("train_clip")
    scored = []
    monkeypatch.setattr(train, "zero_shot_accuracy", lambda model, tokenizer, images, labels: scored.append(
        len(labels)) or 0.5)
    out = tmp_path / "run"
    argv = ["--out", str(out), "--steps", "5", "--minutes", "1e-9", "--batch-size", "2", "--warmup", "1",
            "--checkpoint-every", "1", "--weight-decay", "0.03"]  # the time budget ends it after one step
    assert train.main(argv) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert [group["weight_decay"] for group in state["optimizer"]["param_groups"]] == [0.03]
    assert scored == [10_000] and json.loads((out / "metrics.json").read_text())["steps"] == 1
    assert train.main([*argv, "--resume", "--lr", "2e-3"]) == 2
    assert train.main([*argv, "--resume"]) == 0 and scored == [10_000, 10_000]


def test_a_clip_runs_cosine_follows_the_time_budget_when_it_ends_first(tmp_path, monkeypatch):
    """The learning rate's cosine runs to whichever of --steps and --minutes ends first: on a clock that moves 10 s a
    step, --minutes 1 ends the run after 6 of its 1,000 steps, and step s trains at the rate of progress s / 6 (one
    that followed --steps alone stayed near the peak rate to the end); computed here from the tool's documented
    schedule (warm-up, then a cosine from --lr down to a tenth of it)."""
    import math
    import types

    train = load_tool("train_clip")
    monkeypatch.setattr(train, "zero_shot_accuracy", lambda *args: 0.5)
    ticks = iter(range(0, 10_000, 10))  # one reading at the start, then one after each step
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    rates, adamw = [], torch.optim.AdamW

    class AdamW(adamw):
        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    assert train.main(["--out", str(tmp_path / "run"), "--steps", "1000", "--minutes", "1", "--batch-size", "2",
                       "--warmup", "2", "--lr", "1e-3", "--checkpoint-every", "1000"]) == 0
    expected = [1e-3 * min(1.0, (s + 1) / 2) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / 6))))
                for s in range(6)]
    assert rates == pytest.approx(expected)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 6
