"""vistok.tune: the pick stays within the GFLOPs target and is the best survivor of successive halving, the
search is deterministic and cheaper than scoring every candidate on every image, the saved pick patches the
model back to the score reported (also through vistok.config_from_saved), Hugging Face classifiers are scored on
their logits, and bad input (labels included) is refused before any work; the `vistok tune` command on the reference
model, and the commands' and tools' options checked up front."""

import json
import math

import pytest
import timm
import torch
from helpers import FAMILIES, make_images, make_model, tiny_hf_tower

import vistok
from vistok import InputShapeError, InvalidConfigError
from vistok.tuner import config_from_saved, tune_candidates


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10).eval()
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, images


@pytest.fixture(scope="module")
def result(setting):
    model, images = setting
    return vistok.tune(model, images, target=0.6, flops_images=2)


def test_the_pick_is_within_the_target_and_best_at_the_last_rung(setting, result):
    model, images = setting
    best = result.best
    assert best["gflops_ratio"] <= 0.6 and best["images"] == images.shape[0]
    finalists = [row for row in result.rows if row.get("images") == images.shape[0]]
    assert best == max(finalists, key=lambda r: (r["score"], -r["kl"]))
    within = [row for row in result.rows if row["gflops_ratio"] <= 0.6]
    assert len(finalists) < len(within)  # halving dropped some
    assert result.images_scored < len(result.rows) * images.shape[0]  # cheaper than scoring all on all
    assert len(result.rows) == len(tune_candidates(model)) and vistok.get_handle(model) is None
    front = result.pareto()

    def dominates(a, b):  # as cheap and as good as b, and better on one of the two
        return (a["gflops_ratio"] <= b["gflops_ratio"] and a["rung0_score"] >= b["rung0_score"]
                and (a["gflops_ratio"], a["rung0_score"]) != (b["gflops_ratio"], b["rung0_score"]))

    assert len({row["rung0_score"] for row in result.rows}) < len(result.rows)  # ties in score, at different costs
    for row in result.rows:  # the front is exactly the rows no other row dominates (a costlier tie is dominated)
        assert any(row is f for f in front) == (not any(dominates(other, row) for other in result.rows))


def test_the_saved_pick_patches_the_model_to_the_reported_score(setting, result, tmp_path):
    model, images = setting
    saved = json.loads(result.save(tmp_path / "tune.json").read_text())
    config = config_from_saved(saved["pick"]["config"])
    with torch.no_grad():
        reference = model(images).argmax(-1)
        with vistok.patch(model, config):
            agreement = 100.0 * float((model(images).argmax(-1) == reference).float().mean())
    assert agreement == pytest.approx(result.best["score"])
    assert result.plot(tmp_path / "tune.png").stat().st_size > 5000
    assert saved["target_gflops_ratio"] == 0.6 and len(saved["rows"]) == len(result.rows)
    import yaml

    assert yaml.safe_load(result.save(tmp_path / "tune.yaml").read_text())["pick"]["label"] == result.best["label"]


def test_the_search_is_deterministic_and_labels_score_accuracy(setting, result):
    model, images = setting
    again = vistok.tune(model, images, target=0.6, flops_images=2)
    assert again.best["label"] == result.best["label"]
    assert [(r["label"], r["rung0_score"]) for r in again.rows] == [(r["label"], r["rung0_score"]) for r in result.rows]
    labels = torch.arange(16) % 10
    with_labels = vistok.tune(model, images, target=0.6, labels=labels, flops_images=2, rungs=2)
    assert with_labels.metric == "accuracy"
    with torch.no_grad(), vistok.patch(model, with_labels.config):
        accuracy = 100.0 * float((model(images).argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(with_labels.best["score"])


def test_each_candidate_is_one_setting_and_says_what_it_runs():
    """On a small model several divisors give one r: every setting is tried once, and a composed candidate's label
    gives the r it merges with (at most half of what ATS keeps)."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10)  # 16 patches
    candidates = tune_candidates(model)
    labels = [label for label, _, _ in candidates]
    assert len(labels) == len(set(labels))
    configs = [repr(config) for _, _, config in candidates]
    assert len(configs) == len(set(configs))
    for label, method, config in candidates:
        if method == "ats+merge":
            assert label.endswith(f"merge r={config.parts[1].r}")


def test_the_decreasing_merge_is_a_candidate_wherever_it_can_run():
    """A decreasing schedule merges 2 r tokens in its first block, at most half of the patches: its candidate is
    offered exactly where vistok.patch accepts it. A bound one too strict left it out on a 2 x 2 grid (2 r = 2 of
    4 patches), where it runs."""
    from vistok.methods import MergeConfig

    offered = []
    for size in ((16, 32), 32, 48):  # 1 x 2, 2 x 2 and 3 x 3 patches
        model = timm.create_model("vit_tiny_patch16_224", img_size=size, depth=4, num_classes=10).eval()
        candidates = tune_candidates(model)
        labels = {label for label, _, _ in candidates}
        for label, method, config in candidates:
            if method != "merge" or config.schedule != "constant":
                continue
            try:
                with vistok.patch(model, MergeConfig(r=config.r, schedule="decreasing")):
                    runs = True
            except InvalidConfigError:
                runs = False
            assert (f"{label} decreasing" in labels) == runs, (size, label)
            offered.append(runs)
    assert True in offered and False in offered  # both sides of the bound were met


def test_successive_halving_keeps_the_better_half_rounded_up_and_breaks_ties_by_lower_kl():
    """After a rung the better ``ceil(n / 2)`` of ``n`` candidates go on (rounding down dropped a candidate of an odd
    count unscored), and of equal scores the lower KL from the unpatched model's distribution wins (preferring the
    higher KL picked the candidate that agrees less)."""
    from vistok.tuner import successive_halving

    seen = []

    def by_label(row, size, rung):  # row i scores i
        seen.append((rung, row["label"]))
        row.update(score=float(row["label"]), kl=0.0, images=size)
        return size

    for count in range(1, 8):
        rows = [{"label": i} for i in range(count)]
        seen.clear()
        best, scored = successive_halving(rows, list(rows), 2, 4, by_label, False, "images")
        second = sorted(label for rung, label in seen if rung == 1)
        assert second == list(range(count))[count - math.ceil(count / 2):]  # the best half, rounded up
        assert best is rows[-1] and scored == 2 * count + 4 * len(second)
    kls = [0.5, 0.1, 0.9, 0.3, 0.7]
    rows = [{"label": i} for i in range(len(kls))]

    def tied(row, size, rung):
        row.update(score=50.0, kl=kls[row["label"]], images=size)
        return size

    for rungs in (1, 2, 3):
        best, _ = successive_halving(rows, list(rows), rungs, 4, tied, False, "images")
        assert best["kl"] == min(kls)


def test_tuning_and_evaluating_leave_each_modules_mode_as_it_was(setting):
    """A model partly in train mode (frozen parts kept in eval mode while fine-tuning) runs in eval mode and comes
    back with every module's own mode, not all set alike."""
    from vistok.measure.accuracy import evaluate

    model, images = setting
    model.train()
    model.patch_embed.eval()
    model.blocks[0].eval()
    modes = {name: module.training for name, module in model.named_modules()}
    seen = []
    hook = model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        vistok.tune(model, images, target=0.6, flops_images=2, rungs=1)
        assert {name: module.training for name, module in model.named_modules()} == modes
        evaluate(model, [(images[:4], torch.arange(4))])
        assert {name: module.training for name, module in model.named_modules()} == modes
    finally:
        hook.remove()
        model.eval()
    assert seen and not any(seen)


def test_evaluating_restores_a_shared_modules_own_mode():
    """A module shared by two parents (tied layers) in eval mode inside a model in train mode: restoring each
    parent with the recursive ``train()`` set the shared child back to train mode."""
    from vistok._modes import evaluating

    shared = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(torch.nn.Sequential(shared), torch.nn.Sequential(shared))
    model.train()
    shared.eval()
    with evaluating(model):
        assert not any(module.training for module in model.modules())
    assert model.training and model[0].training and model[1].training and not shared.training


def test_bad_input_is_refused(setting):
    model, images = setting
    with pytest.raises(InvalidConfigError, match=r"target must be a GFLOPs ratio in \(0, 1\]"):
        vistok.tune(model, images, target=1.5)
    with pytest.raises(InvalidConfigError, match="no candidate reaches 0.01x"):
        vistok.tune(model, images, target=0.01, flops_images=1)
    with pytest.raises(InputShapeError, match="calibration images"):
        vistok.tune(model, images[:2])
    for name, value in [("rungs", 0), ("rungs", -3), ("flops_images", 0), ("latency_runs", 1.5)]:
        with pytest.raises(InvalidConfigError, match=f"{name} must be an int >= 1"):
            vistok.tune(model, images, **{name: value})
    with vistok.patch(model, "ats"), pytest.raises(InvalidConfigError, match="unpatched model"):
        vistok.tune(model, images)
    with pytest.raises(InputShapeError, match="images as a tensor"):
        vistok.tune(model, list(images))
    with pytest.raises(InputShapeError, match="labels as a tensor"):
        vistok.tune(model, images, labels=list(range(16)))
    with pytest.raises(InvalidConfigError, match=r"encode= gave \(16, 17, 192\), not \[B, D\]"):
        vistok.tune(model, images, encode=lambda m, x: m.forward_features(x))
    broken = images.clone()
    broken[[1, 5]] = float("nan")  # every candidate "agreed" with NaN outputs, the KL tie-break was NaN
    with pytest.raises(InputShapeError, match=r"NaN or \+inf for images \[1, 5\] \(of 16\)"):
        vistok.tune(model, broken)


def test_a_candidates_non_finite_outputs_are_misses():
    from vistok.tuner import agreement_scores

    reference = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    logits = torch.tensor([[float("nan"), 0.0, 0.0], [3.0, 0.0, 1.0]])  # argmax 0 on the NaN row
    out = agreement_scores(logits, reference, None, 0)
    assert out["score"] == 50.0 and out["kl"] == math.inf
    masked = reference.clone()
    masked[:, 2] = float("-inf")  # a masked class is no failure: both rows still agree
    assert agreement_scores(masked, reference, None, 1)["score"] == 100.0
    assert agreement_scores(reference, reference, None, 1) == {"score": 100.0, "kl": 0.0, "images": 2}


def test_candidates_are_sized_for_the_calibration_images_on_a_model_of_other_sizes():
    """A model made for other image sizes (timm's ``dynamic_img_size``) is tuned on the calibration images' patch
    count: at 4 x 4 patches of a 14 x 14 model, ATS's k ran from 176 down (none kept fewer than the 16 patches: 21
    of 36 candidates did nothing)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=4, num_classes=10, dynamic_img_size=True).eval()
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = vistok.tune(model, images, target=0.8, flops_images=1, rungs=2)
    assert [row["label"] for row in result.rows] == [label for label, _, _ in tune_candidates(model, 16)]
    assert all(row["tokens_ratio"] < 1 for row in result.rows)  # each candidate removes tokens at this size
    assert tune_candidates(model)[0][0] == "ats k=176"  # the native grid, where no size is given


def test_a_token_budget_bounds_the_tokens_each_block_processes(setting):
    """``cost="tokens"``: the pick's tokens per block, summed over the blocks, are within the target share of
    the unpatched model's, as vistok.measure counts them."""
    from vistok.measure import tokens_per_block

    model, images = setting
    result = vistok.tune(model, images, target=0.6, flops_images=2, cost="tokens", rungs=2)
    assert result.cost == "tokens" and result.best["tokens_ratio"] <= 0.6
    full = sum(tokens_per_block(model, images[:2]))
    with vistok.patch(model, result.config):
        assert sum(tokens_per_block(model, images[:2])) / full == pytest.approx(result.best["tokens_ratio"])
    assert all(row["tokens_ratio"] < 1 for row in result.rows) and "latency_ratio" not in result.best


def test_a_latency_target_filters_by_the_measured_latency(setting, monkeypatch):
    """``cost="latency"``: every candidate's latency is measured against the unpatched model, and only those
    within the target are scored; an identical copy times close to the model itself, and a patched model faster
    than the unpatched one gives a ratio below 1 (the inverse ratio passed the slower one as within the target)."""
    import copy
    import time

    from vistok import tuner

    class Sleeps(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            time.sleep(self.seconds)
            return x

    model, images = setting
    measured = tuner._latency_ratio(model, copy.deepcopy(model), images[:4], runs=3)
    assert measured > 0 and math.isfinite(measured)
    assert tuner._latency_ratio(Sleeps(0.001), Sleeps(0.1), images[:1], runs=3) < 0.5  # patched 100 x faster
    calls = []
    encoded = tuner._latency_ratio(model, copy.deepcopy(model), images[:4], runs=3,
                                   encode=lambda m, x: calls.append(m) or m.forward_features(x))
    assert encoded > 0 and math.isfinite(encoded) and len(calls) == 2 * 4 and calls[0] is model
    ratios = iter([0.9, 0.3] * 100)  # alternate candidates too slow / fast enough
    monkeypatch.setattr(tuner, "_latency_ratio", lambda *args: next(ratios))
    result = vistok.tune(model, images, target=0.5, flops_images=2, cost="latency", rungs=2)
    scored = [row for row in result.rows if row.get("images", 0) > images.shape[0] // 2]
    assert result.best["latency_ratio"] == 0.3 and all(row["latency_ratio"] == 0.3 for row in scored)
    assert [row["latency_ratio"] for row in result.rows[:4]] == [0.9, 0.3, 0.9, 0.3]
    with pytest.raises(InvalidConfigError, match="cost must be one of"):
        vistok.tune(model, images, cost="energy")


def test_the_tuner_picks_for_a_video_vit():
    """Clips [B, C, T, H, W] through a video ViT (space-time tokens): the same search, the pick within the target
    and reproducing its reported agreement."""
    from vistok.models import inflate_to_video

    torch.manual_seed(0)
    image = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=6, num_classes=5).eval()
    video = inflate_to_video(image, 4).eval()
    clips = torch.randn(8, 3, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    result = vistok.tune(video, clips, target=0.7, flops_images=2, rungs=2)
    assert result.best["gflops_ratio"] <= 0.7 and result.best["images"] == 8
    with torch.no_grad():
        reference = video(clips).argmax(-1)
        with vistok.patch(video, result.config):
            agreement = 100.0 * float((video(clips).argmax(-1) == reference).float().mean())
    assert agreement == pytest.approx(result.best["score"])


@pytest.mark.slow
def test_the_tune_command_on_the_reference_model(tmp_path, capsys):
    from vistok.cli import main

    out = tmp_path / "tune"
    assert main(["tune", "--model", "vistok_vit_fmnist", "--pretrained", "--images", "16", "--flops-images", "1",
                 "--target", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pick:" in printed and "GFLOPs ratio" in printed and out.with_suffix(".json").is_file()
    assert main(["tune", "--model", "vistok_vit_fmnist", "--pretrained", "--images", "16", "--flops-images", "1",
                 "--target", "0.6", "--cost", "tokens", "--out", str(out)]) == 0
    assert "tokens per block ratio" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["cost"] == "tokens"
    assert main(["tune", "--model", "vit_tiny_patch16_224", "--images", "16", "--out", str(out)]) == 2
    assert "give --folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_reference_tuning_tool_reports_the_picks_test_accuracy(tmp_path):
    from helpers import load_tool

    out = tmp_path / "tune"
    assert load_tool("tune_reference").main(["--images", "8", "--targets", "0.6", "--flops-images", "1",
                                             "--test-images", "200", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "tune_vistok_vit_fmnist.json").read_text())
    entry = report["targets"][0]
    assert entry["gflops_ratio"] <= 0.6 and 0 <= entry["test_top1"] <= 100 and report["unpatched_test_top1"] > 50
    assert (tmp_path / "tune_vistok_vit_fmnist_0.6.png").is_file()


def llava_batches(count: int = 4, rows: int = 2) -> list[dict]:
    """Left-padded prompts of a tiny LLaVA (16 placeholders each), each with its image."""
    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(count):
        text = torch.randint(1, 90, (rows, 3), generator=generator)
        ids = torch.cat([text[:, :1], torch.full((rows, 16), 99), text[:, 1:]], dim=1)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(rows, 3, 32, 32, generator=generator)})
    return out


def test_the_tuner_picks_a_boundary_method_for_a_vision_llm():
    """On a LLaVA, ``vistok.tune(model, batches, target)`` searches the boundary methods at the largest budget
    within the target (a share of the visual tokens) and scores the next token against the unpatched model's;
    the pick reproduces its reported agreement and the search is deterministic."""
    from helpers import tiny_llava

    from vistok.adapters.tuning import boundary_candidates

    model, batches = tiny_llava(), llava_batches()
    from vistok.adapters.tuning import tune_vision_llm

    for rungs in (0, -1):  # called directly, it returned an unscored first candidate
        with pytest.raises(InvalidConfigError, match="rungs must be an int >= 1"):
            tune_vision_llm(model, batches, target=0.3, rungs=rungs)
    result = vistok.tune(model, batches, target=0.3, rungs=2)
    labels = {row["label"] for row in result.rows}
    assert {"merge_to_budget", "region_merge", "dominant", "random_select", "correlation_guided"} <= labels
    assert "correlation_guided redundancy=page" not in labels  # one view: the same tokens as per-crop redundancy
    assert result.cost == "tokens" and all(row["tokens_ratio"] <= 0.3 for row in result.rows)
    assert result.best["config"].tokens == 4 and result.best["images"] == 8  # floor(0.3 x 16) tokens, 8 prompts
    finalists = [row for row in result.rows if row.get("images") == 8]
    assert result.best == max(finalists, key=lambda r: (r["score"], -r["kl"])) and len(finalists) < len(result.rows)
    with torch.no_grad():
        reference = torch.cat([model(**b, logits_to_keep=1).logits[:, -1].argmax(-1) for b in batches])
        with vistok.patch(model, result.config):
            patched = torch.cat([model(**b, logits_to_keep=1).logits[:, -1].argmax(-1) for b in batches])
    assert 100.0 * float((patched == reference).float().mean()) == pytest.approx(result.best["score"])
    assert vistok.tune(model, batches, target=0.3, rungs=2).best["label"] == result.best["label"]
    no_ranking = [c[0] for c in boundary_candidates((4, 4), ranks_patches=False, target=0.5)]
    assert no_ranking == ["merge_to_budget", "region_merge", "random_select", "pool tokens=8"]  # no dominant
    full = boundary_candidates((4, 4), ranks_patches=True, target=0.5, num_prefix=1)  # the class feature kept
    assert {c[2].tokens for c in full if c[1] != "pool"} == {7} and all(c[3] <= 0.5 for c in full)
    # the ratio is of the features the language model reads, the class feature counted in both (8 of 17, not 7 of 16)
    assert all(c[3] == (c[2].tokens + 1) / (16 + 1) for c in full)
    varying = boundary_candidates((0, 0), ranks_patches=True, target=0.25)  # Qwen2-VL: images differ in size
    crops = [c[0] for c in boundary_candidates((0, 0), ranks_patches=True, target=0.25, crop_grids=True)]
    assert crops == [c[0] for c in varying] + ["correlation_guided redundancy=page"]  # LLaVA-OneVision's crop grids
    assert all(c[2].keep == 0.25 and c[3] == 0.25 for c in varying) and "pool" not in {c[1] for c in varying}
    with pytest.raises(InvalidConfigError, match="less than one of the 16"):
        boundary_candidates((4, 4), ranks_patches=True, target=0.05)


def test_the_tuner_on_idefics3_tiles():
    """Idefics3 (a tile is the unit, no class token): the candidates that run on it, the pick within the share."""
    from helpers import tiny_idefics3

    model = tiny_idefics3()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.cat([torch.tensor([[1, 2]] * 2), torch.full((2, 16), 99), torch.tensor([[3, 4]] * 2)], dim=1)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=generator)})
    result = vistok.tune(model, batches, target=0.5, rungs=2)
    assert {row["method"] for row in result.rows} == {"merge_to_budget", "region_merge", "random_select", "pool"}
    assert result.best["tokens_ratio"] <= 0.5 and result.best["images"] == 4


def test_the_vision_llm_tuner_refuses_what_it_cannot_score():
    from helpers import tiny_llava

    model, batches = tiny_llava(), llava_batches(2)
    with pytest.raises(InputShapeError, match="list of batches"):
        vistok.tune(model, batches[0], target=0.5)
    with pytest.raises(InputShapeError, match="left-padded"):
        padded = dict(batches[0], attention_mask=torch.ones_like(batches[0]["input_ids"]))
        padded["attention_mask"][0, -1] = 0
        vistok.tune(model, [padded, batches[1]], target=0.5, rungs=2)
    with pytest.raises(InvalidConfigError, match="share of the visual tokens"):
        vistok.tune(model, batches, target=0.5, cost="gflops", rungs=2)
    with pytest.raises(InputShapeError, match="need at least 4 batches"):
        vistok.tune(model, batches, target=0.5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_tuner_runs_on_every_timm_family(family):
    """Every timm family vistok patches (4 blocks, 16 patches, random weights): the pick stays within the target
    and gives the score it reports: top-1 agreement where the model has a classifier, the embeddings' cosine
    similarity where timm makes it without one (DINOv2, SigLIP, EVA-02: argmax over embedding dimensions was
    scored as agreement); rotary families get no merging candidates (merging is refused there)."""
    import torch.nn.functional as F

    patch = FAMILIES[family][0].split("patch")[1][:2]
    model = make_model(family, depth=4, img_size=4 * int(patch))  # 16 patches: quick
    images = make_images(model, 8)
    result = vistok.tune(model, images, target=0.8, flops_images=1, rungs=2)
    assert result.best["gflops_ratio"] <= 0.8
    with torch.no_grad():
        reference = model(images)
        with vistok.patch(model, result.config):
            patched = model(images)
    if model.num_classes == 0:
        assert result.metric == "embedding cosine"
        score = 100.0 * float(F.cosine_similarity(patched, reference, dim=-1).mean())
        assert score == pytest.approx(result.best["score"], abs=1e-3)
        with pytest.raises(InvalidConfigError, match="has no classifier"):
            vistok.tune(model, images, target=0.8, labels=torch.zeros(8, dtype=torch.long))
    else:
        assert result.metric == "top-1 agreement"
        agreement = 100.0 * float((patched.argmax(-1) == reference.argmax(-1)).float().mean())
        assert agreement == pytest.approx(result.best["score"])
    rotary = family in ("eva02_rope", "rope_mixed")
    assert rotary == all(row["method"] not in ("merge", "ats+merge", "ats_fusion") for row in result.rows)


@pytest.mark.parametrize("kind", ["clip", "siglip", "clip-full"])
def test_the_tuner_scores_a_towers_embeddings(kind):
    """A tower without a classifier (Hugging Face CLIP / SigLIP image encoders, and a whole CLIPModel, whose forward
    wants text): with ``encode=`` the score is the embeddings' mean cosine similarity with the unpatched tower's,
    and GFLOPs are counted through ``encode``; without it the tuner refuses."""
    import torch.nn.functional as F

    from vistok.measure import count_flops

    model = tiny_hf_tower(kind)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))

    def encode(m, x):
        if kind == "clip-full":
            return m.get_image_features(pixel_values=x).pooler_output
        return m(pixel_values=x).pooler_output

    result = vistok.tune(model, images, target=0.8, flops_images=1, rungs=2, encode=encode)
    assert result.metric == "embedding cosine" and result.best["gflops_ratio"] <= 0.8
    with torch.no_grad():
        reference = encode(model, images)
        unpatched_flops = count_flops(model, images[:1], encode)
        with vistok.patch(model, result.config):
            cosine = float(F.cosine_similarity(encode(model, images), reference, dim=-1).mean())
            flops = count_flops(model, images[:1], encode)
    assert 100 * cosine == pytest.approx(result.best["score"], abs=1e-3)
    assert flops / unpatched_flops == pytest.approx(result.best["gflops_ratio"])
    with pytest.raises(InvalidConfigError, match="pass encode="):
        vistok.tune(model, images, target=0.8, flops_images=1, rungs=2)


@pytest.mark.slow
def test_the_tuner_on_an_open_clip_image_tower():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    result = vistok.tune(model, images, target=0.7, flops_images=1, rungs=2,
                         encode=lambda m, x: m.encode_image(x))
    assert result.best["gflops_ratio"] <= 0.7 and 0 < result.best["score"] <= 100 + 1e-3


def test_an_open_clip_image_tower_is_scored_by_its_embeddings():
    """``model.visual`` of an open_clip CLIP gives embeddings: the tuner scores their cosine similarity without
    ``encode=`` (it scored argmax over embedding dimensions as top-1 agreement)."""
    import torch.nn.functional as F
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(image_size=64, patch_size=8, width=64, layers=4, heads=2, mlp_ratio=2.0,
                              output_dim=16).eval()
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = vistok.tune(tower, images, target=0.8, flops_images=1, rungs=2)
    assert result.metric == "embedding cosine"
    with torch.no_grad():
        reference = tower(images)
        with vistok.patch(tower, result.config):
            score = 100.0 * float(F.cosine_similarity(tower(images), reference, dim=-1).mean())
    assert score == pytest.approx(result.best["score"], abs=1e-3)


def test_calibration_images_from_a_folder_cover_its_classes(tmp_path):
    """An image folder is ordered class by class; the tuner's calibration batch (and so its first rung, the first
    quarter) is a seeded random draw over all of it."""
    from PIL import Image

    from vistok.cli import _calibration_images, main

    for label in range(4):
        (tmp_path / f"class{label}").mkdir()
        for index in range(10):
            Image.new("RGB", (16, 16), (label * 60, index * 20, 0)).save(tmp_path / f"class{label}" / f"{index}.png")
    model = make_model("vit", depth=1)
    images, labels = _calibration_images(model, str(tmp_path), 12)
    again = _calibration_images(model, str(tmp_path), 12)[1]
    assert images.shape == (12, 3, 224, 224) and torch.equal(labels, again)
    assert len(set(labels.tolist())) == 4 and len(set(labels[:4].tolist())) > 1
    grey = timm.create_model("vistok_vit_fmnist")  # 1 channel: the folder's RGB images crashed its first conv
    assert _calibration_images(grey, str(tmp_path), 4)[0].shape == (4, 1, 28, 28)
    with pytest.raises(SystemExit):
        main(["tune", "--model", "vit_tiny_patch16_224", "--images", "-5"])


def tiny_videomae():
    """A VideoMAE classifier of 5 classes on 4-frame 32 x 32 clips (a (2, 4, 4) grid of 32 space-time tokens)."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    config = VideoMAEConfig(image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=128, patch_size=8, tubelet_size=2, num_labels=5)
    return VideoMAEForVideoClassification(config).eval()


def test_a_hugging_face_video_classifier_is_scored_on_its_logits():
    """VideoMAEForVideoClassification returns an output object: the tuner scores its ``logits`` (agreement, or
    accuracy with labels) and the pick reproduces the score; a wrapper vistok cannot patch (VideoClassifier) is
    refused, naming the model it wraps, before any forward."""
    from vistok import UnsupportedModelError
    from vistok.video import VideoClassifier

    model = tiny_videomae()
    clips = torch.randn(8, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # pixel_values [B, T, C, H, W]
    labels = torch.arange(8) % 5
    with torch.no_grad():
        reference = model(clips).logits.argmax(-1)
    for given in (None, labels):
        result = vistok.tune(model, clips, target=0.7, labels=given, flops_images=1, rungs=2)
        assert result.metric == ("top-1 agreement" if given is None else "accuracy")
        assert result.best["gflops_ratio"] <= 0.7 and result.best["images"] == 8
        with torch.no_grad(), vistok.patch(model, result.config):
            patched = model(clips).logits.argmax(-1)
        expected = reference if given is None else labels
        assert 100.0 * float((patched == expected).float().mean()) == pytest.approx(result.best["score"])
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(UnsupportedModelError, match=r"VideoMAEForVideoClassification it wraps: tune its \.model"):
            vistok.tune(VideoClassifier(model), clips.transpose(1, 2), target=0.7, flops_images=1, rungs=2)
    finally:
        hook.remove()
    assert not calls


def test_labels_must_be_the_models_class_ids(setting):
    """Labels out of ``[0, classes)``, negative, float, bool, a list or of another shape are refused (each
    candidate scored 0 % on an impossible label and the pick fell to the KL tie-break); on a vision-LLM too (a list
    was an AttributeError), against its vocabulary."""
    from helpers import tiny_llava

    model, images = setting  # 10 classes, 16 images
    bad = [(torch.arange(16), r"class ids in \[0, 10\)"), (torch.arange(16) % 10 - 1, r"class ids in \[0, 10\)"),
           (torch.zeros(16), "integer class ids"), (torch.zeros(16, dtype=torch.bool), "integer class ids"),
           (list(range(16)), "labels as a tensor"), (torch.zeros(16, 1, dtype=torch.long), r"\[B=16\]")]
    for labels, message in bad:
        with pytest.raises(InputShapeError, match=message):
            vistok.tune(model, images, target=0.6, labels=labels, flops_images=2, rungs=2)
    llava, batches = tiny_llava(), llava_batches(2)
    with torch.no_grad():
        vocab = llava(**batches[0], logits_to_keep=1).logits.shape[-1]
    bad = [(list(range(4)), "labels as a tensor"), (torch.zeros(4), "integer next-token ids"),
           (torch.full((4,), vocab), rf"next-token ids in \[0, {vocab}\)")]
    for labels, message in bad:
        with pytest.raises(InputShapeError, match=message):
            vistok.tune(llava, batches, target=0.5, labels=labels, rungs=2)


def test_the_saved_pick_round_trips_through_config_from_saved(setting, result, tmp_path):
    """``vistok.config_from_saved`` takes the saved file, its contents, its pick or the pick's config, and patches
    the model to the same outputs as the tuned config."""
    model, images = setting
    path = result.save(tmp_path / "tune.json")
    saved = json.loads(path.read_text())
    with torch.no_grad(), vistok.patch(model, result.config):
        expected = model(images)
    for given in (path, str(result.save(tmp_path / "tune.yaml")), saved, saved["pick"], saved["pick"]["config"]):
        with torch.no_grad(), vistok.patch(model, vistok.config_from_saved(given)):
            assert torch.equal(model(images), expected)
    with pytest.raises(InvalidConfigError, match="expected what TuneResult.save wrote"):
        vistok.config_from_saved({"rows": []})


def test_merge_to_budget_refuses_sizes_that_are_not_positive_on_real_tokens_and_wrong_shapes():
    """A real token of size <= 0 came out with size 0 and no owner; shapes that do not fit the tokens were raw
    RuntimeErrors. Padding may have any size: every real token still has an owner, every output a size > 0."""
    from vistok.adapters import merge_to_budget

    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for size in (0.0, -1.0):
        sizes = torch.ones(2, 6)
        sizes[1, 2] = size
        with pytest.raises(InputShapeError, match="sizes must be > 0 on every real token"):
            merge_to_budget(x, 3, sizes=sizes, valid=valid)
    sizes = torch.ones(2, 6)
    sizes[1, 4:] = 0  # padding
    out = merge_to_budget(x, 3, sizes=sizes, valid=valid)
    assert bool((out.sizes > 0).all()) and bool((out.owner[valid] >= 0).all())
    for name, wrong in (("sizes", torch.ones(2, 5)), ("valid", valid[:, :5]), ("order", torch.arange(5)[None])):
        with pytest.raises(InputShapeError, match=rf"{name} must be \[B, N\]"):
            merge_to_budget(x, 3, **{"sizes": sizes, "valid": valid, name: wrong})


def test_the_commands_check_their_outputs_and_options_before_any_work(tmp_path, monkeypatch, capsys):
    """`vistok tune --out` a folder or under a file, `vistok bench --json` a folder, a device timing cannot
    synchronise, and a target out of (0, 1] are refused up front (they were found after the search, or raw
    RuntimeErrors)."""
    from vistok import _timm
    from vistok.cli import main
    from vistok.measure import bench

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(_timm, "create_timm_model", no_work)
    monkeypatch.setattr(bench, "run_benchmark", no_work)
    (tmp_path / "file").write_text("")
    (tmp_path / "taken.json").mkdir()
    for out, message in [(tmp_path, "is a folder"), (f"{tmp_path}/", "is a folder"),
                         (tmp_path / "file" / "tune", "is a file, not a folder"), (tmp_path / "taken", "a folder")]:
        assert main(["tune", "--model", "vistok_vit_fmnist", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--json", str(tmp_path)]) == 2
    assert "a folder, not a file" in capsys.readouterr().err
    for device in ("meta", "mps", "xpu"):
        assert main(["bench", "--model", "vit_tiny_patch16_224", "--device", device]) == 2
        assert "only cpu and cuda" in capsys.readouterr().err
    for target in ("1.5", "0", "nan"):
        with pytest.raises(SystemExit):
            main(["tune", "--model", "vistok_vit_fmnist", "--target", target, "--out", str(tmp_path / "t")])


def test_the_reference_tuning_tool_refuses_bad_options_at_once(monkeypatch):
    """--threads -1 was a raw RuntimeError, and a bad later --targets value was found after the first target's
    whole tune: both exit 2 before any work."""
    from helpers import load_tool

    tool = load_tool("tune_reference")
    monkeypatch.setattr(tool.timm, "create_model", lambda *a, **k: pytest.fail("work started"))
    for argv in (["--threads", "-1"], ["--targets", "0.5", "1.5"], ["--targets", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        assert exit_info.value.code == 2


def test_the_reference_tuning_tool_refuses_an_unwritable_out_at_once(tmp_path, monkeypatch, capsys):
    """An --out under a file, or a folder where a file goes, failed after the first target's whole tune."""
    from helpers import load_tool

    tool = load_tool("tune_reference")
    monkeypatch.setattr(tool.timm, "create_model", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "file").write_text("")
    (tmp_path / "t_vistok_vit_fmnist.json").mkdir()
    for out, message in ((tmp_path / "file" / "t", "is a file, not a folder"),
                         (tmp_path / "t", "a folder, not a file")):
        assert tool.main(["--targets", "0.5", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_tune_labels_score_fashion_mnist_test_images(tmp_path, monkeypatch):
    """`vistok tune --labels` scores accuracy on Fashion-MNIST's test split (the reference models were trained on
    its training split); without --labels the calibration images are the training split's. --flops-images reaches
    the tuner (dropped, the GFLOPs were counted on the default 8 images whatever was asked)."""
    from vistok import tuner
    from vistok.cli import main
    from vistok.data import GreyBatchTransform, load_fashion_mnist

    seen = []

    def capture(model, images, target, labels, **kwargs):
        seen.append((images, labels, kwargs))
        raise InvalidConfigError("stop after the calibration batch")

    monkeypatch.setattr(tuner, "tune", capture)
    for split, flag, flops_images in (("test", ["--labels"], 3), ("train", [], 5)):
        assert main(["tune", "--model", "vistok_vit_fmnist", "--images", "8", "--flops-images", str(flops_images),
                     "--out", str(tmp_path / "t"), *flag]) == 2
        images, labels = load_fashion_mnist(split)
        assert torch.equal(seen[-1][0], GreyBatchTransform()(images[:8]))
        assert torch.equal(seen[-1][1], labels[:8]) if flag else seen[-1][1] is None
        assert seen[-1][2]["flops_images"] == flops_images


def test_labelled_folders_must_be_the_models_classes_in_order(tmp_path, monkeypatch, capsys):
    """With --labels the sorted class folders are the class ids: a folder missing a class, or numbered folders
    that sort out of numeric order (1, 10, 2, ...), scored against shifted labels without a word."""
    from PIL import Image

    from vistok import tuner
    from vistok.cli import main

    monkeypatch.setattr(tuner, "tune", lambda *args, **kwargs: pytest.fail("tuned"))
    for name, classes, message in [("missing", ["c0", "c2"], "2 class folders for a model of 10 classes"),
                                   ("numbered", [str(i) for i in range(1, 11)], "not in numeric order")]:
        for label in classes:
            (tmp_path / name / label).mkdir(parents=True)
            Image.new("L", (28, 28)).save(tmp_path / name / label / "0.png")
        assert main(["tune", "--model", "vistok_vit_fmnist", "--folder", str(tmp_path / name), "--labels",
                     "--images", "4", "--out", str(tmp_path / "t")]) == 2
        assert message in capsys.readouterr().err


def test_the_command_refuses_models_it_cannot_calibrate_before_reading_images(capsys):
    """A video model or one vistok cannot patch was told to give --folder, which then failed otherwise."""
    from vistok.cli import main

    for model, message in [("vistok_video_vit_fmnist", "takes video clips and the command reads images"),
                           ("stvit_small", "vistok cannot patch STViT")]:
        assert main(["tune", "--model", model, "--images", "8"]) == 2
        err = capsys.readouterr().err
        assert message in err and "give --folder" not in err


def test_the_candidates_are_the_documented_settings():
    """ATS (fixed budget: ``min_tokens = k``, with and without fusion) and random dropping at ``k`` from 90 % to 20 %
    of the patches (rounded to the nearest: flooring gave 57 of 64 for 90 %) in the paper's blocks, merging at
    ``r`` about ``N / 64 ... N / 12``, and ATS in the first of those blocks composed with merging in every later
    one (not the same block, none left out); on a 2-block model ATS's first block is the last, so no composed
    candidate merges in no block at all."""
    from vistok.methods import ATSConfig, MergeConfig, RandomDropConfig
    from vistok.methods.ats import default_ats_blocks

    model = timm.create_model("vit_tiny_patch16_224", img_size=128, depth=4, num_classes=10)  # 64 patches
    candidates = tune_candidates(model)
    blocks = default_ats_blocks(4)
    for method, kind in (("ats", ATSConfig), ("ats_fusion", ATSConfig), ("random_drop", RandomDropConfig)):
        configs = [config for _, m, config in candidates if m == method]
        ks = [config.k for config in configs]
        assert len(ks) == 7 and ks == sorted(set(ks), reverse=True), method
        assert abs(ks[0] - 0.9 * 64) <= 0.5 and abs(ks[-1] - 0.2 * 64) <= 0.5, (method, ks)
        assert all(abs(k - 64 * round(k / 64, 2)) <= 0.5 for k in ks)  # the nearest count to a whole percentage
        for config in configs:
            assert isinstance(config, kind) and list(config.blocks) == blocks
            if kind is ATSConfig:
                assert config.min_tokens == config.k and config.fusion == (method == "ats_fusion")
    rs = sorted({config.r for _, m, config in candidates if m == "merge"})
    assert rs == sorted({round(64 / d) for d in (64, 32, 24, 16, 12)})  # 1, 2, 3, 4, 5: 64 / 24 is 3, not 2
    composed = [config for _, m, config in candidates if m == "ats+merge"]
    assert composed
    for config in composed:
        ats, merge = config.parts
        assert list(ats.blocks) == [blocks[0]] and ats.min_tokens == ats.k and abs(ats.k - 0.75 * 64) <= 0.5
        assert list(merge.blocks) == list(range(blocks[0] + 1, 4)) and isinstance(merge, MergeConfig)
    two = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10)
    assert all(config.parts[1].blocks for _, m, config in tune_candidates(two) if m == "ats+merge")


def test_successive_halving_scores_a_rounded_up_share_and_skips_what_cannot_run():
    """Rung ``r`` of ``R`` scores the first ``total / 2 ** (R - 1 - r)`` inputs rounded up (5 inputs: 2, 3, 5;
    flooring scored 1 and 2), the last rung all of them; a row that cannot run (``None``, an ``error``) counts no
    inputs and never goes on."""
    from vistok.tuner import successive_halving

    for total, rungs in ((5, 3), (7, 2), (6, 3), (4, 1)):
        sizes, ran = {}, []

        def score(row, size, rung, sizes=sizes, ran=ran):
            sizes.setdefault(rung, set()).add(size)
            if row["label"] == 0:
                row["error"] = "cannot run"
                return None
            row.update(score=float(row["label"]), kl=0.0, images=size)
            ran.append(size)
            return size

        rows = [{"label": i} for i in range(4)]
        best, scored = successive_halving(rows, list(rows), rungs, total, score, False, "images")
        for rung, seen in sizes.items():
            share = total / 2 ** (rungs - 1 - rung)
            assert len(seen) == 1 and share <= seen.pop() < share + 1, (total, rungs, rung)
        assert sorted(sizes) == list(range(rungs)) and best is rows[3] and best["images"] == total
        assert "images" not in rows[0] and scored == sum(ran)


def test_the_scores_kl_is_from_the_unpatched_distribution_and_the_first_rung_is_kept():
    """``kl`` is KL(unpatched || candidate) averaged over the images (the reverse direction, or a sum or per-class
    mean, ranked ties differently); a tower's cosine score has a tie-break that is lower for closer embeddings, and
    both scorers record ``rung0_score`` on the first rung only (a later rung overwrote the front's score)."""
    from vistok.tuner import _cosine_scores, agreement_scores

    generator = torch.Generator().manual_seed(0)
    reference, logits = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    p, q = reference.softmax(-1), logits.softmax(-1)
    expected = float((p * (p.log() - q.log())).sum(-1).mean())
    assert agreement_scores(logits, reference, None, 0)["kl"] == pytest.approx(expected, rel=1e-5)
    near = reference + 0.01 * torch.randn(3, 5, generator=generator)
    close, far = _cosine_scores(near, reference, None, 0), _cosine_scores(logits, reference, None, 0)
    assert close["kl"] < far["kl"] and close["score"] > far["score"] and close["rung0_score"] == close["score"]
    assert "rung0_score" not in _cosine_scores(near, reference, None, 1)


def test_labels_and_encode_together_are_refused(setting):
    """``encode=`` scores embeddings by cosine similarity, so labels cannot apply: both together are refused (they
    were silently ignored)."""
    model, images = setting
    with pytest.raises(InvalidConfigError, match="labels score a classifier's top-1"):
        vistok.tune(model, images, labels=torch.zeros(16, dtype=torch.long), encode=lambda m, x: m(x))


def synthetic_result(cost):
    """A TuneResult of rows whose GFLOPs and token ratios rank them in opposite orders, one row that could not run,
    a row as costly in tokens as the pick but worse, and a composed pick."""
    from vistok.methods import ATSConfig, MergeConfig
    from vistok.methods.compose import ComposedConfig
    from vistok.tuner import TuneResult

    composed = ComposedConfig((ATSConfig(k=12, min_tokens=12, blocks=[1]), MergeConfig(r=1, blocks=[2, 3])))
    rows = [{"label": "a", "method": "ats", "config": ATSConfig(k=8, min_tokens=8), "gflops_ratio": 0.3,
             "tokens_ratio": 0.7, "rung0_score": 50.0, "score": 50.0, "kl": 0.2},
            {"label": "b", "method": "ats+merge", "config": composed, "gflops_ratio": 0.5, "tokens_ratio": 0.4,
             "rung0_score": 60.0, "score": 60.0, "kl": 0.1},
            {"label": "c", "method": "merge", "config": MergeConfig(r=2), "gflops_ratio": 0.7, "tokens_ratio": 0.3,
             "rung0_score": 40.0, "score": 40.0, "kl": 0.3},
            {"label": "d", "method": "merge", "config": MergeConfig(r=3), "gflops_ratio": 0.1, "tokens_ratio": 0.1,
             "error": "cannot run"},
            {"label": "e", "method": "random_drop", "config": MergeConfig(r=4), "gflops_ratio": 0.6,
             "tokens_ratio": 0.4, "rung0_score": 55.0, "score": 55.0, "kl": 0.2}]
    return TuneResult(rows, rows[1], composed, 0.5, "top-1 agreement", 8, 30, 1.23456, cost=cost)


def test_the_front_save_and_plot_follow_the_chosen_cost(tmp_path, monkeypatch):
    """With ``cost="tokens"`` the Pareto front, the saved target and the plot's x axis are the token ratios (the
    GFLOPs ratios' front is another one; of two rows of one cost only the better is on it); the file records the
    calibration images, images scored and seconds; a ``.yml`` file is YAML, read back by config_from_saved to the
    composed pick."""
    import yaml

    from vistok import viz

    result = synthetic_result("tokens")
    assert [row["label"] for row in result.pareto()] == ["c", "b"]
    assert [row["label"] for row in synthetic_result("gflops").pareto()] == ["a", "b"]
    saved = json.loads(result.save(tmp_path / "tune.json").read_text())
    assert saved["cost"] == "tokens" and saved["target_tokens_ratio"] == 0.5 and saved["pick"]["label"] == "b"
    assert (saved["calibration_images"], saved["images_scored"], saved["seconds"]) == (8, 30, 1.235)
    text = result.save(tmp_path / "tune.yml").read_text()
    with pytest.raises(ValueError):
        json.loads(text)
    assert yaml.safe_load(text) == saved
    assert repr(config_from_saved(tmp_path / "tune.yml")) == repr(result.config)
    figures = []
    monkeypatch.setattr(viz, "_save", lambda plt, figure, path, dpi: figures.append(figure) or path)
    result.plot(tmp_path / "tune.png")
    axis = figures[0].axes[0]
    xs = sorted(float(x) for collection in axis.collections for x, _ in collection.get_offsets())
    assert xs == sorted([0.7, 0.4, 0.3, 0.4, 0.4]) and "tokens per block" in axis.get_xlabel()  # the pick circled


def tiny_classifier():
    """A 2-block ViT of 5 classes on 32 x 32 images (4 patches): a whole search in about a second."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()


def test_four_images_suffice_for_three_rungs_and_the_first_rung_is_the_first_quarter(capfd, monkeypatch):
    """``rungs=3`` needs 4 images, not 8; with ``progress`` the bars name each rung's count (1, 2, then 4 images);
    each row's ``rung0_score`` is its agreement on the first image alone (not its last rung's), its ``score`` on
    the images of its last rung (the pick's: all four), each scorer call told its own rung (told rung 0 on every
    rung, the later ones overwrote ``rung0_score``); ``images_scored`` is the images each row ran on, over every
    rung it reached; ``seconds`` the search's time."""
    import time

    from vistok import tuner

    model = tiny_classifier()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls, scores = [], tuner.agreement_scores
    monkeypatch.setattr(tuner, "agreement_scores", lambda logits, *args: calls.append((logits.shape[0], args[-1]))
                        or scores(logits, *args))
    started = time.perf_counter()
    result = vistok.tune(model, images, target=0.9, flops_images=1, rungs=3, progress=True)
    elapsed = time.perf_counter() - started
    err = capfd.readouterr().err
    assert "measuring costs" in err and all(f"rung {i + 1}/3 ({n} images)" in err for i, n in enumerate((1, 2, 4)))
    with torch.no_grad():
        reference = model(images).argmax(-1)
        for row in result.rows:  # each patched anew, as the tuner does per rung (random dropping's seed)
            for count, key in ((1, "rung0_score"), (row["images"], "score")):
                with vistok.patch(model, row["config"]):
                    agree = (model(images[:count]).argmax(-1) == reference[:count]).float()
                assert row[key] == pytest.approx(100.0 * float(agree.mean())), (row["label"], key)
    assert result.best["images"] == 4 and set(calls) == {(1, 0), (2, 1), (4, 2)}  # (images, rung)
    assert result.images_scored == sum({1: 1, 2: 1 + 2, 4: 1 + 2 + 4}[row["images"]] for row in result.rows)
    assert 0 < result.seconds <= elapsed and result.images == 4 and vistok.get_handle(model) is None


def test_latency_is_timed_on_latency_images_against_an_unpatched_copy_within_an_inclusive_target(monkeypatch, capfd):
    """``cost="latency"``: each candidate is timed patched against an unpatched copy (not the patched model
    against itself) on the first ``latency_images`` images for ``latency_runs`` runs, through ``encode=`` where
    given, and a candidate exactly at the target is within it; no progress bars unless asked."""
    from vistok import tuner

    model = tiny_classifier()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = []

    def forward(m, x):
        return m(x)

    def spy(patched, unpatched, batch, runs, encode=None):
        calls.append((vistok.get_handle(patched) is not None, unpatched is not patched,
                      vistok.get_handle(unpatched) is None, torch.equal(batch, images[:3]), runs, encode is forward))
        return 0.5

    monkeypatch.setattr(tuner, "_latency_ratio", spy)
    result = vistok.tune(model, images, target=0.5, flops_images=1, cost="latency", latency_images=3,
                         latency_runs=2, encode=forward)
    assert calls == [(True, True, True, True, 2, True)] * len(result.rows) and result.best["latency_ratio"] == 0.5
    assert result.images_scored == sum({2: 2, 3: 2 + 3, 6: 2 + 3 + 6}[row["images"]] for row in result.rows)
    err = capfd.readouterr().err
    assert "rung" not in err and "measuring" not in err
