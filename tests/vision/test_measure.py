"""FLOPs that count attention, tokens per block, throughput timing, and the `vistok bench` command."""

import json

import pytest
import timm
import torch
from helpers import make_images, make_model

import vistok
from vistok import InvalidConfigError
from vistok.cli import main
from vistok.measure import count_flops, time_models, tokens_per_block
from vistok.measure.bench import Variant, run_benchmark


def set_fused(model, fused):
    for block in model.blocks:
        block.attn.fused_attn = fused


def test_fused_attention_is_counted_like_unfused():
    model = make_model("vit")
    images = make_images(model, 2)
    fused = count_flops(model, images)
    set_fused(model, False)
    unfused = count_flops(model, images)
    assert abs(fused - unfused) <= 0.01 * unfused
    # and attention is really in there: the linear layers alone are 2 * 197 * 12 * (4 + 8) * 384^2
    linear_only = 2 * 197 * 12 * 12 * 384 ** 2
    assert fused > linear_only * 1.05


def test_fused_attention_of_fewer_queries_than_keys_is_counted_like_unfused():
    """Attention of M queries over N keys costs 2 matmuls of B * H * M * N * d multiply-adds, on the fused CPU
    kernel as on the unfused path; a count that took the keys' shape for the queries' counted N * N."""

    class Attention(torch.nn.Module):
        def __init__(self, fused: bool):
            super().__init__()
            self.fused = fused

        def forward(self, x):
            queries = x[:, :, :5]
            if self.fused:
                return torch.nn.functional.scaled_dot_product_attention(queries, x, x)
            return ((queries @ x.transpose(-2, -1)) * x.shape[-1] ** -0.5).softmax(-1) @ x

    x = torch.randn(1, 2, 20, 8)
    assert count_flops(Attention(True), x) == count_flops(Attention(False), x) == 2 * 2 * (1 * 2 * 5 * 20 * 8)


def test_open_clip_attention_is_counted_on_its_fused_fast_path_too():
    """open_clip's towers attend with nn.MultiheadAttention, whose no-grad fast path (even head counts) is one fused
    operator the counter has no formula for: the unpatched tower counted about half its FLOPs, so every patched
    ratio on open_clip was too high. The count is the hand count, and a merge that keeps everything counts the same."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    width, layers, tokens = 64, 4, 1 + 4 * 4
    tower = VisionTransformer(image_size=32, patch_size=8, width=width, layers=layers, heads=4, mlp_ratio=4.0,
                              output_dim=16).eval()
    images = torch.randn(2, 3, 32, 32)
    per_block = 2 * tokens * (4 * width * width + 2 * 4 * width * width) + 2 * 2 * tokens * tokens * width
    by_hand = 2 * 16 * 3 * 8 * 8 * width + layers * per_block + 2 * width * 16  # patch embed, blocks, projection
    assert count_flops(tower, images) == by_hand
    with vistok.patch(tower, "merge", r=0):
        assert count_flops(tower, images) == by_hand
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_patched_flops_average_over_images_and_shrink():
    model = make_model("vit")
    images = make_images(model, 3)
    unpatched = count_flops(model, images)
    patches = model.patch_embed.num_patches
    with vistok.patch(model, "ats", k=patches, min_tokens=patches):
        keep_all = count_flops(model, images)
    with vistok.patch(model, "ats", k=60, min_tokens=1):
        reduced = count_flops(model, images)
        per_image = [count_flops(model, image[None]) for image in images]
    # keep-everything only adds the O(N d) class-token row per sampling block
    assert unpatched <= keep_all <= unpatched * 1.01
    assert reduced == pytest.approx(sum(per_image) / 3)
    assert reduced < 0.6 * unpatched


def test_tokens_per_block_patched_and_unpatched():
    model = make_model("deit_distilled")
    images = make_images(model, 2)
    assert tokens_per_block(model, images) == [198.0] * 12
    with vistok.patch(model, "ats", k=100, blocks=[6]):
        counts = tokens_per_block(model, images)
    assert counts[:6] == [198.0] * 6 and max(counts[6:]) <= 102 and len(counts) == 12
    wrapped = torch.nn.Sequential(model)  # a wrapper: counted unpatched too (it was refused as unpatchable)
    assert tokens_per_block(wrapped, images) == [198.0] * 12
    with vistok.patch(model, "ats", k=100, blocks=[6]):
        assert tokens_per_block(wrapped, images) == counts
    # a forward that runs the blocks image by image: the mean over the images, one entry per block (it gave an
    # entry per block and image unpatched, and the last image's counts patched)
    one_by_one = lambda m, x: torch.cat([m(image[None]) for image in x])  # noqa: E731
    images = make_images(model, 3)
    assert tokens_per_block(model, images, one_by_one) == [198.0] * 12
    with torch.no_grad():  # sharper attention: adaptive ATS keeps different counts per image
        for block in (3, 6):
            model.blocks[block].attn.qkv.weight[: 2 * model.embed_dim].mul_(6)
    with vistok.patch(model, "ats", k=0.5, min_tokens=1, blocks=[3, 6]):
        batched = tokens_per_block(model, images)
        singles = [tokens_per_block(model, image[None]) for image in images]
        assert len({tuple(single) for single in singles}) > 1
        alone = tokens_per_block(model, images, one_by_one)
    assert alone == pytest.approx(batched) and alone == pytest.approx([sum(c) / 3 for c in zip(*singles, strict=True)])
    uneven_runs = lambda m, x: torch.cat([m(x[:1]), m(x[1:])])  # noqa: E731  runs of 1 and 2 images: weighted
    with vistok.patch(model, "ats", k=0.5, min_tokens=1, blocks=[3, 6]):
        assert tokens_per_block(model, images, uneven_runs) == pytest.approx(alone)
    with pytest.raises(vistok.UnsupportedModelError, match="cannot patch Linear"):
        tokens_per_block(torch.nn.Linear(2, 2), torch.zeros(1, 2))


    class Beside(torch.nn.Module):  # holds a ViT it never runs
        def __init__(self):
            super().__init__()
            self.unused, self.linear = model, torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.linear(x)

    with pytest.raises(vistok.UnsupportedModelError, match="did not run through the blocks"):
        tokens_per_block(Beside(), torch.zeros(1, 2))  # not [] (a ratio would divide by zero)


def test_time_models_interleaves_and_reports_median():
    model = torch.nn.Identity()
    calls = []
    timings = time_models({"a": model, "b": model}, torch.zeros(4, 1), warmup=1, runs=3,
                          progress=calls.append)
    assert calls[:2] == ["a: warm-up", "b: warm-up"] and calls[-1] == "b: run 3/3"
    assert len(timings["a"].seconds) == 3
    assert timings["a"].images_per_s == pytest.approx(4 / timings["a"].median_s)
    with pytest.raises(ValueError):
        time_models({"a": model}, torch.zeros(1), runs=0)


def test_speedup_is_the_variants_images_per_second_over_the_unpatched_models():
    """A variant that runs a batch in less time than the unpatched model has a speedup above 1, its images per second
    over the baseline's, in the report and its JSON (the inverse ratio reported a faster variant as slower)."""
    from vistok.measure.bench import BenchReport, VariantResult
    from vistok.measure.throughput import Timing

    base = VariantResult("unpatched", None, {}, [17.0], 1.0, Timing(8, (0.2, 0.25, 0.3)), None, None)
    fast = VariantResult("m", "merge", {"r": 2}, [9.0], 0.5, Timing(8, (0.1, 0.05, 0.2)), None, None)
    report = BenchReport("m", 8, (32, 32), "float32", "cpu", 1, 3, 0, [base, fast])
    expected = fast.timing.images_per_s / base.timing.images_per_s
    assert report.speedup(fast) == pytest.approx(expected) and expected > 1
    assert report.speedup(base) == 1.0
    assert [entry["speedup"] for entry in report.to_dict()["results"]] == pytest.approx([1.0, expected])


@pytest.mark.slow
def test_bench_command(tmp_path, capsys):
    """The options reach the benchmark: --warmup 0 was replaced by the default 3 warm-up runs (minutes on a large
    model), and the report said 3."""
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "vit_small_patch16_224", "--method", "ats", "-o", "k=108",
                 "--batch-size", "2", "--runs", "1", "--warmup", "0", "--no-progress", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "unpatched" in table and "ats tokens per block" in table and "after 0 warm-up" in table
    report = json.loads(out.read_text())
    assert report["warmup"] == 0 and report["runs"] == 1 and report["batch_size"] == 2
    patched = report["results"][1]
    assert patched["options"] == {"k": 108}
    assert patched["gflops_ratio"] < 0.75 and patched["tokens_per_block"][3] <= 109


def test_bench_command_hands_every_option_to_the_benchmark(monkeypatch):
    """What ``vistok bench`` parses is what the benchmark runs with: an option parsed and then replaced by its
    default (``--seed``, ``--warmup``, ``--flops-images``) reported a run that was not the one asked for."""
    import vistok.measure.bench as bench

    class Recorded(Exception):
        pass

    seen = {}

    def recorded(model_name, variants, **options):
        seen.update(options, model_name=model_name, variants=variants)
        raise Recorded

    monkeypatch.setattr(bench, "run_benchmark", recorded)
    with pytest.raises(Recorded):
        main(["bench", "--model", "vit_tiny_patch16_224", "--method", "merge", "-o", "r=2", "--batch-size", "4",
              "--runs", "2", "--warmup", "0", "--seed", "5", "--flops-images", "3", "--no-progress"])
    assert seen["model_name"] == "vit_tiny_patch16_224" and seen["variants"][-1].options == {"r": 2}
    assert (seen["batch_size"], seen["runs"], seen["warmup"], seen["seed"], seen["flops_images"]) == (4, 2, 0, 5, 3)
    assert seen["progress"] is False


def test_bench_command_compiled(tmp_path, capsys):
    """--compile times the compiled models (here dynamo with the eager backend: quick); merging nothing is the
    unpatched function, compiled too."""
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "vit_tiny_patch16_224", "--method", "merge", "-o", "r=0", "--batch-size", "2",
                 "--runs", "1", "--warmup", "0", "--no-progress", "--compile", "eager", "--attention", "flex",
                 "--json", str(out)])
    assert code == 0
    assert "compiled (eager, fullgraph)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["compiled"] == "eager" and report["attention"] == "flex"
    assert all(result["compile_s"] > 0 for result in report["results"])
    assert report["results"][1]["cosine_to_unpatched"] > 0.9999


def test_flex_patched_blocks_are_counted_on_the_sdpa_path():
    """The FLOP counter has no formula for FlexAttention: a model patched with attention="flex" is counted as on
    "sdpa" (the same attention), and keeps its path."""
    model = make_model("vit", depth=2)
    images = make_images(model, 2)
    with vistok.patch(model, "merge", r=8, attention="sdpa"):
        sdpa = count_flops(model, images)
    with vistok.patch(model, "merge", r=8, attention="flex") as handle:
        assert count_flops(model, images) == sdpa
        assert handle.attention == "flex"


def test_bench_takes_the_models_input_channels(capsys):
    """vistok's own reference model takes 1-channel 28 x 28 images."""
    code = main(["bench", "--model", "vistok_vit_fmnist", "--method", "merge", "-o", "r=8", "--batch-size", "2",
                 "--runs", "1", "--warmup", "0", "--no-progress"])
    assert code == 0 and "merge" in capsys.readouterr().out


def test_bench_command_bad_input(capsys):
    assert main(["bench", "--model", "vit_small_patch16_224", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "--model", "vit_small_patch16_224", "--method", "ats", "-o", "k=0"]) == 2
    capsys.readouterr()
    no_cuda = [(["--device", "cuda"], "this machine has no CUDA device")] if not torch.cuda.is_available() else []
    for flags, message in [*no_cuda, (["--method", "merge", "--attention", "flex"], "fused only compiled"),
                           (["--method", "merge", "--compile", "nope"], "unknown torch"),
                           (["--method", "merge", "--compile", "--attention", "flex"], "CPU inductor cannot"),
                           (["--method", "merge", "--compile", "--attention", "flex", "--device", "cpu:0"],
                            "CPU inductor cannot"),  # compiled for a minute, then an inductor traceback
                           (["-o", "r=2"], "needs --method"),
                           (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
                           (["--json", "/no/such/folder/x.json"], "no folder /no/such/folder"),
                           (["--method", "merge", "-o", "r=2", "-o", "r=3"], "-o r given more than once"),
                           (["--method", "merge", "--batch-size", "2", "--flops-images", "3"],
                            "from 1 to the batch size 2")]:
        assert main(["bench", "--model", "vit_small_patch16_224", *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["bench", "--model", "resnet18", "--batch-size", "1", "--runs", "1"]) == 2  # an AttributeError
    assert "resnet18 (ResNet) has no patch_embed" in capsys.readouterr().err
    for command in (["bench", "--model", "no_such_model"], ["tune", "--model", "no_such_model"]):
        assert main(command) == 2
        assert "unknown model 'no_such_model': not in timm's registry" in capsys.readouterr().err
    for flag, value in [("--flops-images", "0"), ("--batch-size", "-1"), ("--runs", "x")]:
        with pytest.raises(SystemExit):
            main(["bench", "--model", "vit_small_patch16_224", "--method", "merge", flag, value])
        assert f"{flag}: expected an integer >= 1, got '{value}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "vit_small_patch16_224", "--warmup", "-1"])
    assert "--warmup: expected an integer >= 0, got '-1'" in capsys.readouterr().err
    for command, flag, value, message in [("bench", "--seed", "-1", "expected an integer >= 0"),  # OverflowError:
                                          ("bench", "--seed", str(10**20), "expected a seed below 2**32"),
                                          ("video-qa", "--seed", str(10**20), "expected a seed below 2**32"),
                                          ("tune", "--images", "2", "expected an integer >= 4")]:  # after the loads
        required = {"bench": ["--model", "vit_small_patch16_224"], "tune": ["--model", "vit_small_patch16_224"],
                    "video-qa": ["--video", "v.mp4", "--question", "Is there a bag?"]}[command]
        with pytest.raises(SystemExit):
            main([command, *required, flag, value])
        assert f"{flag}: {message}" in capsys.readouterr().err
    assert main(["tune", "--model", "vit_tiny_patch16_224", "--folder", "/no/such/folder"]) == 2
    assert "vistok tune --folder /no/such/folder" in capsys.readouterr().err


def test_models_timm_loads_from_a_folder_are_benchmarked(tmp_path):
    """A local-dir: (or hf-hub:) name is no registry name, but timm loads it: vistok takes it too."""
    from timm.models._hub import save_for_hf

    saved = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10)
    save_for_hf(saved, str(tmp_path), model_args={"img_size": 32, "depth": 2, "num_classes": 10})
    report = run_benchmark(f"local-dir:{tmp_path}", [Variant("m", "merge", {"r": 2})], batch_size=2, runs=1,
                           warmup=0, progress=False)
    assert [result.label for result in report.results] == ["unpatched", "m"]


def test_a_model_that_outputs_its_tokens_is_benchmarked_without_agreement():
    """A model whose output is its token sequence (timm without pooling or head; VideoMAEModel's last_hidden_state)
    has no prediction to compare: a patched one is shorter, and the comparison crashed after the FLOPs were
    counted. Its cos and top-1 agreement are '-'."""
    def tokens_out():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0, global_pool="")

    report = run_benchmark(tokens_out, [Variant("m", "merge", {"r": 2})], batch_size=2, runs=1, warmup=0,
                           input_shape=(3, 32, 32), progress=False)
    assert [(r.cosine_to_unpatched, r.top1_agreement) for r in report.results] == [(None, None)] * 2
    row = next(line for line in report.format_table().splitlines() if line.startswith("m "))
    assert row.split()[-2:] == ["-", "-"] and report.results[1].gflops < report.results[0].gflops
    assert json.loads(json.dumps(report.to_dict()))["results"][1]["cosine_to_unpatched"] is None


def test_benchmark_variants_need_a_method_and_a_label_of_their_own():
    """Results are keyed by label: two variants under one label (or under 'unpatched', the baseline's) would show
    one's figures for the other."""
    for variants in ([Variant("x", "ats", {"k": 16}), Variant("x", "merge", {"r": 8})],
                     [Variant("unpatched", "ats", {"k": 16})], [Variant("none")]):
        with pytest.raises(InvalidConfigError, match="its own label other than 'unpatched'"):
            run_benchmark("vit_tiny_patch16_224", variants, progress=False)


def test_flops_of_a_model_with_an_attention_pool_head_that_requires_grad():
    """timm's MAP head (SigLIP) under torch's FLOP counter: counted like any other, and the parameters still
    require grad afterwards."""
    from helpers import make_images, make_model

    from vistok.measure import count_flops

    model = make_model("siglip_map", img_size=64, depth=2)
    flops = count_flops(model, make_images(model, 1))
    assert flops > 0 and all(p.requires_grad for p in model.parameters())


def test_paired_difference_is_the_mean_per_question_difference():
    """Against the statistics module on the per-question differences; pairing cancels what both runs share."""
    import random
    import statistics

    from vistok.measure.accuracy import paired_difference

    rng = random.Random(0)
    baseline = [rng.random() < 0.8 for _ in range(200)]
    hits = [b if rng.random() < 0.9 else not b for b in baseline]
    differences = [float(a) - float(b) for a, b in zip(hits, baseline, strict=True)]
    difference, error = paired_difference(hits, baseline)
    assert difference == pytest.approx(100 * statistics.mean(differences))
    assert error == pytest.approx(100 * statistics.stdev(differences) / len(hits) ** 0.5)
    unpaired = 100 * (statistics.pvariance(hits) / len(hits) + statistics.pvariance(baseline) / len(hits)) ** 0.5
    assert error < unpaired  # the runs agree on most questions
    assert paired_difference(baseline, baseline) == (0.0, 0.0)
    with pytest.raises(vistok.VistokError, match="same questions"):
        paired_difference(hits, baseline[:-1])
    with pytest.raises(vistok.VistokError, match="at least 2"):
        paired_difference([True], [False])


def test_paired_columns_compare_rows_with_the_reference_and_their_baseline():
    """vs_all against the reference row (not on it), vs_baseline against the baseline at the same tokens; neither
    on the baseline's own rows, twins included (pooling snaps two fractions to one budget)."""
    from vistok.measure.accuracy import add_paired_differences, paired_difference

    rows = [{"method": "all", "tokens": 9}, {"method": "pool", "tokens": 4}, {"method": "pool", "tokens": 4},
            {"method": "merge", "tokens": 4}, {"method": "merge", "tokens": 2}]
    hits = [[True, True, False], [True, False, False], [True, False, False], [False, True, True],
            [False, False, True]]
    add_paired_differences(rows, hits, 0, key=lambda row: (row["method"], row["tokens"]),
                           baseline=lambda row: ("pool", row["tokens"]))
    assert "vs_all" not in rows[0] and all("vs_all" in row for row in rows[1:])
    assert (rows[3]["vs_all"], rows[3]["vs_all_se"]) == paired_difference(hits[3], hits[0])
    assert (rows[3]["vs_baseline"], rows[3]["vs_baseline_se"]) == paired_difference(hits[3], hits[2])
    assert not any("vs_baseline" in rows[i] for i in (0, 1, 2, 4))  # no pool row at 9 or 2 tokens


def test_evaluate_averages_tokens_per_block_over_images_not_batches():
    """Batches of 4 images and 1 in which adaptive ATS keeps different counts: evaluate's tokens per block are the mean
    over the 5 images, as tokens_per_block counts them in one batch (a mean of the batch means weighted the lone
    image as much as the other four together)."""
    from vistok.measure.accuracy import evaluate

    model = make_model("vit", depth=4, img_size=64)  # 16 patches
    images = make_images(model, 5)
    labels = torch.zeros(5, dtype=torch.long)
    with torch.no_grad():  # sharper attention: adaptive ATS keeps different counts per image
        for block in (1, 2):
            model.blocks[block].attn.qkv.weight[: 2 * model.embed_dim].mul_(6)
    with vistok.patch(model, "ats", k=0.5, min_tokens=1, blocks=[1, 2]):
        assert tokens_per_block(model, images[:4]) != tokens_per_block(model, images[4:])
        result = evaluate(model, [(images[:4], labels[:4]), (images[4:], labels[4:])])
        assert result["tokens_per_block"] == pytest.approx(tokens_per_block(model, images))


def test_accuracy_refuses_labels_of_another_shape_and_nan_logits():
    """Labels [B, 1] broadcast to [B, B, k] and scored 100 % top-1 / 300 % top-5 for 25 %; NaN logits scored as
    the first classes (chance level) instead of failing."""
    from vistok.measure.accuracy import evaluate, topk_correct

    logits = torch.eye(6)[:4] * 5
    labels = torch.zeros(4, dtype=torch.long)
    assert evaluate(torch.nn.Identity(), [(logits, labels)])["top1"] == 25.0
    for bad, message in ((labels[:, None], r"labels \[B\], got logits \(4, 6\) and labels \(4, 1\)"),
                         (labels[:3], r"labels \(3,\)"), (labels.float(), "labels must be class ids"),
                         (labels.bool(), "labels must be class ids")):
        with pytest.raises(vistok.InputShapeError, match=message):
            evaluate(torch.nn.Identity(), [(logits, bad)])
    broken = logits.clone()
    broken[2] = float("nan")
    with pytest.raises(vistok.InputShapeError, match=r"NaN or \+inf logits \(rows \[2\]\)"):
        topk_correct(broken, labels)
    overflowed = torch.zeros(4, 6)
    overflowed[1, [0, 4]] = float("inf")  # an overflow: tied +inf ranked by topk's order, not the model's
    with pytest.raises(vistok.InputShapeError, match=r"NaN or \+inf logits \(rows \[1\]\)"):
        topk_correct(overflowed, labels)

    class Classifier(torch.nn.Module):  # a Hugging Face classifier returns an output with .logits
        def __init__(self, output):
            super().__init__()
            self.output = output

        def forward(self, x):
            return self.output(x)

    with_logits = Classifier(lambda x: type("Output", (), {"logits": x})())
    assert evaluate(with_logits, [(logits, labels)])["top1"] == 25.0  # an AttributeError before
    with pytest.raises(vistok.InputShapeError, match="neither logits nor an output with .logits"):
        evaluate(Classifier(lambda x: "logits"), [(logits, labels)])
    masked = logits.clone()
    masked[:, 5] = float("-inf")  # a class masked out is no error
    assert topk_correct(masked, labels) == topk_correct(logits, labels)
    for ids in ([0, 1, 6, 2], [0, -1, 0, 0]):  # a model for fewer classes: scored as misses
        with pytest.raises(vistok.InputShapeError, match=r"class ids in \[0, 6\)"):
            topk_correct(logits, torch.tensor(ids))


def test_benchmark_figures_agree_with_a_second_computation(monkeypatch):
    """Every figure of a report is computed again here from the same model and the seeded inputs: FLOPs on the first
    ``flops_images`` images, tokens per block, cosine and top-1 agreement per image (over the classes, not the batch)
    with the unpatched outputs, the image size, and the timing options handed to time_models (an ignored
    flops_images or seed, a wrong axis, or swapped runs and warm-up would show)."""
    import copy
    import statistics

    import torch.nn.functional as F

    import vistok.measure.bench as bench

    built, flops_inputs, timed = [], [], []

    def build():
        built.append(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval())
        return built[-1]

    count = bench.count_flops
    monkeypatch.setattr(bench, "count_flops", lambda model, images: flops_inputs.append(images) or count(model, images))
    time = bench.time_models
    monkeypatch.setattr(bench, "time_models", lambda models, images, **options: timed.append(
        (list(models), images, options, dict(models))) or time(models, images, **options))
    variants = [Variant("merge", "merge", {"r": 2}), Variant("ats", "ats", {"k": 2, "min_tokens": 1, "blocks": [0]})]
    report = run_benchmark(build, variants, batch_size=3, runs=2, warmup=1, seed=4, flops_images=2,
                           input_shape=(3, 32, 32), label="tiny", progress=False, attention="sdpa")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert len(built) == 1 and all(torch.equal(counted, images[:2]) for counted in flops_inputs)
    assert len(flops_inputs) == 3
    assert [(labels, options) for labels, _, options, _ in timed] == [
        (["unpatched", "merge", "ats"], {"warmup": 1, "runs": 2, "progress": timed[0][2]["progress"]})]
    assert torch.equal(timed[0][1], images) and report.attention == "sdpa"
    handles = [vistok.get_handle(model) for model in timed[0][3].values()]  # the models timed, patched as asked
    assert handles[0] is None and [handle.attention for handle in handles[1:]] == ["sdpa", "sdpa"]
    assert (report.model_name, report.batch_size, report.image_size, report.runs, report.warmup, report.dtype) == (
        "tiny", 3, (32, 32), 2, 1, "float32")
    base = built[0]
    with torch.no_grad():
        reference = base(images)
    data = report.to_dict()["results"]
    for result, entry, variant in zip(report.results, data, [Variant("unpatched"), *variants], strict=True):
        model = copy.deepcopy(base)
        with vistok.patch(model, variant.method, **variant.options) if variant.method else torch.no_grad():
            with torch.no_grad():
                output = model(images)
            assert result.tokens_per_block == pytest.approx(tokens_per_block(model, images))
            assert result.gflops == pytest.approx(count_flops(model, images[:2]) / 1e9)
        assert result.cosine_to_unpatched == pytest.approx(float(F.cosine_similarity(output, reference, dim=-1).mean()))
        assert result.top1_agreement == pytest.approx(float((output.argmax(-1) == reference.argmax(-1)).float().mean()))
        median = statistics.median(result.timing.seconds)
        assert len(result.timing.seconds) == 2 and entry["median_s"] == pytest.approx(median)
        assert entry["images_per_s"] == pytest.approx(3 / median)
        assert entry["gflops_ratio"] == pytest.approx(result.gflops / report.results[0].gflops)
    assert report.results[1].cosine_to_unpatched < 0.999 and report.results[2].top1_agreement < 1  # not vacuous


def test_benchmark_times_the_models_in_the_dtype_asked_for():
    """Outputs and timings come from the models in ``dtype`` (model and inputs both converted: either left in
    float32 fails), FLOPs are counted in float32 on the CPU: the same count as a float32 run's. ``flops_images``
    equal to the batch size is accepted (a ``<`` bound refused it) and counts what the default counts."""
    def build():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=5)

    options = dict(batch_size=2, runs=1, warmup=0, input_shape=(3, 32, 32), progress=False)
    half = run_benchmark(build, [Variant("m", "merge", {"r": 2})], dtype=torch.bfloat16, **options)
    full = run_benchmark(build, [Variant("m", "merge", {"r": 2})], **options)
    assert half.dtype == "bfloat16" and [r.gflops for r in half.results] == [r.gflops for r in full.results]
    assert half.results[1].cosine_to_unpatched is not None
    # flops_images may be the whole batch (the documented range is 1 to the batch size): the default's count
    whole = run_benchmark(build, [Variant("m", "merge", {"r": 2})], flops_images=2, **options)
    assert [r.gflops for r in whole.results] == [r.gflops for r in full.results]


def test_timing_is_the_median_and_recompile_limits_only_grow(monkeypatch):
    """A batch's time is the median of its runs (one slow run does not move it; the mean would); a negative warm-up is
    refused (it ran fewer passes and timed them all); allow_recompiles raises dynamo's cache limits to the entries
    asked for and never lowers one."""
    import statistics

    from vistok.measure.throughput import Timing, allow_recompiles

    timing = Timing(4, (0.1, 0.2, 0.9))
    assert timing.median_s == statistics.median(timing.seconds) and timing.images_per_s == pytest.approx(4 / 0.2)
    with pytest.raises(InvalidConfigError, match="warmup >= 0"):
        time_models({"a": torch.nn.Identity()}, torch.zeros(2, 1), warmup=-1, runs=2)
    limits = [name for name in ("cache_size_limit", "recompile_limit") if hasattr(torch._dynamo.config, name)]
    assert limits
    for name in limits:
        monkeypatch.setattr(torch._dynamo.config, name, 8)
    allow_recompiles(50)
    assert all(getattr(torch._dynamo.config, name) == 50 for name in limits)
    allow_recompiles(3)
    assert all(getattr(torch._dynamo.config, name) == 50 for name in limits)


def test_peak_memory_is_counted_without_autograd():
    """An inference pass keeps no tensors for a backward pass: with a parameter that requires grad, sin keeps its
    input alive under autograd (three [10, 10] floats at once instead of two)."""
    from vistok.measure import peak_memory

    class Sines(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(10))

        def forward(self, x):
            return (x * self.scale).sin().sin()

    model = Sines()
    assert peak_memory(model, torch.zeros(10, 10)) == 2 * 400
    with torch.enable_grad():
        assert peak_memory(model, torch.zeros(10, 10)) == 2 * 400


def test_peak_memory_counts_whole_storages():
    """A new tensor is counted by the storage it holds, not by its view's elements: a strided one (stride 4) of 10
    floats holds (10 - 1) x 4 + 1 floats (counting the view's 10 would undercount what the pass holds)."""
    from vistok.measure import peak_memory

    class Strided(torch.nn.Module):
        def forward(self, x):
            return x.new_empty_strided((10,), (4,))

    assert peak_memory(Strided(), torch.zeros(3)) == ((10 - 1) * 4 + 1) * 4


def test_tokens_per_block_of_unpatched_runs_at_several_sizes():
    """Unpatched, a forward that runs the blocks on inputs of different sizes (image by image, several views) gets
    each run's own counts, weighted by its images: runs of 1 image at 64 px (17 tokens) and 2 at 32 px (5 tokens)
    give (17 + 2 x 5) / 3 per block (the first run's counts, or an unweighted mean, would not)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, dynamic_img_size=True).eval()
    images = torch.randn(3, 3, 64, 64)
    views = lambda m, x: [m(x[:1]), m(F.interpolate(x[1:], size=32))]  # noqa: E731
    large, small = 1 + (64 // 16) ** 2, 1 + (32 // 16) ** 2
    assert tokens_per_block(model, images, views) == pytest.approx([(large + 2 * small) / 3] * 2)


def test_accuracy_counts_top5_applies_the_transform_and_evaluates_in_eval_mode():
    """top-5 counts the labels among the five best logits (ranked here by a sort), the transform turns each batch
    into model input, the model runs in eval mode (its own mode comes back), and paired differences need two
    questions (one is left alone, not an error)."""
    from vistok.measure.accuracy import add_paired_differences, evaluate, topk_correct

    logits = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 8
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)
    assert topk_correct(logits, labels, (1, 3, 5)) == {k: int((rank < k).sum()) for k in (1, 3, 5)}
    modes = []

    class Scores(torch.nn.Module):
        def forward(self, x):
            modes.append(self.training)
            return x

    model = Scores().train()
    result = evaluate(model, [(-logits[:12], labels[:12]), (-logits[12:], labels[12:])], transform=torch.neg)
    assert result == {"top1": 100 * int((rank < 1).sum()) / 20, "top5": 100 * int((rank < 5).sum()) / 20, "images": 20}
    assert modes == [False, False] and model.training
    rows = [{"name": "a"}, {"name": "b"}]
    add_paired_differences(rows, [[True], [False]], 0, key=lambda row: row["name"], baseline=lambda row: "a")
    assert rows == [{"name": "a"}, {"name": "b"}]
