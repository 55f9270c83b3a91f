"""tools/benchmark.py and tools/bench_video.py: what each figure measures and how the tool computes it, checked
against spies (the options handed on, the model measured, the decoder's arguments) and figures computed again in the
test, on tiny models, stubbed decoders and a scripted clock: no figure is compared with a number from a run."""

import json
import statistics
from types import SimpleNamespace

import pytest
import torch
from helpers import load_tool
from timm import create_model

import vistok
from vistok.measure import tokens_per_block
from vistok.measure.bench import BenchReport, Variant, VariantResult
from vistok.measure.throughput import Timing


def tiny_vit(name, **kwargs):
    """``name``'s geometry (patch 16 at 224 px: 196 patches, 12 blocks) at width 32: cheap to build and run."""
    return create_model(name, embed_dim=32, num_heads=2, **kwargs)


def scripted_report(model_name, variants, batch_size):
    """The report of a benchmark whose first variant halves the FLOPs (and runs faster) and whose other variants
    keep every FLOP (and run slower); each result's timing its own."""
    runs = [(0.4, 0.5, 0.9)] + [(0.2, 0.25, 0.1)] + [(0.6, 0.55, 0.7 + i) for i in range(len(variants) - 1)]
    gflops = [4.0, 2.0] + [4.0] * (len(variants) - 1)
    results = [VariantResult(v.label, v.method, dict(v.options), [1.0], g, Timing(batch_size, s), None, None)
               for v, g, s in zip([Variant("unpatched"), *variants], gflops, runs, strict=True)]
    return BenchReport(str(model_name), batch_size, (224, 224), "bfloat16", "cpu", 1, 3, 0, results)


@pytest.mark.parametrize("figure", ["ats", "merge", "super_token", "videomae"])
def test_benchmark_hands_on_its_options_and_summarises_each_report(figure, monkeypatch, tmp_path, capsys):
    """Each model of a figure is benchmarked with the figure's variants and the options given (a batch size, runs,
    warm-up, device, dtype or --flops-images replaced by a default, or the wrong model, would time another run);
    each summary line is the report's figures (GFLOPs ratio patched / unpatched, speedup = the baseline's median time
    over the variant's, overhead = time ratio - 1) and the JSON holds every model's report (a swapped or inverted
    ratio, or a second model's report replacing the first's, would show)."""
    tool = load_tool("benchmark")
    calls = []

    def recorded(model_name, variants, **options):
        calls.append((model_name, variants, options))
        return scripted_report(options.get("label", model_name), variants, options["batch_size"])

    monkeypatch.setattr(tool, "run_benchmark", recorded)
    out = tmp_path / "figures.json"
    assert tool.main([figure, "--batch-size", "3", "--runs", "2", "--warmup", "0", "--device", "cpu:0",
                      "--dtype", "bfloat16", "--flops-images", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    options = dict(batch_size=3, runs=2, warmup=0, device="cpu:0", dtype=torch.bfloat16, flops_images=2)
    if figure == "videomae":
        from transformers import VideoMAEConfig

        config = VideoMAEConfig()  # VideoMAE-Base: 16 frames of 224 px, tubelets of 2 frames x 16 x 16 px
        shape = (config.num_frames, config.num_channels, config.image_size, config.image_size)
        tokens = config.num_frames // config.tubelet_size * (config.image_size // config.patch_size) ** 2
        assert tool.VIDEOMAE_TOKENS == tokens
        assert calls == [(tool._videomae_base, tool.VIDEOMAE_VARIANTS,
                          {**options, "input_shape": shape, "label": "VideoMAE-Base 16x224"})]
    else:
        assert calls == [(name, variants, options) for name, variants in tool.FIGURES[figure]]
    record = json.loads(out.read_text())
    assert (record["device"], record["dtype"]) == ("cpu:0", "bfloat16")
    reports = [scripted_report(options.get("label", name), variants, 3) for name, variants, options in calls]
    written = [json.loads(json.dumps(report.to_dict(), default=str)) for report in reports]
    assert record[figure] == (written[0] if figure == "videomae" else written)
    for report in reports:
        assert report.format_table() in printed
        base = statistics.median(report.baseline.timing.seconds)
        fast, *slow = report.results[1:]
        ratio, speedup = fast.gflops / report.baseline.gflops, base / statistics.median(fast.timing.seconds)
        assert (f"-> {fast.label}: GFLOPs ratio {ratio:.3f}, speedup {speedup:.3f}x, speedup / FLOPs reduction = "
                f"{speedup * ratio:.3f}") in printed
        for result in slow:
            overhead = statistics.median(result.timing.seconds) / base - 1
            assert f"-> {result.label}: overhead {overhead * 100:+.1f}% time" in printed


def test_benchmark_all_runs_every_figure_stvit_and_memory_on_the_cpu(monkeypatch, tmp_path):
    """``all`` is every vision figure, STViT and memory (each of them left out would be missing from the JSON);
    stvit and memory are recorded as CPU float32 whatever --device and --dtype say."""
    tool = load_tool("benchmark")
    benchmarked = []
    monkeypatch.setattr(tool, "run_benchmark", lambda name, variants, **options: benchmarked.append(name) or
                        scripted_report(name, variants, options["batch_size"]))
    monkeypatch.setattr(tool, "_stvit", lambda: {"stvit": "rows"})
    monkeypatch.setattr(tool, "_memory", lambda: [{"memory": "rows"}])
    out = tmp_path / "all.json"
    assert tool.main(["all", "--batch-size", "2", "--runs", "1", "--dtype", "float16", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert benchmarked == [name for figure in tool.FIGURES.values() for name, _ in figure]
    assert all(len(record[figure]) == len(tool.FIGURES[figure]) for figure in tool.FIGURES)
    assert record["stvit"] == {"device": "cpu", "dtype": "float32", "rows": {"stvit": "rows"}}
    assert record["memory"] == {"device": "cpu", "dtype": "float32", "rows": [{"memory": "rows"}]}
    assert "videomae" not in record and record["dtype"] == "float16"


def test_benchmark_keep_everything_variants_keep_every_token():
    """The 'keep-everything' ATS variants (the patched path's overhead) keep all tokens of the model they are
    listed with, in every block: without their min_tokens, adaptive ATS keeps fewer and the overhead figure
    measures a reduction. VideoMAE's (too slow to run here) keeps at least its VIDEOMAE_TOKENS, which the option
    test checks against VideoMAE-Base's shape."""
    tool = load_tool("benchmark")
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for name, variants in tool.FIGURES["ats"]:
        torch.manual_seed(0)
        model = tiny_vit(name).eval()
        assert model.patch_embed.num_patches == tool.PATCHES
        (keep,) = [variant for variant in variants if "keep-everything" in variant.label]
        with vistok.patch(model, keep.method, **keep.options):
            assert tokens_per_block(model, images) == [tool.PATCHES + 1.0] * len(model.blocks)
    (keep,) = [variant for variant in tool.VIDEOMAE_VARIANTS if "keep-everything" in variant.label]
    assert keep.options["k"] == tool.VIDEOMAE_TOKENS and keep.options.get("min_tokens", 0) >= tool.VIDEOMAE_TOKENS


def test_benchmark_memory_rows_are_each_variants_peak_over_the_unpatched_peak(monkeypatch):
    """Each row is the peak of the model patched with that variant's options, over the unpatched model's peak on
    the same batch of the size asked for (a ratio inverted, options dropped, another batch or the unpatched peak in
    the patched column would show); a spy stands in for peak_memory and records what it measured."""
    tool = load_tool("benchmark")
    built = []
    monkeypatch.setattr(tool.timm, "create_model", lambda name: built.append(tiny_vit(name)) or built[-1])
    expected_config = {}
    for variant in tool.MEMORY_VARIANTS:
        with vistok.patch(tiny_vit("vit_small_patch16_224"), variant.method, **variant.options) as handle:
            expected_config[variant.label] = repr(handle.config)
    measured = []

    def peak(model, images):
        handle = vistok.get_handle(model)
        expected = torch.randn(images.shape[0], 3, 224, 224, generator=torch.Generator().manual_seed(0))
        assert model is built[0] and torch.equal(images, expected)
        measured.append((images.shape[0], None if handle is None else repr(handle.config)))
        return 1000 * len(measured) + 7

    monkeypatch.setattr(vistok.measure, "peak_memory", peak)
    rows = tool._memory("vit_small_patch16_224", (2, 3))
    assert len(built) == 1 and vistok.get_handle(built[0]) is None
    value = {call: 1000 * (index + 1) + 7 for index, call in enumerate(measured)}
    assert len(value) == len(measured) == 2 * (1 + len(tool.MEMORY_VARIANTS))
    assert len(rows) == 2 * len(tool.MEMORY_VARIANTS)
    for row in rows:
        patched = value[(row["batch_size"], expected_config[row["variant"]])]
        unpatched = value[(row["batch_size"], None)]
        assert (row["peak_bytes"], row["unpatched_peak_bytes"]) == (patched, unpatched)
        assert row["ratio"] == pytest.approx(patched / unpatched) and row["model"] == "vit_small_patch16_224"
    assert [(row["batch_size"], row["variant"]) for row in rows] == [
        (size, variant.label) for size in (2, 3) for variant in tool.MEMORY_VARIANTS]


def test_benchmark_stvit_rows_count_parameters_and_multiply_accumulates(monkeypatch):
    """GMACs are half the FLOP count (papers' 'GFLOPs' are MACs) of one 224 px image, parameters every parameter's
    elements; here on a one-convolution stand-in whose MACs are counted by hand."""
    tool = load_tool("benchmark")
    names = []
    stem = lambda name: names.append(name) or torch.nn.Conv2d(3, 8, 16, stride=16, bias=False)  # noqa: E731
    monkeypatch.setattr(tool.timm, "create_model", stem)
    rows = tool._stvit()
    macs = 14 * 14 * 8 * 3 * 16 * 16  # one output value per position and channel, a 3 x 16 x 16 kernel each
    assert names == list(tool.PAPER_STVIT)
    for name, (paper_params, paper_gmacs) in tool.PAPER_STVIT.items():
        assert rows[name] == {"params": 8 * 3 * 16 * 16, "gmacs": pytest.approx(macs / 1e9),
                              "paper_params": paper_params, "paper_gmacs": paper_gmacs}


class ScriptedDecoding:
    """Stands in for read_video and the clock: every timed full read of a (backend, in-process or child) pair takes
    the next of its scripted durations; a read of ``num_frames`` frames (the warm-up) takes no time."""

    FRAMES = 250
    DURATIONS = {("decord", True): [0.1, 0.5, 0.2], ("decord", False): [0.3, 0.3, 0.9],
                 ("pyav", True): [1.0, 0.4, 0.45], ("pyav", False): [0.6, 2.0, 0.7]}

    def __init__(self):
        self.now, self.calls = 0.0, []

    def perf_counter(self):
        return self.now

    def read_video(self, path, num_frames=None, backend="auto", timeout=10.0):
        key = (backend, timeout is None)
        self.calls.append((path, num_frames, *key))
        if num_frames is None:
            timed = sum(1 for call in self.calls if call[1] is None and call[2:] == key)
            self.now += self.DURATIONS[key][timed - 1]
        return torch.zeros(num_frames or self.FRAMES, 1)


def test_bench_video_decode_rates_are_frames_over_the_median_time(monkeypatch, tmp_path, capsys):
    """Each backend is timed in this process (no timeout: no child) and through the killable child (a timeout),
    --repeats times after a warm-up; a rate is the frames read over the median time (not the mean), and the ratios
    printed are child / in-process and decord / PyAV."""
    tool = load_tool("bench_video")
    decoding = ScriptedDecoding()
    monkeypatch.setattr(tool, "read_video", decoding.read_video)
    monkeypatch.setattr(tool, "time", SimpleNamespace(perf_counter=decoding.perf_counter))
    out = tmp_path / "video.json"
    assert tool.main(["decode", "--repeats", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rates = json.loads(out.read_text())["decode_frames_per_s"]
    for (backend, in_process), seconds in ScriptedDecoding.DURATIONS.items():
        where = "in-process" if in_process else "child process"
        assert rates[f"{backend} {where}"] == pytest.approx(ScriptedDecoding.FRAMES / statistics.median(seconds))
        timed = [call for call in decoding.calls if call[2:] == (backend, in_process)]
        assert [call[1] for call in timed] == [2, None, None, None]  # a warm-up, then --repeats timed reads
        assert {call[0] for call in timed} == {tool.CLIPS / "bikes.mp4"}
    median = {key: statistics.median(seconds) for key, seconds in ScriptedDecoding.DURATIONS.items()}
    for backend in ("decord", "pyav"):
        ratio = median[(backend, True)] / median[(backend, False)]
        assert f"-> {backend}: the killable child process gives {ratio:.2f}x the in-process" in printed
    assert f"-> decord / PyAV in-process: {median[('pyav', True)] / median[('decord', True)]:.2f}x" in printed


def test_bench_video_loader_counts_the_clips_loaded_per_second(monkeypatch, tmp_path):
    """The loader figure lists --clips copies of the two clips (labels alternating), loads them as 16 x 4 dense
    training clips in batches of 4 with --workers workers, and reports the clips loaded over the time taken;
    ``all`` runs the decode figure too."""
    tool = load_tool("bench_video")
    seen = {}

    class Dataset:
        def __init__(self, videos, sampling, transform, train):
            seen.update(sampling=sampling, train=train, size=transform.size, train_transform=transform.train)
            seen["videos"] = [(sample.path.name, sample.label, sample.path.read_bytes()) for sample in videos.samples]
            self.length = len(videos)

    def loader(dataset, batch_size, num_workers, collate_fn):
        seen.update(batch_size=batch_size, num_workers=num_workers)
        return [{"labels": list(range(min(batch_size, dataset.length - start)))}
                for start in range(0, dataset.length, batch_size)]

    clock = iter([10.0, 14.0])
    monkeypatch.setattr(tool, "VideoClipDataset", Dataset)
    monkeypatch.setattr(tool, "DataLoader", loader)
    monkeypatch.setattr(tool, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(tool, "_decode", lambda repeats: {"repeats": repeats})
    out = tmp_path / "video.json"
    assert tool.main(["all", "--clips", "5", "--workers", "0", "--repeats", "2", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["decode_frames_per_s"] == {"repeats": 2}
    assert record["loader"] == {"clips_per_s": pytest.approx(5 / 4.0), "clips": 5, "workers": 0}
    clips = [(tool.CLIPS / name).read_bytes() for name in ("bikes.mp4", "carphone_pristine.mp4")]
    assert seen.pop("videos") == [(f"clip{i}.mp4", i % 2, clips[i % 2]) for i in range(5)]
    assert seen == {"sampling": vistok.video.ClipSampling("dense", 16, 4), "train": True, "size": 224,
                    "train_transform": True, "batch_size": 4, "num_workers": 0}
