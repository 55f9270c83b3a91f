"""The vision-LLM evaluation and tuning tools (tools/eval_vlm.py, tools/eval_video_qa.py, tools/tune_reference.py,
tools/make_video_qa.py) and the training tools' per-step wiring (tools/train_vlm.py, tools/train_video_vlm.py): every
parsed option reaches the work it names, each figure is computed from the quantity it names. The models, data sets
and timings are spies: these tests check the tools' own arithmetic and wiring in a second, not what a model
answers."""

import csv
import json
import math
import statistics
import types

import numpy as np
import pytest
import torch
from helpers import load_tool

import vistok


def _grid_model(grid=(6, 6)):
    """What eval_vlm.py and train_vlm.py read of a reference VLM: its tower's token grid."""
    return types.SimpleNamespace(model=types.SimpleNamespace(vision_tower=types.SimpleNamespace(token_grid=grid)),
                                 train=lambda: None)


def _handle(log, name):
    """A patch handle whose removal is logged."""
    return types.SimpleNamespace(remove=lambda: log.append(("removed", name)))


class _Questions:
    """A question set as FashionQA makes one (``split``, ``size``, ``seed`` recorded): question ``i`` is ``q<i>``,
    its answer ``a<i>``, its kind alternating."""

    made: list = []

    def __init__(self, split, size, seed=0):
        _Questions.made.append((split, size, seed))
        self.size = size

    def __len__(self):
        return self.size

    def example(self, index):
        return types.SimpleNamespace(image=np.full((8, 8), index, dtype=np.uint8), question=f"q{index}",
                                     answer=f"a{index}", kind=("count", "exists")[index % 2])

    def __getitem__(self, index):
        return index


def test_eval_vlm_evaluate_scores_every_question_and_times_the_first_batch(monkeypatch):
    """One row of eval_vlm.py: accuracy over all questions and per kind (computed here from the answers given), the
    median of ``prefill_runs`` timed prefills of the first batch after one untimed, generation time summed over the
    batches, the method patched at the row's tokens and removed. Catches the untimed run counted, another order
    statistic, a kind's hit counted as a question, a batch left out or a patch left on."""
    tool = load_tool("eval_vlm")
    data, log = _Questions("test", 7), []
    wrong = {1, 4, 5}  # the questions answered wrong
    timings = iter([100.0, 3.0, 1.0, 2.0, 9.0])  # the untimed run first
    prefilled = []

    def prefill(model, tokenizer, images, questions):
        prefilled.append(list(questions))
        return next(timings)

    def answer(model, tokenizer, images, questions):
        assert images.shape == (len(questions), 1, 8, 8)
        log.append(("answered", list(questions)))
        answers = [f"a{q[1:]}" if int(q[1:]) not in wrong else "no" for q in questions]
        return types.SimpleNamespace(answers=answers, total_seconds=0.25)

    monkeypatch.setattr(tool, "prefill_seconds", prefill)
    monkeypatch.setattr(tool, "answer_questions", answer)
    monkeypatch.setattr(tool, "patch", lambda model, method, **budget: log.append(("patched", method, budget))
                        or _handle(log, method))
    row, hits = tool.evaluate(None, None, data, "dominant", 9, batch_size=3, prefill_runs=3)
    assert prefilled == [["q0", "q1", "q2"]] * 4
    assert log == [("patched", "dominant", {"tokens": 9}), ("answered", ["q0", "q1", "q2"]),
                   ("answered", ["q3", "q4", "q5"]), ("answered", ["q6"]), ("removed", "dominant")]
    assert hits == [i not in wrong for i in range(7)]
    assert row["method"] == "dominant" and row["visual_tokens"] == 9 and row["questions"] == 7
    assert row["accuracy"] == pytest.approx(100 * 4 / 7)
    for kind, indices in (("count", [0, 2, 4, 6]), ("exists", [1, 3, 5])):
        assert row[f"accuracy_{kind}"] == pytest.approx(100 * sum(i not in wrong for i in indices) / len(indices))
    assert row["prefill_s"] == statistics.median([3.0, 1.0, 2.0]) and row["total_s"] == pytest.approx(0.75)


def test_eval_vlm_hands_its_options_on_and_reports_against_the_all_token_row(tmp_path, monkeypatch):
    """eval_vlm.py's main: the checkpoint and variant reach the model, the test split with --seed and --questions
    is asked, --batch-size and --prefill-runs reach every row, --tune runs on its own options and its pick is
    evaluated with its config and written beside --out; accuracy_kept and prefill_ratio divide each row by the
    all-token row (not the reverse), vs_all and vs_baseline are the differences of the accuracies. Catches an
    option replaced by its default, the train split or seed 0 evaluated, the ratios inverted."""
    tool = load_tool("eval_vlm")
    built, evaluated, tuned_with, plotted = [], [], [], []
    _Questions.made = []
    monkeypatch.setattr(tool, "FashionQA", _Questions)
    monkeypatch.setattr(tool, "create_reference_vlm", lambda **kwargs: built.append(kwargs) or (_grid_model(), "t"))

    def evaluate(model, tokenizer, data, method, tokens, batch_size, prefill_runs=3, config=None):
        call = len(evaluated)
        evaluated.append((method, tokens, batch_size, prefill_runs, config, data.size))
        hits = [(i + call) % 3 != 0 for i in range(data.size)]  # another pattern per row
        return {"method": method or "all tokens", "visual_tokens": tokens, "accuracy": 100 * sum(hits) / len(hits),
                "prefill_s": 2.0 + call}, hits

    pick = types.SimpleNamespace(config=types.SimpleNamespace(tokens=12), best={"label": "pool 12"}, seconds=4.5,
                                 save=lambda path: tuned_with.append(("saved", str(path))))
    monkeypatch.setattr(tool, "evaluate", evaluate)
    monkeypatch.setattr(tool, "tune_on_training_questions", lambda *args: tuned_with.append(args) or pick)
    monkeypatch.setattr(tool, "save_plot", lambda path, rows, *args: plotted.append((path, args)))
    out = tmp_path / "fine"
    assert tool.main(["--fine", "--checkpoint", "weights.safetensors", "--questions", "5", "--seed", "7",
                      "--batch-size", "3", "--prefill-runs", "2", "--fractions", "0.5", "--methods",
                      "pool:positions=original", "dominant:positions=original", "--tune", "0.3", "--tune-batches",
                      "6", "--out", str(out)]) == 0
    assert built == [{"pretrained": False, "checkpoint": "weights.safetensors", "language_model": None,
                      "page": False, "fine": True}]
    assert _Questions.made == [("test", 5, 7)]
    assert [(method, batch_size, runs, questions) for method, _, batch_size, runs, _, questions in evaluated] == \
        [(None, 3, 2, 5), ("pool:positions=original", 3, 2, 5), ("dominant:positions=original", 3, 2, 5),
         ("tuned: pool 12", 3, 2, 5)]
    assert evaluated[-1][1] == 12 and evaluated[-1][4] is pick.config
    assert tuned_with == [(tuned_with[0][0], "t", False, 0.3, 6, 3, 7), ("saved", str(tmp_path / "fine_tune.json"))]
    rows = list(csv.DictReader(open(tmp_path / "fine.csv")))
    assert [r["method"] for r in rows] == ["all tokens", "pool:positions=original", "dominant:positions=original",
                                           "tuned: pool 12"]
    assert float(rows[-1]["tuner_seconds"]) == 4.5
    full = rows[0]
    for row in rows:
        assert float(row["accuracy_kept"]) == pytest.approx(float(row["accuracy"]) / float(full["accuracy"]))
        assert float(row["prefill_ratio"]) == pytest.approx(float(row["prefill_s"]) / float(full["prefill_s"]))
    for row in rows[1:]:
        assert float(row["vs_all"]) == pytest.approx(float(row["accuracy"]) - float(full["accuracy"]))
    assert float(rows[2]["vs_baseline"]) == pytest.approx(float(rows[2]["accuracy"]) - float(rows[1]["accuracy"]))
    assert plotted == [(tmp_path / "fine.png", (False, True, "weights.safetensors"))]


def test_eval_vlm_page_evaluates_the_page_vlm_on_test_pages_with_its_defaults(tmp_path, monkeypatch):
    """--page: the page VLM built, held-out sparse pages asked (not Fashion-MNIST questions), every default page
    method at every default page fraction of the 144 tokens (not the image defaults)."""
    tool = load_tool("eval_vlm")
    built, evaluated = [], []

    class Pages(_Questions):
        made = []

        def __init__(self, split, size, seed=0):
            Pages.made.append((split, size, seed))
            self.size = size

    monkeypatch.setattr(tool, "FashionQA", lambda *args, **kwargs: pytest.fail("Fashion-MNIST questions asked"))
    monkeypatch.setattr(tool, "SparsePageQA", Pages)
    monkeypatch.setattr(tool, "create_reference_vlm", lambda **kwargs: built.append(kwargs) or (_grid_model((12, 12)),
                                                                                             "t"))
    monkeypatch.setattr(tool, "evaluate", lambda model, tokenizer, data, method, tokens, *args, **kwargs: (
        evaluated.append((method, tokens)) or ({"method": method or "all tokens", "visual_tokens": tokens,
                                                "accuracy": 50.0, "prefill_s": 1.0}, [True, False])))
    monkeypatch.setattr(tool, "save_plot", lambda *args: None)
    assert tool.main(["--page", "--questions", "2", "--seed", "4", "--out", str(tmp_path / "pages")]) == 0
    assert built[0]["page"] and not built[0]["fine"] and Pages.made == [("test", 2, 4)]
    assert evaluated == [(None, 144)] + [(method, max(1, round(share * 144))) for method in tool.PAGE_METHODS
                                         for share in tool.PAGE_FRACTIONS]


def test_eval_vlm_tunes_on_training_questions(monkeypatch):
    """--tune calibrates on ``batches`` batches of the training split (with --seed), each batch's prompts and its
    normalised images, at the asked share: tuning on the test questions would grade the pick on what it was picked
    on."""
    import vistok.models.reference_vlm as vlm_module

    tool = load_tool("eval_vlm")
    _Questions.made, tuned = [], []
    monkeypatch.setattr(tool, "FashionQA", _Questions)
    monkeypatch.setattr(vlm_module, "prompt_batch", lambda model, tokenizer, questions: (questions, len(questions),
                                                                                        None))
    monkeypatch.setattr(vistok, "tune", lambda model, batches, **kwargs: tuned.append((batches, kwargs)) or "pick")
    assert tool.tune_on_training_questions("m", "t", False, 0.3, 4, 2, 9) == "pick"
    assert _Questions.made == [("train", 8, 9)]
    (batches, kwargs), = tuned
    assert kwargs["target"] == 0.3 and [b["input_ids"] for b in batches] == [[f"q{2 * i}", f"q{2 * i + 1}"]
                                                                              for i in range(4)]
    data = _Questions("train", 8)
    for i, batch in enumerate(batches):
        expected = tool.normalised([data.example(2 * i), data.example(2 * i + 1)])
        assert torch.equal(batch["pixel_values"], expected)


def test_eval_vlm_overhead_is_each_methods_median_over_the_unpatched_median(monkeypatch):
    """``keep_everything_overhead``: each method patched with keep=1.0 and removed again, timed ``runs`` times,
    its overhead the median of its prefills over the unpatched median, less 1. Catches the ratio inverted, a mean or
    the first run for the median, a method left patched."""
    tool = load_tool("eval_vlm")
    seconds = {"unpatched": [2.0, 4.0, 3.0], "pool": [6.0, 3.0, 4.5], "dominant": [3.0, 3.3, 9.0]}
    current, log = ["unpatched"], []

    def patch(model, method, **budget):
        assert budget == {"keep": 1.0} and current == ["unpatched"]
        current[0] = method
        log.append(method)
        return types.SimpleNamespace(remove=lambda: current.__setitem__(0, "unpatched"))

    monkeypatch.setattr(tool, "patch", patch)
    monkeypatch.setattr(tool, "prefill_seconds", lambda *args: seconds[current[0]].pop(0))
    rows = tool.keep_everything_overhead(None, None, _Questions("test", 4), ["pool", "dominant"], 2, 3)
    assert log == ["pool", "dominant"] * 3 and current == ["unpatched"]
    assert [(r["method"], r["prefill_s"]) for r in rows] == [("unpatched", 3.0), ("pool", 4.5), ("dominant", 3.3)]
    assert [r["overhead"] for r in rows] == pytest.approx([0.0, 4.5 / 3.0 - 1, 3.3 / 3.0 - 1])


def test_eval_video_qa_evaluate_counts_what_each_question_kept(monkeypatch):
    """One row of eval_video_qa.py: visual tokens and frames are the means of what each question's compression
    kept, accuracy ignores case, per kind too; question ``i`` draws from ``question_generator(seed, i)`` (the same
    draw for every budget); answers go in batches of the compressed features in order; total_s sums the stages.
    Catches the tokens read from the wrong axis, the seed left out, an answer batch shifted."""
    tool = load_tool("eval_video_qa")
    kept = [(5, 2), (7, 3), (3, 1), (9, 4)]  # (tokens, frames) per question
    drawn, answered = [], []

    def compress(encoded, config, selector, asked, scores, generator):
        drawn.append(generator.initial_seed())
        tokens, frames = kept[encoded]
        return types.SimpleNamespace(tokens=torch.zeros(tokens, 4), frames=list(range(frames)))

    def answer(model, tokenizer, images, questions, features):
        answered.append((list(questions), [f.shape[0] for f in features]))
        return types.SimpleNamespace(answers=[q.upper() if q != "q2" else "no" for q in questions],
                                     total_seconds=0.5)

    monkeypatch.setattr(tool, "compress_video", compress)
    monkeypatch.setattr(tool, "answer_questions", answer)
    questions = [{"encoded": i, "question": f"q{i}", "answer": f"q{i}", "kind": ("a", "b")[i % 2],
                  "decode": 0.1 * i, "encode_s": 0.2} for i in range(4)]
    config = tool.comparison_config("drop", 32)
    row, correct = tool.evaluate(None, None, questions, config, batch_size=3, seed=5)
    assert drawn == [tool.question_generator(5, i).initial_seed() for i in range(4)]
    assert answered == [(["q0", "q1", "q2"], [5, 7, 3]), (["q3"], [9])]
    assert correct == [True, True, False, True]
    assert row["selection"] == "drop" and row["budget"] == 32
    assert row["visual_tokens"] == pytest.approx(np.mean([t for t, _ in kept]))
    assert row["frames"] == pytest.approx(np.mean([f for _, f in kept]))
    assert row["accuracy"] == 75.0 and row["accuracy_a"] == 50.0 and row["accuracy_b"] == 100.0
    assert row["decode_s"] == pytest.approx(0.15) and row["encode_s"] == pytest.approx(0.2)
    assert row["answer_s"] == pytest.approx(1.0 / 4)
    assert row["total_s"] == pytest.approx(row["decode_s"] + row["encode_s"] + row["select_compress_s"] + 0.25)


def test_eval_video_qa_text_rows_compress_with_each_question_clip_scores(monkeypatch):
    """A text row hands each question's own CLIP scores to the compression and counts the time they took in
    select_compress_s; another selection hands none. Catches the scores dropped (text selection without them) or
    taken from another question, and their seconds left out of the row."""
    tool = load_tool("eval_video_qa")
    handed = []

    def compress(encoded, config, selector, asked, scores, generator):
        handed.append((config.selection, None if scores is None else float(scores[0])))
        return types.SimpleNamespace(tokens=torch.zeros(2, 4), frames=[0])

    monkeypatch.setattr(tool, "compress_video", compress)
    monkeypatch.setattr(tool, "answer_questions", lambda model, tokenizer, images, questions, features:
                        types.SimpleNamespace(answers=["yes"] * len(questions), total_seconds=0.0))
    questions = [{"encoded": i, "question": f"q{i}", "answer": "yes", "kind": None, "decode": 0.0, "encode_s": 0.0,
                  "text_scores": torch.full((4,), float(i + 1)), "text_scores_s": 100.0} for i in range(3)]
    text_row, _ = tool.evaluate(None, None, questions, tool.comparison_config("text", 16), batch_size=2)
    uniform_row, _ = tool.evaluate(None, None, questions, tool.comparison_config("uniform", 16), batch_size=2)
    assert handed == [("text", 1.0), ("text", 2.0), ("text", 3.0)] + [("uniform", None)] * 3
    assert 100.0 <= text_row["select_compress_s"] < 101.0 and uniform_row["select_compress_s"] < 1.0


def _without_the_model(monkeypatch, tool, videos, evaluate):
    """eval_video_qa.py's main with ``videos`` as its question set, every frame encoded to 9 zero tokens, ``evaluate``
    giving each row and no plot."""
    import vistok.video.fmnist_qa as fmnist_qa

    monkeypatch.setattr(fmnist_qa, "FashionVideoQA", videos)
    monkeypatch.setattr(tool, "encode_frames", lambda model, pixels: types.SimpleNamespace(
        tokens=torch.zeros(pixels.shape[0], 9, 4)))
    monkeypatch.setattr(tool, "evaluate", evaluate)
    monkeypatch.setattr(tool, "plot", lambda rows, path: None)


def test_eval_video_qa_hands_its_options_on(tmp_path, monkeypatch):
    """eval_video_qa.py's main: the test split with --seed and --questions, --seed and --batch-size reach every
    row, --merge-threshold the all+merge rows, --baseline the vs_baseline pairs and every frame's every token the
    vs_all ones. Catches an option replaced by its default (a --seed parsed and dropped drew every run's frames
    alike; --baseline drop compared with uniform)."""
    tool = load_tool("eval_video_qa")
    made, evaluated = [], []

    class Videos:
        images = None

        def __init__(self, split, size, seed=0):
            made.append((split, size, seed))

        def example(self, index):
            return types.SimpleNamespace(frames=lambda images: np.zeros((16, 28, 28), dtype=np.uint8),
                                         question=f"q{index}", answer="yes", kind="k")

    def evaluate(model, tokenizer, questions, config, batch_size, seed=0):
        call = len(evaluated)
        evaluated.append((config, batch_size, seed, len(questions)))
        hits = [(i + call) % 2 == 0 or i == call for i in range(len(questions))]
        return {"selection": config.selection, "budget": config.budget,
                "accuracy": 100 * sum(hits) / len(hits)}, hits

    _without_the_model(monkeypatch, tool, Videos, evaluate)
    assert tool.main(["--out", str(tmp_path / "qa"), "--questions", "4", "--seed", "5", "--batch-size", "2",
                      "--selections", "uniform", "drop", "all", "--budgets", "32", "--baseline", "drop",
                      "--merge-all", "--merge-threshold", "0.9"], model_and_tokenizer=(None, None)) == 0
    assert made == [("test", 4, 5)]
    assert [(c.selection, c.budget, size, seed, n) for c, size, seed, n in evaluated] == \
        [("uniform", 32, 2, 5, 4), ("drop", 32, 2, 5, 4), ("all", 32, 2, 5, 4), ("all", 144, 2, 5, 4),
         ("all", 32, 2, 5, 4)]
    merged = evaluated[-1][0]
    assert merged.merge_threshold == 0.9 and merged.merge_on == "summary" and merged.frames is None
    rows = list(csv.DictReader(open(tmp_path / "qa.csv")))
    assert [(r["selection"], int(r["budget"])) for r in rows] == [("uniform", 32), ("drop", 32), ("all", 32),
                                                                  ("all", 144), ("all+merge", 32)]
    accuracy = [float(r["accuracy"]) for r in rows]
    for row, value in zip(rows, accuracy, strict=True):
        if row is not rows[3]:
            assert float(row["vs_all"]) == pytest.approx(value - accuracy[3])
    assert float(rows[0]["vs_baseline"]) == pytest.approx(accuracy[0] - accuracy[1])
    assert rows[1]["vs_baseline"] == "" and rows[3]["vs_all"] == ""


def test_eval_video_qa_reads_at_most_questions_rows_of_a_manifest(tmp_path, monkeypatch):
    """--questions n with a manifest decodes its first n videos, a row without a kind read as kind None."""
    import vistok.video

    tool = load_tool("eval_video_qa")
    manifest = tmp_path / "test.json"
    manifest.write_text(json.dumps([{"video": f"v{i}.mp4", "question": f"q{i}", "answer": "yes"} for i in range(3)]))
    read = []
    monkeypatch.setattr(vistok.video, "read_video", lambda path, timeout: read.append(path) or torch.zeros(2))
    questions = tool.load_questions(types.SimpleNamespace(manifest=str(manifest), questions=2, seed=0))
    assert read == [tmp_path / "v0.mp4", tmp_path / "v1.mp4"]
    assert [(q["question"], q["kind"]) for q in questions] == [("q0", None), ("q1", None)]


def test_eval_video_qa_clip_scores_each_question_frames_for_the_text_rows(tmp_path, monkeypatch):
    """--clip loads the pretrained reference CLIP once; each question's frames (grey, repeated to 3 channels) are
    scored against that question's own text, and the text rows get those scores, whatever the budget. Catches the
    CLIP left unloaded or untrained, the scores taken for another question or on one channel, a text row scored
    without them."""
    import vistok.models

    tool = load_tool("eval_video_qa")
    loads, scored, seen = [], [], []

    class Videos:
        images = None

        def __init__(self, split, size, seed=0):
            pass

        def example(self, index):
            frames = np.full((16, 28, 28), 10 * index, dtype=np.uint8)
            return types.SimpleNamespace(frames=lambda images: frames, question=f"q{index}", answer="yes", kind="k")

    def text_scores(model, tokenizer, pixels, question):
        scored.append((model, tokenizer, tuple(pixels.shape), question, torch.equal(pixels[:, 0], pixels[:, 2])))
        return torch.full((pixels.shape[0],), float(len(scored)))

    def evaluate(model, tokenizer, questions, config, batch_size, seed=0):
        seen.append((config.selection, config.budget, [float(q["text_scores"][0]) for q in questions]))
        return {"selection": config.selection, "budget": config.budget, "accuracy": 50.0}, [True] * len(questions)

    _without_the_model(monkeypatch, tool, Videos, evaluate)
    monkeypatch.setattr(vistok.models, "create_clip", lambda **kwargs: loads.append(kwargs) or ("clip", "words"))
    monkeypatch.setattr(tool, "text_frame_scores", text_scores)
    assert tool.main(["--out", str(tmp_path / "qa"), "--questions", "3", "--selections", "text", "--budgets", "16",
                      "32", "--clip"], model_and_tokenizer=(None, None)) == 0
    assert loads == [{"pretrained": True}]
    assert [(model, words, question, same) for model, words, _, question, same in scored] == \
        [("clip", "words", f"q{i}", True) for i in range(3)]
    assert all(shape[1] == 3 for _, _, shape, _, _ in scored)
    assert seen == [("text", 16, [1.0, 2.0, 3.0]), ("text", 32, [1.0, 2.0, 3.0])]


def test_train_vlm_steps_read_their_own_examples_through_their_seeded_method(tmp_path, monkeypatch):
    """train_vlm.py's steps: step s reads training examples s * batch, ..., s * batch + batch - 1 of the --seed
    stream, seen through ``batch_method(s, --seed, ...)`` (patched for the step, removed after it); --lora-rank
    and the variant reach the model; --init warm-starts a fresh run and not a resumed one. Catches seed 0 drawn for
    every run, overlapping batches, the test split trained on, an option replaced by its default."""
    tool = load_tool("train_vlm")
    built, batches, patched, started, steps_info = [], [], [], [], []
    _Questions.made = []
    monkeypatch.setattr(tool, "FashionQA", _Questions)
    monkeypatch.setattr(tool, "create_reference_vlm", lambda **kwargs: built.append(kwargs) or (_grid_model(),
                                                                                             types.SimpleNamespace(
                                                                                                 pad_token_id=3)))
    monkeypatch.setattr(tool, "check_budgets_fit", lambda *args: None)
    monkeypatch.setattr(tool, "qa_batch", lambda tokenizer, examples, tokens, pad: batches.append(
        (list(examples), tokens, pad)) or {})
    monkeypatch.setattr(tool, "answer_loss", lambda model, batch: torch.tensor(1.0))
    monkeypatch.setattr(tool, "warm_start", lambda model, path: started.append(path) or ["projector"])
    monkeypatch.setattr(vistok, "patch", lambda model, name, **options: patched.append((name, options))
                        or _handle(patched, name))

    def train(model, run, step_loss):
        for step in range(6):
            steps_info.append(step_loss(step)[1])
        return 6

    monkeypatch.setattr(tool, "train_trained_tensors", train)
    methods, tokens = ["pool", "random_select"], [9, 4]
    argv = ["--out", str(tmp_path / "run"), "--batch-size", "2", "--seed", "3", "--compressed", "0.5",
            "--compress-methods", *methods, "--compress-tokens", *map(str, tokens), "--lora-rank", "4", "--fine",
            "--init", "image.safetensors"]
    assert tool.main(argv) == 0
    assert built == [{"lora_rank": 4, "language_model": None, "page": False, "fine": True}]
    assert _Questions.made == [("train", 10_000_000, 3)] and started == ["image.safetensors"]
    assert batches == [([2 * s, 2 * s + 1], 36, 3) for s in range(6)]
    plan = [tool.batch_method(s, 3, 0.5, methods, tokens) for s in range(6)]
    assert steps_info == [{"method": p} for p in plan]
    assert any(p is None for p in plan) and any(p is not None for p in plan)
    expected = []
    for p in plan:
        if p is not None:
            expected += [(p[0], p[1]), ("removed", p[0])]
    assert patched == expected
    assert tool.main([*argv, "--resume"]) == 0 and started == ["image.safetensors"]
    budgets = []  # each variant's default budgets (of 36, 144 and 196 tokens)
    monkeypatch.setattr(tool, "check_budgets_fit", lambda model, methods, tokens: budgets.append(tokens))
    monkeypatch.setattr(tool, "SparsePageQA", _Questions)
    for variant in ([], ["--page"], ["--fine"]):
        assert tool.main(["--out", str(tmp_path / "defaults"), "--batch-size", "2", *variant]) == 0
    assert budgets == [[24, 18, 12, 9, 6, 4], [72, 48, 36, 24, 16], [98, 64, 49, 32, 20, 12]]


def test_train_video_vlm_batch_plan_draws_each_selection_at_its_share():
    """batch_plan: --learned of the batches through the learned selector, --every with every frame's every token
    (FRAMES * 9, whatever the budget), the rest uniform or, with --clip, half of them CLIP-scored; a budget of
    --budgets; the same plan for the same step and seed, another for another seed."""
    tool = load_tool("train_video_vlm")
    budgets = [32, 64]
    plans = [tool.batch_plan(step, 0, 0.3, True, budgets, 0.2) for step in range(4000)]
    shares = {selection: sum(s == selection for s, _ in plans) / len(plans) for selection in
              ("learned", "all", "text", "uniform")}
    for selection, share in (("learned", 0.3), ("all", 0.2), ("text", 0.25), ("uniform", 0.25)):
        assert abs(shares[selection] - share) < 0.04, (selection, shares)
    assert {b for s, b in plans if s == "all"} == {tool.FRAMES * 9}
    assert all({b for s2, b in plans if s2 == s} == set(budgets) for s in ("learned", "text", "uniform"))
    assert plans == [tool.batch_plan(step, 0, 0.3, True, budgets, 0.2) for step in range(4000)]
    assert plans[:200] != [tool.batch_plan(step, 1, 0.3, True, budgets, 0.2) for step in range(200)]
    assert all(s != "text" for s, _ in (tool.batch_plan(step, 0, 0.3, False, budgets, 0.2) for step in range(500)))


def test_train_video_vlm_steps_follow_their_seeded_plan(tmp_path, monkeypatch):
    """train_video_vlm.py's steps: step s reads training videos s * batch, ... of the --seed stream, chooses its
    frames as ``batch_plan(s, --seed, --learned, ..., --every)`` says, with that step's generator and the
    --merge-on / --merge-threshold config, and logs what it did. Catches --learned and --every swapped, the
    generator or the data drawn without the seed, the test split trained on."""
    tool = load_tool("train_video_vlm")
    made, compressed, read, logged = [], [], [], []

    class Videos:
        def __init__(self, split, size, seed=0):
            made.append((split, size, seed))

        def __getitem__(self, index):
            return index, f"q{index}", "yes"

    def compress(video, config, selector, asked, scores, generator):
        compressed.append((video, config, asked is not None, generator.initial_seed()))
        return types.SimpleNamespace(tokens=torch.zeros(3, 4))

    def train(model, run, step_loss):
        logged.extend(step_loss(step)[1] for step in range(8))
        return 8

    model = types.SimpleNamespace(train=lambda: None, frame_selector="selector")
    monkeypatch.setattr(tool, "FashionVideoQA", Videos)
    monkeypatch.setattr(tool, "create_video_vlm", lambda **kwargs: (model, types.SimpleNamespace(pad_token_id=0)))
    monkeypatch.setattr(tool, "encode_videos", lambda model, videos: read.append(list(videos)) or list(videos))
    monkeypatch.setattr(tool, "question_embeddings", lambda model, tokenizer, questions: questions)
    monkeypatch.setattr(tool, "compress_video", compress)
    monkeypatch.setattr(tool, "answer_batch", lambda *args: {})
    monkeypatch.setattr(tool, "encoded_features", lambda model, features: features)
    monkeypatch.setattr(tool, "answer_loss", lambda model, batch: torch.tensor(1.0))
    monkeypatch.setattr(tool, "train_trained_tensors", train)
    assert tool.main(["--out", str(tmp_path / "run"), "--batch-size", "2", "--seed", "3", "--learned", "0.5",
                      "--every", "0.2", "--budgets", "32", "64", "--merge-on", "selection", "--merge-threshold",
                      "0.9"]) == 0
    assert made == [("train", 10_000_000, 3)] and read == [[2 * s, 2 * s + 1] for s in range(8)]
    plans = [tool.batch_plan(s, 3, 0.5, False, [32, 64], 0.2) for s in range(8)]
    assert [(info["selection"], info["budget"]) for info in logged] == plans
    assert len({selection for selection, _ in plans}) > 1
    expected = tool.comparison_config
    assert [(video, config, asked, seed) for video, config, asked, seed in compressed] == \
        [(2 * s + i, expected(plan, budget, "selection", 0.9), plan == "learned", 3 * 1_000_003 + s)
         for s, (plan, budget) in enumerate(plans) for i in range(2)]


def test_tune_reference_reports_the_unpatched_and_the_picks_test_accuracy(tmp_path, monkeypatch):
    """tune_reference.py: the tuner calibrates on the first --images training images, with --flops-images; the
    pick's top-1 is measured patched with its config and the unpatched top-1 unpatched, both on the first
    --test-images test images; the tuner's files and the report are written under the model's name. Catches the
    splits or the two rows swapped, an option replaced by its default."""
    tool = load_tool("tune_reference")
    splits = {"train": (torch.full((30, 28, 28), 10, dtype=torch.uint8), torch.zeros(30, dtype=torch.long)),
              "test": (torch.arange(20, dtype=torch.uint8)[:, None, None].expand(20, 28, 28), torch.arange(20))}
    state, tuned, measured, saved = {"patched": None}, [], [], []

    class Result:
        config, best, seconds, images_scored, rows = "picked", {"label": "pool", "gflops_ratio": 0.4,
                                                                 "score": 0.9}, 1.5, 6, [1, 2, 3]

        def save(self, path):
            saved.append(str(path))

        def plot(self, path):
            saved.append(str(path))

    class Patched:
        def __init__(self, model, config):
            self.config = config

        def __enter__(self):
            state["patched"] = self.config

        def __exit__(self, *args):
            state["patched"] = None

    monkeypatch.setattr(tool.timm, "create_model", lambda name, pretrained: torch.nn.Identity())
    monkeypatch.setattr(tool, "load_fashion_mnist", lambda split: splits[split])
    monkeypatch.setattr(vistok, "tune", lambda model, calibration, **kwargs: tuned.append((calibration, kwargs))
                        or Result())
    monkeypatch.setattr(vistok, "patch", Patched)
    monkeypatch.setattr(tool, "test_top1", lambda model, images, labels: measured.append(
        (state["patched"], images.clone(), labels.clone())) or (70.0 if state["patched"] else 90.0))
    out = tmp_path / "tune"
    assert tool.main(["--images", "8", "--targets", "0.5", "--flops-images", "3", "--test-images", "12", "--out",
                      str(out)]) == 0
    (calibration, kwargs), = tuned
    assert kwargs["target"] == 0.5 and kwargs["flops_images"] == 3
    assert torch.equal(calibration, tool.GreyBatchTransform()(splits["train"][0][:8]))
    assert [patched for patched, _, _ in measured] == [None, "picked"]
    for _, images, labels in measured:
        assert torch.equal(images, splits["test"][0][:12]) and torch.equal(labels, splits["test"][1][:12])
    report = json.loads((tmp_path / "tune_vistok_vit_fmnist.json").read_text())
    assert report["unpatched_test_top1"] == 90.0 and report["calibration_images"] == 8
    assert report["targets"] == [{"target": 0.5, "pick": "pool", "gflops_ratio": 0.4, "calibration_agreement": 0.9,
                                  "test_top1": 70.0, "tuner_seconds": 1.5, "images_scored": 6, "candidates": 3}]
    assert saved == [f"{out}_vistok_vit_fmnist_0.5.json", f"{out}_vistok_vit_fmnist_0.5.png"]


def test_make_video_qa_hands_its_options_to_the_writer(tmp_path, monkeypatch):
    """make_video_qa.py writes --size videos of --split with --seed from --fmnist-root into --out."""
    tool = load_tool("make_video_qa")
    written = []
    monkeypatch.setattr(tool, "write_dataset", lambda *args: written.append(args) or "manifest.json")
    assert tool.main(["--out", str(tmp_path / "qa"), "--split", "train", "--size", "5", "--seed", "4",
                      "--fmnist-root", "fm"]) == 0
    assert written == [(str(tmp_path / "qa"), "train", 5, 4, "fm")]


def test_eval_pages_ink_is_at_least_one_percent_dark_and_kept_on_ink_counts_kept_tokens(monkeypatch):
    """eval_pages.py: a patch is ink with at least 1 % of its pixels darker than mid-grey (4 of 400 is, 3 is not);
    kept_on_ink is the share of the kept tokens (not of all) that fall on ink."""
    tool = load_tool("eval_pages")
    views = torch.ones(1, 1, 20, 40)
    views[0, 0, :4, 0] = 0.2  # 4 of the first patch's 400 pixels
    views[0, 0, :3, 20] = 0.2  # 3 of the second's
    assert tool.ink_patches(views, 20).tolist() == [[True, False]]
    ink = torch.tensor([[True, False, True, False], [False, False, True, True]])
    kept = [torch.tensor([0, 1, 2]), torch.tensor([3])]
    assert tool.kept_on_ink(kept, ink) == 3 / 4


def test_eval_pages_hands_its_options_on(tmp_path, monkeypatch):
    """eval_pages.py's main on a small drawn page: --layer reaches the tower's signals and every config, --seed the
    random tokens of both random rows, --similarity and --repeats the compressor; ``saved`` is the share of the
    page's tokens left out; the uniform row has no budget-ink correlation (its budgets differ by rounding only).
    The density row's budgets are the compressor's, every row at keep spends round(keep * all) tokens, and the
    compressor's rows report their crops' budget-ink correlation. Catches an option replaced by its default,
    ``saved`` reporting the kept share, density budgets from the redundant counts, ink misaligned with the budgets."""
    from PIL import Image

    tool = load_tool("eval_pages")
    page = np.full((96, 160), 255, dtype=np.uint8)
    page[10:40, 10:70] = 0
    page[60:70, 100:150] = 0
    Image.fromarray(page).save(tmp_path / "drawn.png")
    layers, seeds, configs = [], [], []
    signals, random_kept, compress = tool.view_signals, tool.random_kept, tool.compress_views
    ink_patches = tool.ink_patches
    inks = []
    monkeypatch.setattr(tool, "ink_patches", lambda *args: inks.append(ink := ink_patches(*args)) or ink)
    monkeypatch.setattr(tool, "view_signals", lambda model, views, layer: layers.append(layer) or signals(
        model, views, layer))
    monkeypatch.setattr(tool, "random_kept", lambda budgets, per_view, seed: seeds.append((seed, budgets)) or
                        random_kept(budgets, per_view, seed))
    monkeypatch.setattr(tool, "compress_views", lambda signals, config, *args: configs.append(
        (config, result := compress(signals, config, *args))) or result)
    out = tmp_path / "pages"
    assert tool.main(["--out", str(out), "--pages", str(tmp_path / "drawn.png"), "--model", "vit_tiny_patch16_224",
                      "--crop-size", "64", "--keep", "0.4", "--layer", "-2", "--seed", "7", "--similarity", "0.8",
                      "--repeats", "3"]) == 0
    assert layers == [-2] and [seed for seed, _ in seeds] == [7, 7] and len(configs) == 3
    assert all((c.layer, c.similarity, c.repeats) == (-2, 0.8, 3) for c, _ in configs)
    assert torch.equal(seeds[0][1], configs[1][1].budgets)  # density budgets: exactly the compressor's
    rows = list(csv.DictReader(open(tmp_path / "pages.csv")))
    for row in rows:
        assert float(row["saved"]) == pytest.approx(1 - int(row["tokens"]) / int(row["tokens_all"]))
    assert {int(row["tokens"]) for row in rows[1:]} == {round(0.4 * int(rows[0]["tokens_all"]))}
    # the compressor's rows: the correlation of each crop's budget with its share of ink patches, the global view
    # (view 0) left out, computed here from the spied budgets and ink
    (ink,) = inks
    correlations = [float(torch.corrcoef(torch.stack([result.budgets[1:].float(), ink[1:].float().mean(-1)]))[0, 1])
                    for _, result in configs]
    assert any(not math.isnan(value) for value in correlations)
    assert [float(row["crop_budget_ink_corr"]) for row in rows[:3]] == pytest.approx(correlations, nan_ok=True)
    # 45 tokens over 7 views: the uniform budgets are 7 or 6 by rounding, and no correlation is reported for them
    assert rows[-1]["method"] == "uniform budgets, random tokens" and rows[-1]["crop_budget_ink_corr"] == "nan"


def test_train_vlm_seeds_draw_disjoint_streams():
    """batch_method: run --seed 1 does not see run --seed 0's batches one step later (a step seed of seed + step
    shared every draw between neighbouring seeds, random_select's seeds included)."""
    batch_method = load_tool("train_vlm").batch_method
    methods, tokens = ["random_select"], [9]
    seeds = {seed: {o["seed"] for _, o in (batch_method(step, seed, 1.0, methods, tokens) for step in range(100))}
             for seed in (0, 1)}
    assert len(seeds[0]) == len(seeds[1]) == 100 and not seeds[0] & seeds[1]
