"""What the tools pass to the work they run and how they compute their figures from it: tools/bench_samplers.py
(processors, speculative decoding, repeated n-grams), tools/sweep.py, tools/demo.py, tools/eval.py and
tools/make_video_data.py, with spies and tiny stand-ins in place of the long runs."""

import argparse
import csv
import json
import statistics
import types

import pytest
import timm
import torch
from helpers import ROOT, load_tool

import vistok
from vistok import samplers


def _repeats(tokens, n):
    """The share of a sequence's n-grams that appeared earlier in it, counted one by one."""
    seen, repeated, total = set(), 0, 0
    for start in range(len(tokens) - n + 1):
        gram = tuple(tokens[start:start + n])
        repeated += gram in seen
        seen.add(gram)
        total += 1
    return repeated / total if total else 0.0


def test_processor_settings_pair_each_vistok_processor_with_the_same_hugging_face_warper():
    """Each processor is timed against the Hugging Face warper that computes the same thing, with the same argument:
    a swapped class name or argument (top-k 50 against TopKLogitsWarper(40)) would time two different filters."""
    from transformers.generation import logits_process as hf

    bench = load_tool("bench_samplers")
    generator = torch.Generator().manual_seed(0)
    tail = (0.7 / 299 * (1 + 0.01 * torch.rand(2, 299, generator=generator))).log()
    likely = torch.cat([torch.full((2, 1), 0.3).log(), tail], 1)  # the most likely token is the least typical
    for logits in (bench.synthetic_logits("normal", 3, 2000), bench.synthetic_logits("peaked", 3, 2000), likely):
        ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
        for name, (ours, hf_name, value) in bench.PROCESSOR_SETTINGS.items():
            mine, theirs = ours(ids, logits.clone()), getattr(hf, hf_name)(value)(ids, logits.clone())
            assert torch.equal(mine.isinf(), theirs.isinf()), name
            torch.testing.assert_close(mine[~mine.isinf()], theirs[~theirs.isinf()], msg=name)
            kept = (~theirs.isinf()).sum(-1)
            assert name == "temperature" or logits is likely or bool((kept < 2000).any()), name  # each one filters


def test_bench_processors_times_each_pair_interleaved_on_the_asked_logits(monkeypatch):
    """A fake clock and spy processors: each side is timed on the --batch x --vocab logits of each --logits kind,
    at least --runs times and 0.5 s, in alternating order, and the row gives the medians (not means) with the ratio
    vistok / Hugging Face. Catches a reversed ratio, means, a dropped alternation or a run count ignored."""
    from transformers.generation import logits_process as hf

    bench = load_tool("bench_samplers")
    clock, calls = [0.0], []

    class Spy:
        def __init__(self, side, costs):
            self.side, self.costs, self.count = side, costs, 0

        def __call__(self, ids, logits):
            calls.append((self.side, ids.shape, logits.clone(), self.costs[self.count % len(self.costs)]))
            clock[0] += calls[-1][-1]
            self.count += 1
            return logits

    ours_costs, theirs_costs = [0.01, 0.01, 0.05], [0.04, 0.02, 0.02]  # medians 10 and 20 ms, means otherwise
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "PROCESSOR_SETTINGS", {"top_k": (Spy("ours", ours_costs), "SpyWarper", 7)})
    made = []
    monkeypatch.setattr(hf, "SpyWarper", lambda value: made.append(value) or Spy("theirs", theirs_costs),
                        raising=False)
    args = argparse.Namespace(batch=3, vocab=11, logits=["peaked", "normal"], runs=120)
    report = bench.bench_processors(args)
    assert made == [7, 7] and report["batch"] == 3 and report["vocab"] == 11
    assert [row["logits"] for row in report["rows"]] == ["peaked", "normal"]
    for row in report["rows"]:
        assert row["processor"] == "top_k"
        assert row["vistok_ms"] == pytest.approx(10) and row["hf_ms"] == pytest.approx(20)
        assert row["ratio"] == pytest.approx(0.5)
    half = len(calls) // 2  # the peaked kind's calls, then the normal kind's
    for kind, part in (("peaked", calls[:half]), ("normal", calls[half:])):
        expected = bench.synthetic_logits(kind, 3, 11)
        assert all(shape == (3, 1) and torch.equal(logits, expected) for _, shape, logits, _ in part)
        timed = [side for side, _, _, _ in part[2:]]  # after the warm-up pair
        assert timed.count("ours") == timed.count("theirs") >= 120
        firsts = [timed[i] for i in range(0, len(timed), 2)]
        assert all(timed[i] != timed[i + 1] for i in range(0, len(timed), 2))  # one of each per pair
        assert all(a != b for a, b in zip(firsts[:-1], firsts[1:], strict=True))  # which one goes first alternates
    calls.clear()  # one run asked for: each side runs until it has been timed for 0.5 s, and no pair longer
    bench.PROCESSOR_SETTINGS["top_k"][0].costs = [0.05, 0.05, 0.01]  # vistok the slower one here
    bench.bench_processors(argparse.Namespace(batch=3, vocab=11, logits=["normal"], runs=1))
    timed = calls[2:]
    spent = {side: sum(cost for who, _, _, cost in timed if who == side) for side in ("ours", "theirs")}
    before = {side: sum(cost for who, _, _, cost in timed[:-2] if who == side) for side in ("ours", "theirs")}
    assert min(spent.values()) > 0.5 - 1e-9 and min(before.values()) < 0.5 + 1e-9  # (sums as the clock adds)


def test_repeated_ngrams_is_the_share_of_ngrams_seen_before():
    """Against a count made one n-gram at a time (a window off by one, or 1 - share, would differ)."""
    bench = load_tool("bench_samplers")
    generator = torch.Generator().manual_seed(0)
    cases = [[1, 2, 1, 2, 1], [5, 5, 5, 5], [1, 2, 3], [7], []]
    cases += [torch.randint(0, 4, (length,), generator=generator).tolist() for length in (6, 9, 20)]
    for tokens in cases:
        for n in (1, 2, 3, 4):
            assert bench.repeated_ngrams(tokens, n) == pytest.approx(_repeats(tokens, n)), (tokens, n)
    assert bench.repeated_ngrams([1, 2, 1, 2, 1], 2) == pytest.approx(0.5)


class _Tokenizer:
    """A chat template that gives each question its own ids (its length and first characters)."""

    all_special_ids = [0, 1]
    eos_token_id = 1

    def __len__(self):
        return 500

    def apply_chat_template(self, messages, add_generation_prompt, return_tensors):
        text = messages[0]["content"]
        return torch.tensor([[2, len(text), *(ord(c) for c in text[:3])]])


def _fields(config):
    return tuple(getattr(config, key) for key in ("temperature", "min_p", "top_h", "top_k", "top_p", "typical_p",
                                                  "epsilon", "eta"))


def _sampled(name, index, tokens):
    """A made-up generation, different for each sampler and prompt."""
    generator = torch.Generator().manual_seed(sum(map(ord, name)) * 10 + index)
    return torch.randint(0, 3 + len(name) % 4, (1, tokens), generator=generator)


def test_bench_repetition_scores_each_samplers_new_tokens(monkeypatch):
    """The rows are the mean over prompts of repeated_ngrams of each generation's new tokens (not the prompt's),
    for each sampler's own config, with no EOS stop, --tokens tokens and the prompt's index as its seed."""
    bench = load_tool("bench_samplers")
    configs = {"pure sampling": {}, "typical 0.9": {"typical_p": 0.9}, "typical 0.2": {"typical_p": 0.2},
               "top-p 0.9": {"top_p": 0.9}}
    calls = []

    def generate(model, prompt, config, max_new_tokens, seeds, eos_token_id=-1):
        calls.append((config, max_new_tokens, seeds.tolist(), eos_token_id))
        (name,) = [name for name, fields in configs.items() if _fields(config) == _fields(samplers.SamplingConfig(
            **fields))]
        index = len([c for c in calls if _fields(c[0]) == _fields(config)]) - 1
        new = _sampled(name, index, max_new_tokens)
        return types.SimpleNamespace(new_tokens=new, sequences=torch.cat([prompt, new], 1))

    monkeypatch.setattr(bench.samplers, "generate", generate)
    report = bench.bench_repetition(argparse.Namespace(prompts=3, tokens=12), "model", _Tokenizer())
    assert [row["sampler"] for row in report["rows"]] == list(configs)
    assert all(c[1:] == (12, [i % 3], None) for i, c in enumerate(calls)) and len(calls) == 12
    for row in report["rows"]:
        for n in (2, 3, 4):
            expected = statistics.mean(_repeats(_sampled(row["sampler"], i, 12)[0].tolist(), n)
                                       for i in range(3))
            assert row[f"rep{n}"] == pytest.approx(expected), (row["sampler"], n)
    assert report["prompts"] == 3 and report["tokens"] == 12


def test_bench_speculative_builds_each_draft_and_reports_its_own_stats(monkeypatch):
    """Spies for the drafts, the decoders and the plain decoder: each row's draft (layers, dtype, int8, VocabTrim's
    ids), K-SEQ draft count and gamma; its acceptance and tokens per target call are the means of its decoder's
    stats, ms / token and the speedup come from its own seconds and new tokens, and every decoder gets --tokens and
    the prompt's seed."""
    bench = load_tool("bench_samplers")
    drafts, decoders, plain_calls, trims = [], {}, [], []

    def self_draft(model, num_layers=None, dtype=None, quantize=None):
        drafts.append(("self", num_layers, dtype, quantize))
        return drafts[-1]

    class Trim:
        size, token_ids = 33, torch.tensor([0, 1, 5])

        @classmethod
        def from_generations(cls, model, calibration, size, **kwargs):
            trims.append((size, kwargs["config"].temperature, len(calibration)))
            return cls()

        def draft(self, model, num_layers=None, dtype=None, quantize=None):
            return ("trim", num_layers, dtype, quantize)

        def coverage(self, ids):
            return 0.5

    class Decoder:
        def __init__(self, model, draft, gamma, num_drafts, config, draft_vocab):
            self.draft, self.gamma, self.k, self.vocab, self.runs = draft, gamma, num_drafts, draft_vocab, []
            decoders[len(decoders)] = self

        def generate(self, prompt, max_new_tokens, seeds):
            self.runs.append((max_new_tokens, seeds.tolist()))
            number, index = list(decoders.values()).index(self), len(self.runs)
            return types.SimpleNamespace(stats={"seconds": 0.01 * (number + 1) * index, "new_tokens": 5 + index,
                                                "acceptance_rate": 0.1 * number + 0.01 * index,
                                                "tokens_per_target_call": 1 + number + 0.5 * index})

    def generate(model, prompt, config, max_new_tokens, seeds):
        plain_calls.append((max_new_tokens, seeds if isinstance(seeds, int) else seeds.tolist()))
        return types.SimpleNamespace(stats={"seconds": 0.02 * len(plain_calls), "new_tokens": max_new_tokens})

    class Model:
        def generate(self, prompt, max_new_tokens, **kwargs):
            return torch.cat([prompt, torch.zeros(1, max_new_tokens, dtype=torch.long)], 1)

    for name, value in (("self_draft", self_draft), ("VocabTrim", Trim), ("SpeculativeDecoder", Decoder),
                        ("generate", generate)):
        monkeypatch.setattr(bench.samplers, name, value)
    costs = []
    monkeypatch.setattr(bench, "forward_costs", lambda *args: costs.append(args) or dict.fromkeys(
        ("target_1", "target_block", "bf16_1", "int8_1"), 1.0))
    args = argparse.Namespace(temperature=0.7, prompts=2, layers=3, trim_size=33, gamma=5, tokens=9)
    report = bench.bench_speculative(args, Model(), _Tokenizer())
    assert trims == [(33, 0.7, len(bench.CALIBRATION_QUESTIONS))]
    bf16, int8 = ("self", None, torch.bfloat16, None), ("self", None, torch.bfloat16, "int8")
    expected = {  # name: (draft, VocabTrim ids or none, drafts per step)
        "first 3 layers": (("self", 3, None, None), False, 1),
        "first 3 layers + VocabTrim 33": (("trim", 3, None, None), True, 1),
        "bf16 copy": (bf16, False, 1), "bf16 copy + VocabTrim 33": (("trim", None, torch.bfloat16, None), True, 1),
        "bf16 copy, K-SEQ k=2": (bf16, False, 2), "int8 weights": (int8, False, 1),
        "int8 weights + VocabTrim 33": (("trim", None, torch.bfloat16, "int8"), True, 1),
        "int8 weights, K-SEQ k=2": (int8, False, 2)}
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["plain (vistok.samplers.generate)", "Hugging Face generate", *expected]
    plain_ms = statistics.mean([0.02 * 2 / 9, 0.02 * 3 / 9]) * 1e3  # the first plain call is the warm-up
    assert plain_calls[1:] == [(9, [0]), (9, [1])] and rows["plain (vistok.samplers.generate)"]["speedup"] == 1
    assert rows["plain (vistok.samplers.generate)"]["ms_per_token"] == pytest.approx(plain_ms)
    assert rows["plain (vistok.samplers.generate)"]["acceptance"] is None
    for number, (name, (draft, trimmed, k)) in enumerate(expected.items()):
        decoder = decoders[number]
        assert decoder.draft == draft and decoder.k == k and decoder.gamma == 5, name
        assert (decoder.vocab is Trim.token_ids) if trimmed else decoder.vocab is None, name
        assert decoder.runs == [(9, [0]), (9, [1])], name
        row = rows[name]
        ms = statistics.mean(0.01 * (number + 1) * i / (5 + i) for i in (1, 2)) * 1e3
        assert row["ms_per_token"] == pytest.approx(ms) and row["speedup"] == pytest.approx(plain_ms / ms), name
        assert row["acceptance"] == pytest.approx(0.1 * number + 0.015), name
        assert row["tokens_per_target_call"] == pytest.approx(1 + number + 0.75), name
    (cost,) = costs
    assert cost[1] == {"bf16": bf16, "int8": int8} and cost[3] == 5
    assert report["gamma"] == 5 and report["tokens"] == 9 and report["prompts"] == 2 and report["trim_size"] == 33


def test_bench_samplers_main_writes_every_part_it_ran(tmp_path, monkeypatch):
    """``all`` runs the three parts on one loaded model and writes each to --json; ``processors`` loads no model;
    --threads sets torch's threads and the arguments reach the parts."""
    bench = load_tool("bench_samplers")
    seen, loads, threads = {}, [], []
    for part in ("processors", "speculative", "repetition"):
        monkeypatch.setattr(bench, f"bench_{part}", lambda args, *model, part=part: seen.setdefault(part, (
            args, model)) and {"part": part})
    monkeypatch.setattr(bench.samplers, "load_smollm2", lambda: loads.append(1) or ("model", "tokenizer"))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    out = tmp_path / "deep" / "samplers.json"
    assert bench.main(["all", "--json", str(out), "--threads", "3", "--runs", "2", "--tokens", "5", "--prompts",
                       "1", "--vocab", "77", "--batch", "4", "--logits", "peaked"]) == 0
    written = json.loads(out.read_text())
    assert written["torch"] == torch.__version__ and threads == [3] and loads == [1]
    assert {part: written[part] for part in seen} == {part: {"part": part} for part in seen} and len(seen) == 3
    args = seen["processors"][0]
    assert (args.runs, args.vocab, args.batch, args.logits, args.tokens, args.prompts) == (2, 77, 4, ["peaked"], 5, 1)
    assert seen["speculative"][1] == seen["repetition"][1] == ("model", "tokenizer")
    seen.clear()
    assert bench.main(["processors", "--json", str(out)]) == 0
    assert list(seen) == ["processors"] and loads == [1] and set(json.loads(out.read_text())) == {"torch",
                                                                                                  "processors"}


def test_demo_best_swept_point_is_the_most_accurate_patched_one_within_the_target(tmp_path, capsys):
    """read_sweeps keeps the unpatched row once (the first file's), every patched row of every file, as numbers;
    best_swept takes the most accurate patched row at or below the target ratio (never the unpatched one)."""
    demo = load_tool("demo")
    header = "method,label,top1,gflops,gflops_ratio,top1_change\n"
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text(header + "unpatched,full,90,2.0,1.0,0\nats,k=64,80,1.0,0.5,-10\nmerge,r=8,85,1.5,0.75,-5\n")
    second.write_text(header + "unpatched,full,91,2.0,1.0,0\nats_fusion,k=64,82,0.9,0.45,-8\n")
    rows = demo.read_sweeps([first, tmp_path / "missing.csv", second])
    assert "no sweep at" in capsys.readouterr().out
    assert [(r["method"], r["top1"]) for r in rows] == [("unpatched", 90.0), ("ats", 80.0), ("merge", 85.0),
                                                        ("ats_fusion", 82.0)]
    assert all(isinstance(r[key], float) for r in rows for key in ("gflops", "top1", "gflops_ratio"))
    assert demo.best_swept(rows, 0.5)["method"] == "ats_fusion"
    assert demo.best_swept(rows, 0.75)["method"] == "merge"  # at the target counts
    assert demo.best_swept(rows, 1.0)["method"] == "merge"  # the unpatched row is not a pick
    assert demo.best_swept(rows, 0.4) is None


def test_make_video_data_passes_its_counts_seed_and_root(tmp_path, monkeypatch, capsys):
    """The training and test counts, the seed and --fmnist-root reach write_dataset in its order."""
    tool = load_tool("make_video_data")
    written = []
    monkeypatch.setattr(tool, "write_dataset", lambda *args: written.append(args) or tmp_path / "out")
    argv = ["--out", str(tmp_path / "out"), "--train", "12", "--test", "7", "--seed", "5", "--fmnist-root", "fm"]
    assert tool.main(argv) == 0
    assert written == [(str(tmp_path / "out"), 12, 7, 5, "fm")]
    assert "wrote 12 + 7 clips" in capsys.readouterr().out
    assert tool.main(["--out", str(tmp_path / "x")]) == 0 and written[-1][1:] == (24_000, 4_000, 0, None)


def test_eval_reports_the_run_it_measured(tmp_path, monkeypatch):
    """eval.py's JSON: the model, method and options of the config, the count of images FLOPs were counted on (all
    12 there are, fewer than eval.flops_images; it said 30), and the throughput timed with eval.throughput_runs runs
    on a batch of eval.throughput_batch."""
    evaluate = load_tool("eval")
    timed = []
    time_models = evaluate.time_models
    monkeypatch.setattr(evaluate, "time_models", lambda models, sample, **kwargs: timed.append(
        (sample.shape[0], kwargs)) or time_models(models, sample, **kwargs))
    out = tmp_path / "e.json"
    assert evaluate.main(["pretrained=false", "model_kwargs.depth=1", "data.limit=12", "method=ats",
                          "method_options.k=20", "eval.flops_images=30", "eval.batch_size=5", "eval.throughput_batch=4",
                          "eval.throughput_runs=2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "vistok_vit_fmnist" and result["method"] == "ats"
    assert result["method_options"] == {"k": 20} and result["images"] == 12
    assert result["flops_images"] == 12 and result["throughput_batch"] == 4  # the 12 images there are, not 30
    assert timed == [(4, {"warmup": 1, "runs": 2})]
    assert result["gflops"] > 0


def test_sweep_evaluates_each_point_on_its_own_inputs_and_plots_the_rows_it_wrote(tmp_path, monkeypatch):
    """The downsampled point is evaluated on its downsampled images (evaluated at the native size, its top-1 was the
    unpatched one's), flops_images is the count of images counted (fewer than sweep.flops_images here), and the
    plot is drawn from the rows the CSV holds, per image."""
    sweep = load_tool("sweep")
    evaluate, shapes, plotted = sweep.evaluate, [], []

    def evaluated(model, labelled, prepare, **kwargs):
        shapes.append(tuple(prepare(next(iter(labelled))[0]).shape))
        return evaluate(model, labelled, prepare, **kwargs)

    monkeypatch.setattr(sweep, "evaluate", evaluated)
    monkeypatch.setattr(sweep, "save_pareto_plot", lambda path, rows, title, unit: plotted.append((rows, unit)))
    out = tmp_path / "sweep"
    assert sweep.main(["--config", str(ROOT / "configs/sweep_fmnist.yaml"), "--out", str(out), "pretrained=false",
                       "model_kwargs.depth=1", "data.limit=4", "sweep.ats_k=[]", "sweep.ats_fixed_k=[]",
                       "sweep.ats_fusion_k=[]", "sweep.random_k=[]", "sweep.merge_r=[2]", "sweep.input_sizes=[20]",
                       "sweep.flops_images=6", "sweep.batch_size=4", "data.workers=0"]) == 0
    assert shapes == [(4, 1, 28, 28), (4, 1, 28, 28), (4, 1, 20, 20)]
    written = list(csv.DictReader(open(out.with_suffix(".csv"))))
    ((rows, unit),) = plotted
    assert unit == "image" and [row["method"] for row in written] == ["unpatched", "merge", "downsample"]
    assert [(row["method"], row["label"]) for row in rows] == [(row["method"], row["label"]) for row in written]
    assert {row["flops_images"] for row in written} == {"4"}  # the 4 images there are, not the 6 asked for
    for row, line in zip(rows, written, strict=True):
        assert row["top1"] == pytest.approx(float(line["top1"])) and row["gflops"] == pytest.approx(
            float(line["gflops"]))


def test_video_sweep_reads_the_fewer_frames_clips_and_plots_per_clip(monkeypatch):
    """The fewer-frames point reads its clips at its own frame count (the others at data.num_frames), and the
    video sweep's plot is per clip."""
    sweep = load_tool("sweep")
    frames, plotted = {}, []
    monkeypatch.setattr(sweep, "run_point", lambda config, point, clips, transform: frames.setdefault(
        point["method"], clips[0][0].shape[1]) and {"method": point["method"], "label": point["label"], "top1": 1.0,
                                                    "gflops": 1.0})
    monkeypatch.setattr(sweep, "save_pareto_plot", lambda path, rows, title, unit: plotted.append(unit))
    monkeypatch.setattr(sweep, "write_rows", lambda *args: None)
    assert sweep.main(["--config", str(ROOT / "configs" / "sweep_fmnist_video.yaml"), "--out", "unused",
                       f"data.root={ROOT / 'data' / 'fmnist_clips_sample'}", "data.workers=0", "sweep.ats_k=[100]",
                       "sweep.ats_fixed_k=[]", "sweep.merge_r=[]", "sweep.random_k=[]", "sweep.num_frames=[2]"]) == 0
    assert frames == {"unpatched": 4, "ats": 4, "fewer_frames": 2} and plotted == ["clip"]


def test_demo_prints_each_variants_figures_from_its_own_run(tmp_path, monkeypatch, capsys):
    """Spies on the evaluations, FLOP counts, timings and the tuner: each printed row holds its own variant's top-1,
    GFLOPs (counted on --flops-images images) and speed, each ratio is to the unpatched row, and the tuner's figure
    is the top-1 of the model patched with its pick (--target and training images reach the tuner)."""
    demo = load_tool("demo")
    evaluated, counted, tuned = [], [], []
    evaluate = demo.evaluate
    monkeypatch.setattr(demo, "evaluate", lambda *args, **kwargs: evaluated.append(evaluate(*args, **kwargs)) or
                        evaluated[-1])
    monkeypatch.setattr(demo, "count_flops", lambda model, images: counted.append(  # a made-up count per variant
        (images.shape[0], 1.25e9 * (5 - len(counted)))) or counted[-1][1])
    speeds = {"unpatched": 100.0, "ATS k=108": 150.0, "ATS+fusion k=108": 130.0, "merge r=12": 210.0}
    monkeypatch.setattr(demo, "time_models", lambda models, sample, **kwargs: {
        label: types.SimpleNamespace(images_per_s=speeds[label]) for label in models})
    monkeypatch.setattr(vistok, "tune", lambda model, calibration, target: tuned.append((calibration, target)) or
                        types.SimpleNamespace(config=("merge", {"r": 20}), seconds=1.0, rows=[{}],
                                              best={"label": "merge r=20", "gflops_ratio": 0.4}))
    built = []  # the shipped model's architecture, 3 blocks deep and untrained: the figures only need to be its own
    monkeypatch.setattr(demo, "timm", types.SimpleNamespace(create_model=lambda name, pretrained: built.append(
        (name, pretrained)) or timm.create_model(name, depth=3)))
    monkeypatch.setattr(demo, "save_overlay_grid", lambda path, *args, **kwargs: path)
    monkeypatch.setattr(demo, "save_pareto_plot", lambda path, *args, **kwargs: path)
    assert demo.main(["--limit", "8", "--flops-images", "4", "--calibration", "4", "--target", "0.4", "--out",
                      str(tmp_path), "--sweep", str(tmp_path / "none.csv")]) == 0
    printed = capsys.readouterr().out
    assert built == [("vistok_vit_fmnist_reg4", True)]
    assert len(evaluated) == 5 and [images for images, _ in counted] == [4] * 4
    assert "tokens_per_block" not in evaluated[0] and all("tokens_per_block" in r for r in evaluated[1:])
    top1_0, gflops_0 = evaluated[0]["top1"], counted[0][1] / 1e9
    for result, (_, flops), label in zip(evaluated, counted, speeds, strict=False):
        line = next(line for line in printed.splitlines() if line.startswith(f"{label}  "))
        gflops = flops / 1e9
        assert f"{result['top1']:>9.2f}{gflops:>12.3f}{speeds[label]:>9.0f}" in line, label
        assert f"({result['top1'] - top1_0:+.2f} top-1, {gflops / gflops_0:.2f}x GFLOPs, " \
               f"{speeds[label] / 100:.2f}x speed)" in line, label
    ((calibration, target),) = tuned
    assert target == 0.4 and calibration.shape == (4, 1, 28, 28)
    assert f"-> {evaluated[4]['top1']:.2f} % top-1 on 8 test images" in printed
    assert max(evaluated[4]["tokens_per_block"]) < 201  # measured patched with the tuner's pick
