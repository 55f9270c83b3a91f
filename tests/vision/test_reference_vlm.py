"""The reference vision-LLM: Fashion-MNIST questions whose answers follow from the image, the assembly (a
Hugging Face LLaVA around the reference ViT and SmolLM2), vistok.patch on it, and the train / eval / ask tools on
the real SmolLM2 (loaded once)."""

import copy
import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import blind_accuracy, load_tool, tiny_llama, vlm_accuracy

import vistok
from vistok import InvalidConfigError
from vistok.config import ConfigError
from vistok.fmnist_qa import CELLS, ITEM_NAMES, SHOES, FashionQA


def test_answers_follow_from_the_cells():
    data = FashionQA("test", 400, seed=3)
    kinds = {}
    for index in range(len(data)):
        example = data.example(index)
        kinds[example.kind] = kinds.get(example.kind, 0) + 1
        for cell, item in enumerate(example.cells):
            row, col = divmod(cell, 2)
            patch = example.image[row * 28:(row + 1) * 28, col * 28:(col + 1) * 28]
            assert (item < 0) == (patch.max() == 0)  # an empty cell is black, an item is not
        if example.kind == "where":
            cell = CELLS.index(example.question[len("What is at the "):-1])
            expected = ITEM_NAMES[example.cells[cell]] if example.cells[cell] >= 0 else "nothing"
        elif example.kind == "exists":
            asked = ITEM_NAMES.index(example.question[len("Is there a "):-1])
            expected = "yes" if asked in example.cells else "no"
        else:
            expected = str(sum(item in SHOES for item in example.cells))
        assert example.answer == expected
    assert set(kinds) == {"where", "exists", "count"} and min(kinds.values()) > 100
    again = FashionQA("test", 400, seed=3).example(17)
    assert np.array_equal(again.image, data.example(17).image) and again.question == data.example(17).question
    assert not np.array_equal(FashionQA("train", 400, seed=3).example(17).image, again.image)
    with pytest.raises(InvalidConfigError, match="split"):
        FashionQA("val", 4)
    with pytest.raises(InvalidConfigError, match="size"):
        FashionQA("test", 0)
    for seed in (-1, 2**32):  # numpy failed on -1 at the first example; 2**32 gave seed 0's examples
        with pytest.raises(InvalidConfigError, match=r"seed must be an int in \[0, 2\*\*32\)"):
            FashionQA("test", 3, seed=seed)


@pytest.fixture(scope="module")
def smollm2():
    from vistok.samplers import load_smollm2

    return load_smollm2()


def reference_vlm(smollm2, **kwargs):
    from vistok.models.reference_vlm import create_reference_vlm

    model, tokenizer = smollm2
    return create_reference_vlm(language_model=(copy.deepcopy(model), tokenizer), **kwargs)


def batch(count=2, seed=0):
    from vistok.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    data = FashionQA("test", count, seed=seed)
    images = torch.stack([data[i][0] for i in range(count)])
    return (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, ["How many shoes are there?"] * count


@pytest.mark.slow
def test_the_untrained_assembly_is_smollm2_with_an_image(smollm2):
    """Fresh LoRA adapters change nothing: on text alone the VLM is SmolLM2; the tower gives LLaVA 13 hidden
    states of a class token + a 6 x 6 grid (four crops of 3 x 3 pooled patches), each crop its own ViT run."""
    from vistok.models.reference_vlm import build_prompt

    model, tokenizer = reference_vlm(smollm2)
    text = torch.tensor([tokenizer("The capital of France is").input_ids])
    images, questions = batch()
    with torch.no_grad():
        assert (model(input_ids=text).logits - smollm2[0](input_ids=text).logits).abs().max() <= 1e-4
        out = model.model.vision_tower(images)
        prompt = torch.tensor([build_prompt(tokenizer, q, 36) for q in questions])
        logits = model(input_ids=prompt, pixel_values=images).logits
        crop = images[:1, :, 28:, :28]  # the bottom-left crop of the first image, alone
        alone = model.model.vision_tower.vit.forward_features(crop)
        top = torch.nn.functional.adaptive_avg_pool2d(alone[:, 1:].transpose(1, 2).reshape(1, 64, 14, 14), 3)
    assert len(out.hidden_states) == 13 and out.hidden_states[-2].shape == (2, 37, 64)
    grid = out.last_hidden_state[0, 1:].reshape(6, 6, 64)
    assert torch.allclose(grid[3:, :3].permute(2, 0, 1), top[0], atol=1e-5)
    assert logits.shape == (2, prompt.shape[1], 49152)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "model.vision_tower.grid_position" in trainable
    assert all("multi_modal_projector" in n or ".lora_" in n for n in trainable - {"model.vision_tower.grid_position"})


def test_grid_positions_mark_the_tokens_and_leave_class_attention_alone():
    """The tower's learned grid positions are added to every laid-out state's grid tokens (not the class token);
    the class attention the dominant method reads is still the ViT block's own."""
    import timm

    from vistok.models.reference import REFERENCE_NAME
    from vistok.models.reference_vlm import ReferenceVisionTower

    torch.manual_seed(0)
    tower = ReferenceVisionTower(timm.create_model(REFERENCE_NAME, pretrained=False).eval())
    images, _ = batch()
    with torch.no_grad():
        plain = tower(images)
        attention = tower.class_attention(plain.hidden_states, -2)
        tower.grid_position.normal_()
        moved = tower(images)
        assert torch.allclose(tower.class_attention(moved.hidden_states, -2), attention, atol=1e-6)
    for before, after in zip(plain.hidden_states, moved.hidden_states, strict=True):
        assert torch.equal(after[:, :1], before[:, :1])
        assert torch.allclose(after[:, 1:], before[:, 1:] + tower.grid_position, atol=1e-6)
    assert attention.shape == (2, 36) and not torch.equal(moved.hidden_states[-2], plain.hidden_states[-2])
    # several feature layers: the last one's; the embeddings (layer 0): no layer attended to them
    assert torch.equal(tower.class_attention(moved.hidden_states, [-3, -2]),
                       tower.class_attention(moved.hidden_states, -2))
    with pytest.raises(vistok.InvalidConfigError, match="vision_feature_layer=0"):
        tower.class_attention(moved.hidden_states, 0)
    # one crop, its patch grid unpooled: the tower's layout is the ViT's own, so its class attention is the very
    # attention of the block that produced hidden_states[-2] (a class token's key as the query ranked otherwise)
    single = ReferenceVisionTower(tower.vit, tiles=1, cell=tower.crop_grid[0])
    block = single.vit.blocks[-2]
    block.attn.fused_attn = False  # the attention is then a tensor attn_drop sees
    seen = []
    hook = block.attn.attn_drop.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        unpooled = single(torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    hook.remove()
    own = seen[0][:, :, 0, 1:].mean(dim=1)  # [B, H, N, N]: the class token's row over the patches, heads averaged
    assert own.shape == (2, 196)
    assert torch.allclose(single.class_attention(unpooled.hidden_states, -2), own, atol=1e-6)


@pytest.mark.parametrize("tiles", [1, 2, 4])
def test_the_tower_refuses_images_of_another_shape(tiles):
    """The tower reads [B, 1, 28 * tiles, 28 * tiles] images (the video VLM's frames, the image VLM's 56-px images,
    the page VLM's 112-px pages); another shape is an InputShapeError that says which it expects (28-, 112-, 3-channel
    and 57-px images reached the ViT and failed there, with an AssertionError, a RuntimeError or an EinopsError)."""
    import timm

    from vistok.models.reference import REFERENCE_NAME
    from vistok.models.reference_vlm import ReferenceVisionTower

    tower = ReferenceVisionTower(timm.create_model(REFERENCE_NAME, depth=1).eval(), tiles=tiles)
    side = 28 * tiles
    with torch.no_grad():
        assert tower(torch.zeros(2, 1, side, side)).last_hidden_state.shape == (2, 1 + (3 * tiles) ** 2, 64)
        for shape in [(1, 1, side // 2, side // 2), (1, 1, 2 * side, 2 * side), (1, 3, side, side),
                      (1, 1, side + 1, side + 1), (1, side, side), (1, 1, 1, side, side)]:
            with pytest.raises(vistok.InputShapeError, match=re.escape(f"expects images [B, 1, {side}, {side}] ("
                                                                       f"{tiles} x {tiles} crops of 28 x 28 pixels),"
                                                                       f" got {shape}")):
                tower(torch.zeros(shape))


def test_the_fine_tower_pools_each_crop_two_by_two():
    """The fine variant's tower: every crop's 14 x 14 patch grid pooled 2 x 2 to 7 x 7, the four crops laid out as
    a 14 x 14 grid (196 visual tokens); 6 x 6 grid positions (the image VLM's) resized to it keep each token in
    its own crop, and each fine place's centre lies in the coarse place it takes."""
    import timm

    from vistok.models.reference import REFERENCE_NAME
    from vistok.models.reference_vlm import FINE_CELL, ReferenceVisionTower, resized_grid_position

    torch.manual_seed(0)
    tower = ReferenceVisionTower(timm.create_model(REFERENCE_NAME, pretrained=False).eval(), cell=FINE_CELL)
    images, _ = batch()
    with torch.no_grad():
        out = tower(images)
        alone = tower.vit.forward_features(images[1:, :, :28, 28:])  # the top-right crop of the second image
    assert tower.token_grid == (14, 14) and out.last_hidden_state.shape == (2, 197, 64)
    patches = alone[0, 1:].reshape(14, 14, 64)
    expected = patches.reshape(7, 2, 7, 2, 64).mean(dim=(1, 3))
    assert torch.allclose(out.last_hidden_state[1, 1:].reshape(14, 14, 64)[:7, 7:], expected, atol=1e-5)
    with torch.no_grad():  # in front: the mean of the four crops' class tokens (not one crop's)
        classes = torch.stack([tower.vit.forward_features(images[:, :, row:row + 28, col:col + 28])[:, 0]
                               for row in (0, 28) for col in (0, 28)])
    assert not torch.allclose(classes[0], classes[1:].mean(dim=0), atol=1e-3), "the test needs crops that differ"
    assert torch.allclose(out.last_hidden_state[:, 0], classes.mean(dim=0), atol=1e-5)

    coarse = torch.arange(36.0)[:, None].repeat(1, 3)  # place i of the 6 x 6 grid holds the value i
    fine = resized_grid_position(coarse, 14)
    assert fine.shape == (196, 3) and set(fine[:, 0].long().tolist()) == set(range(36))
    for place, source in enumerate(fine[:, 0].long().tolist()):
        (row, col), (old_row, old_col) = divmod(place, 14), divmod(source, 6)
        assert (row // 7, col // 7) == (old_row // 3, old_col // 3)  # the same crop
        for new, old in ((row, old_row), (col, old_col)):  # the fine place's centre lies in the coarse place
            assert old / 6 <= (new + 0.5) / 14 <= (old + 1) / 6
    with pytest.raises(ValueError, match="35 positions are not a square grid"):
        resized_grid_position(torch.zeros(35, 3), 14)


def test_training_batches_seen_through_methods():
    """``--compressed p``: a share p of the batches goes through one of the given methods at one of the given
    budgets, the same for the same step and seed (so ``--resume`` continues the same sequence)."""
    batch_method = load_tool("train_vlm").batch_method
    methods, tokens = ["merge_to_budget", "pool", "random_select"], [9, 4]
    assert all(batch_method(step, 0, 0.0, methods, tokens) is None for step in range(50))
    chosen = [batch_method(step, 0, 1.0, methods, tokens) for step in range(300)]
    assert {method for method, _ in chosen} == set(methods) and {o["tokens"] for _, o in chosen} == set(tokens)
    seeds = [o["seed"] for method, o in chosen if method == "random_select"]
    assert len(set(seeds)) == len(seeds) and all("seed" not in o for m, o in chosen if m != "random_select")
    assert chosen == [batch_method(step, 0, 1.0, methods, tokens) for step in range(300)]
    assert chosen != [batch_method(step, 1, 1.0, methods, tokens) for step in range(300)]
    share = sum(batch_method(step, 0, 0.75, methods, tokens) is not None for step in range(2000)) / 2000
    assert 0.7 <= share <= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("method", ["merge_to_budget", "dominant", "pool", "random_select"])
def test_vistok_patches_the_reference_vlm(smollm2, method):
    from vistok.models.reference_vlm import build_prompt

    model, tokenizer = reference_vlm(smollm2)
    images, questions = batch()
    prompt = torch.tensor([build_prompt(tokenizer, q, 36) for q in questions])
    with torch.no_grad():
        expected = model(input_ids=prompt, pixel_values=images).logits
        with vistok.patch(model, method, keep=1.0):
            assert (model(input_ids=prompt, pixel_values=images).logits - expected).abs().max() <= 1e-4
        with vistok.patch(model, method, tokens=12) as handle:
            short = model(input_ids=prompt, pixel_values=images).logits
            assert short.shape[1] == prompt.shape[1] - 36 + 12 and handle.encode(images).tokens.shape == (2, 12, 576)


@pytest.mark.slow
def test_answers_decode_through_vistok_samplers(smollm2):
    """Greedy is sampling at temperature 0; seeded sampling gives the same answers again, other seeds may not."""
    from vistok.models.reference_vlm import answer_questions
    from vistok.samplers import SamplingConfig

    model, tokenizer = reference_vlm(smollm2)
    images, questions = batch(4)
    greedy = answer_questions(model, tokenizer, images, questions)
    assert greedy.visual_tokens == 36 and len(greedy.answers) == 4
    assert answer_questions(model, tokenizer, images, questions, SamplingConfig(temperature=0.0)).answers == \
        greedy.answers
    hot = SamplingConfig(temperature=1.5, top_p=0.95)
    seeds = torch.arange(4)
    first = answer_questions(model, tokenizer, images, questions, hot, seeds=seeds)
    assert answer_questions(model, tokenizer, images, questions, hot, seeds=seeds).new_tokens == first.new_tokens
    # a row samples the same tokens alone as in the left-padded batch (its counter leaves out the padding)
    from vistok.models.reference_vlm import prompt_batch

    mixed = ["How many shoes are there?", "Is there a bag?", "Which item is on the left of the shirt?", "Count."]
    _, mask, _ = prompt_batch(model, tokenizer, mixed)
    assert len(set(mask.sum(dim=1).tolist())) == 4, "each question should need its own padding"
    together = answer_questions(model, tokenizer, images, mixed, hot, seeds=seeds)
    for row in range(4):
        alone = answer_questions(model, tokenizer, images[row: row + 1], mixed[row: row + 1], hot,
                                 seeds=seeds[row: row + 1])
        assert alone.new_tokens[0] == together.new_tokens[row]
    with vistok.patch(model, "pool", tokens=9):
        assert answer_questions(model, tokenizer, images, questions).visual_tokens == 9


@pytest.mark.slow
def test_train_eval_and_ask_tools(smollm2, tmp_path, capsys, monkeypatch):
    """Two training steps write the trained tensors; they load into a fresh model; the evaluation tool and
    `vistok ask` run on them (on SmolLM2, whatever they answer after two steps), with the sampling and seed asked
    for (a --seed parsed and then replaced by 0 drew every answer from one stream)."""
    import vistok.models.reference_vlm as vlm_module
    from vistok.cli import main as vistok_main
    from vistok.models.reference_vlm import trained_state

    model_copy = (copy.deepcopy(smollm2[0]), smollm2[1])
    assert load_tool("train_vlm").main(["--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
                                        "--save-every", "1", "--compressed", "1", "--compress-methods",
                                        "merge_to_budget", "--compress-tokens", "9"], language_model=model_copy) == 0
    saved = tmp_path / "run" / "model.safetensors"
    loaded, _ = reference_vlm(smollm2, checkpoint=saved)
    fresh, _ = reference_vlm(smollm2)
    from safetensors.torch import load_file

    on_disk = load_file(str(saved))
    assert set(on_disk) == set(trained_state(fresh))
    assert all(torch.equal(trained_state(loaded)[k], v) for k, v in on_disk.items())
    assert not torch.equal(trained_state(fresh)["model.multi_modal_projector.linear_1.weight"],
                           on_disk["model.multi_modal_projector.linear_1.weight"])
    # both steps read merged tokens only: the grid positions learned through the merging
    assert on_disk["model.vision_tower.grid_position"].abs().sum() > 0
    assert all(json.loads(line)["method"] == ["merge_to_budget", {"tokens": 9}]
               for line in open(tmp_path / "run" / "log.jsonl"))
    with pytest.raises(vistok.VistokError, match="does not fit the reference VLM"):
        bad = tmp_path / "bad.safetensors"
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(bad))
        reference_vlm(smollm2, checkpoint=bad)

    out = tmp_path / "eval_k0.25"  # a prefix with a dot: eval_k0.25.csv (it wrote eval_k0.csv)
    assert load_tool("eval_vlm").main(["--checkpoint", str(saved), "--questions", "4", "--batch-size", "4",
                                       "--overhead", "--fractions", "0.25", "--out", str(out)],
                                      language_model=(copy.deepcopy(smollm2[0]), smollm2[1])) == 0
    rows = list(csv.DictReader(open(tmp_path / "eval_k0.25.csv")))
    assert [r["method"] for r in rows] == ["all tokens", "merge_to_budget", "region_merge", "dominant", "pool",
                                           "random_select"]
    assert [int(r["visual_tokens"]) for r in rows] == [36, 9, 9, 9, 9, 9]
    for row in rows[1:]:  # paired on the same questions: the differences of the accuracies
        assert float(row["vs_all"]) == pytest.approx(float(row["accuracy"]) - float(rows[0]["accuracy"]))
        if row["method"] != "pool":
            assert float(row["vs_baseline"]) == pytest.approx(float(row["accuracy"]) - float(rows[4]["accuracy"]))
    assert rows[0]["vs_all"] == rows[4]["vs_baseline"] == ""
    with pytest.raises(SystemExit):  # a baseline that is not evaluated cannot be compared with
        load_tool("eval_vlm").main(["--methods", "dominant", "--baseline", "pool", "--out", str(out)])
    assert (tmp_path / "eval_k0.25.png").stat().st_size > 5_000
    overhead = list(csv.DictReader(open(tmp_path / "eval_k0.25_overhead.csv")))
    assert [r["method"] for r in overhead] == ["unpatched", "merge_to_budget", "region_merge", "dominant", "pool",
                                               "random_select"]

    from PIL import Image

    image = tmp_path / "items.png"
    Image.fromarray(FashionQA("test", 1).example(0).image).resize((112, 112)).save(image)
    args = ["ask", "--image", str(image), "--question", "Is there a bag?", "--checkpoint", str(saved)]
    asked, answer_questions = [], vlm_module.answer_questions
    monkeypatch.setattr(vlm_module, "answer_questions", lambda *a, sampling, seeds: asked.append(
        (sampling.temperature, sampling.top_p, seeds)) or answer_questions(*a, sampling=sampling, seeds=seeds))
    assert vistok_main([*args, "--method", "dominant", "--tokens", "12", "--temperature", "0.5", "--top-p", "0.9",
                        "--seed", "7"]) == 0
    assert asked == [(0.5, 0.9, 7)]
    printed = capsys.readouterr().out
    assert "answer:" in printed and "visual tokens: 12 (dominant)" in printed and "prefill:" in printed
    assert vistok_main([*args[:1], "--image", str(tmp_path / "missing.png"), *args[3:]]) == 2
    assert vistok_main([*args, "--method", "dominant"]) == 2  # --tokens missing
    assert vistok_main([*args[:3], "--question", "  ", *args[5:]]) == 2  # answered "nothing" before
    assert "--question is blank" in capsys.readouterr().err
    assert vistok_main([*args, "--method", "pool:positions=original", "--tokens", "9"]) == 0  # a method's options
    assert "visual tokens: 9 (pool:positions=original)" in capsys.readouterr().out
    assert vistok_main([*args, "--method", "pool:positions=sideways", "--tokens", "9"]) == 2
    assert "positions" in capsys.readouterr().err
    assert vistok_main([*args, "--method", "pool:tokens=9", "--tokens", "9"]) == 2
    assert "give the budget with --tokens" in capsys.readouterr().err
    assert vistok_main([*args, "--fine"]) == 2  # the 36-token model's tensors do not fit the fine one
    assert "does not fit" in capsys.readouterr().err


def test_vision_llms_by_name(capsys):
    from vistok.models import CheckpointError, create_vlm

    with pytest.raises(CheckpointError, match=r"unknown vision-LLM 'llava'; vistok ships \['vistok_page_vlm_fmnist', "
                       r"'vistok_video_vlm_fmnist', 'vistok_vlm_fmnist', 'vistok_vlm_fmnist_fine', "
                       r"'vistok_vlm_fmnist_fine_plain'\]"):
        create_vlm("llava")
    from vistok.models import create_reference_vlm

    with pytest.raises(InvalidConfigError, match="video, page and fine are different variants"):
        create_reference_vlm(page=True, fine=True)
    for tool in ("train_vlm", "eval_vlm"):
        with pytest.raises(SystemExit):
            load_tool(tool).main(["--page", "--fine"])
        assert "--page and --fine are different variants; give at most one" in capsys.readouterr().err
    from vistok.models import reference_checkpoint

    with pytest.raises(CheckpointError, match=r"no weights of vistok_vlm_fmnist_untrained at .* vistok ships weights "
                       r"for \[.*'vistok_vlm_fmnist'"):
        reference_checkpoint("vistok_vlm_fmnist_untrained")


def test_the_name_picks_the_variant(monkeypatch):
    """A variant flag (video, page, fine) given to create_vlm, or to a variant's own factory, is refused, naming it:
    create_vlm("vistok_vlm_fmnist", fine=True) built the fine VLM, video=True the video one, and fine=False on the
    plain fine VLM was a TypeError."""
    import vistok.models.reference_vlm as vlm_module
    from vistok.models import FINE_PLAIN_VLM_NAME, FINE_VLM_NAME, PAGE_VLM_NAME, VIDEO_VLM_NAME, VLM_NAME, create_vlm

    monkeypatch.setattr(vlm_module, "create_reference_vlm", lambda **kwargs: pytest.fail(f"built {kwargs}"))
    for name in (VIDEO_VLM_NAME, PAGE_VLM_NAME, FINE_VLM_NAME, FINE_PLAIN_VLM_NAME, VLM_NAME):
        for flag in ("video", "page", "fine"):
            for value in (True, False):
                with pytest.raises(InvalidConfigError, match=f"{name}: {flag} cannot be given; the name picks"):
                    create_vlm(name, pretrained=True, **{flag: value})
        with pytest.raises(InvalidConfigError, match=f"{name}: page, fine cannot be given"):
            create_vlm(name, page=False, fine=False)
    with pytest.raises(InvalidConfigError, match=f"{VIDEO_VLM_NAME}: video cannot be given"):
        vlm_module.create_video_vlm(video=False)


@pytest.mark.parametrize("rank", [0, -2, 2.0, True])
def test_a_lora_rank_must_be_a_positive_int(rank):
    """lora_rank 0 divided by zero (and a negative one failed inside torch): refused, before SmolLM2 loads."""
    from vistok.models import create_vlm
    from vistok.models.reference_vlm import LoRALinear

    with pytest.raises(InvalidConfigError, match=f"lora_rank must be a positive int, got {rank!r}"):
        create_vlm("vistok_vlm_fmnist", lora_rank=rank)
    with pytest.raises(InvalidConfigError, match=f"rank must be a positive int, got {rank!r}"):
        LoRALinear(torch.nn.Linear(4, 4), rank)


def test_the_plain_fine_vlm_loads_its_own_weights(monkeypatch, tmp_path):
    """``vistok_vlm_fmnist_fine_plain`` is the fine variant with its own shipped file, not the fine VLM's; an
    explicit checkpoint wins."""
    import vistok.models.reference_vlm as vlm_module
    from vistok.models import create_vlm, reference_checkpoint

    calls = []
    monkeypatch.setattr(vlm_module, "create_reference_vlm", lambda **kwargs: calls.append(kwargs))
    create_vlm("vistok_vlm_fmnist_fine_plain", pretrained=True)
    create_vlm("vistok_vlm_fmnist_fine_plain", pretrained=True, checkpoint=tmp_path / "mine.safetensors")
    create_vlm("vistok_vlm_fmnist_fine_plain")
    plain = reference_checkpoint("vistok_vlm_fmnist_fine_plain")
    assert plain.parent.name == "vistok_vlm_fmnist_fine_plain"
    assert plain != reference_checkpoint("vistok_vlm_fmnist_fine")
    assert calls == [{"fine": True, "checkpoint": plain}, {"fine": True, "checkpoint": tmp_path / "mine.safetensors"},
                     {"fine": True}]


@pytest.mark.slow
def test_the_fine_vlm_warm_starts_from_the_image_vlm(smollm2, tmp_path):
    """``warm_start`` loads the image VLM's projector and adapters into the fine variant and resizes its grid
    positions; the fine VLM's prompt has 196 placeholders, and vistok's methods shorten it to their budget with
    the unpatched logits when they keep everything."""
    from safetensors.torch import save_file

    from vistok.models.reference_vlm import build_prompt, resized_grid_position, trained_state, warm_start

    model, tokenizer = reference_vlm(smollm2, fine=True)
    # the image VLM's trained tensors, as if trained: the fine VLM's names and shapes, a 6 x 6 grid of positions
    state = {name: torch.randn_like(value) for name, value in trained_state(model).items()}
    state["model.vision_tower.grid_position"] = torch.randn(36, 64)
    save_file(state, str(tmp_path / "image_vlm.safetensors"))
    page_state = {**state, "model.vision_tower.grid_position": torch.randn(16, 64)}  # one position per crop of 4 x 4
    save_file(page_state, str(tmp_path / "page_vlm.safetensors"))
    assert warm_start(model, str(tmp_path / "page_vlm.safetensors"))[1:] == [  # not a grid of places
        "resized []", "skipped ['model.vision_tower.grid_position']"]
    frozen = "model.language_model.layers.0.mlp.down_proj.weight"  # a full state file's frozen tensor: skipped
    kept = model.state_dict()[frozen].clone()
    save_file({**state, frozen: torch.randn_like(kept)}, str(tmp_path / "full.safetensors"))
    assert warm_start(model, str(tmp_path / "full.safetensors"))[2] == f"skipped ['{frozen}']"
    assert torch.equal(model.state_dict()[frozen], kept)
    summary = warm_start(model, str(tmp_path / "image_vlm.safetensors"))
    assert summary[1] == "resized ['model.vision_tower.grid_position']" and summary[2] == "skipped []"
    loaded = trained_state(model)
    assert torch.equal(loaded["model.vision_tower.grid_position"],
                       resized_grid_position(state["model.vision_tower.grid_position"], 14))
    assert all(torch.equal(loaded[name], value) for name, value in state.items() if "grid_position" not in name)
    for variant in ("video", "page"):  # one crop per frame, one position per crop: nothing to resize into
        other, _ = reference_vlm(smollm2, **{variant: True})
        before = other.model.vision_tower.grid_position.clone()
        assert warm_start(other, str(tmp_path / "image_vlm.safetensors"))[1] == "resized []"
        assert torch.equal(other.model.vision_tower.grid_position, before)
    images, questions = batch()
    prompt = torch.tensor([build_prompt(tokenizer, q, 196) for q in questions])
    with torch.no_grad():
        expected = model(input_ids=prompt, pixel_values=images).logits
        for method in ("pool", "merge_to_budget"):
            with vistok.patch(model, method, keep=1.0, positions="original"):
                assert (model(input_ids=prompt, pixel_values=images).logits - expected).abs().max() <= 1e-4
            with vistok.patch(model, method, tokens=49, positions="original"):
                assert model(input_ids=prompt, pixel_values=images).logits.shape[1] == prompt.shape[1] - 196 + 49


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vistok_vlm_fmnist", "vistok_vlm_fmnist_fine", "vistok_vlm_fmnist_fine_plain"])
def test_the_shipped_vlm_reads_the_image(smollm2, name):
    """On held-out questions the trained weights beat, by far, the best answers one could give without looking
    (the most common answer of each question kind), and still beat them at half of the visual tokens."""
    from vistok.models import create_vlm

    model, tokenizer = create_vlm(name, pretrained=True, language_model=(copy.deepcopy(smollm2[0]), smollm2[1]))
    fine = name != "vistok_vlm_fmnist"
    data = FashionQA("test", 60, seed=7)
    examples = [data.example(i) for i in range(len(data))]
    images, _ = batch(len(data), seed=7)
    blind = blind_accuracy(examples)
    assert vlm_accuracy(model, tokenizer, images, examples) >= blind + 0.25
    with vistok.patch(model, "merge_to_budget", keep=0.5, positions="original" if fine else None):
        assert vlm_accuracy(model, tokenizer, images, examples) >= blind + 0.10


class _Projector(torch.nn.Module):
    """The smallest model with a tensor the VLM trainers train (a 'multi_modal_projector')."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.multi_modal_projector = torch.nn.Linear(width, 1)


def test_a_vlm_training_run_resumes_where_its_checkpoint_is(tmp_path):
    """An interrupted run resumed from its last checkpoint ends with the weights of a straight run and one log line
    per step; resuming with no checkpoint, or another variant's, is refused."""
    from vistok.models.reference import CheckpointError
    from vistok.models.reference_vlm import TrainingRun, train_trained_tensors

    def step_loss_of(model, interrupt_at=None):
        def step_loss(step):
            if step == interrupt_at:
                raise KeyboardInterrupt
            inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
            return model.multi_modal_projector(inputs).pow(2).mean(), {}
        return step_loss

    def run(out, resume=False):
        return TrainingRun(out, steps=6, minutes=60.0, lr=0.05, warmup=1, save_every=3, resume=resume)

    torch.manual_seed(0)
    straight = _Projector()
    torch.manual_seed(0)
    resumed = _Projector()
    train_trained_tensors(straight, run(tmp_path / "straight"), step_loss_of(straight))
    earlier = (tmp_path / "straight" / "log.jsonl").read_text()
    with pytest.raises(KeyboardInterrupt):  # a fresh run in that folder that fails before its first step
        train_trained_tensors(_Projector(), run(tmp_path / "straight"), step_loss_of(straight, interrupt_at=0))
    assert (tmp_path / "straight" / "log.jsonl").read_text() == earlier  # the earlier run's log stays
    with pytest.raises(KeyboardInterrupt):
        train_trained_tensors(resumed, run(tmp_path / "run"), step_loss_of(resumed, interrupt_at=4))
    torch.manual_seed(1)
    resumed = _Projector()  # a fresh process: the weights come from the checkpoint
    assert train_trained_tensors(resumed, run(tmp_path / "run", resume=True), step_loss_of(resumed)) == 6
    assert torch.equal(resumed.multi_modal_projector.weight, straight.multi_modal_projector.weight)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [1, 2, 3, 4, 5, 6]
    expected = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [line["smoothed"] for line in logged] == [line["smoothed"] for line in expected]  # it did restart
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_trained_tensors(_Projector(), run(tmp_path / "none", resume=True), step_loss_of(resumed))
    with pytest.raises(CheckpointError, match="does not fit"):
        other = _Projector(width=5)
        train_trained_tensors(other, run(tmp_path / "run", resume=True), step_loss_of(other))
    # a resume shares the run's settings (its save cadence may change)
    again = TrainingRun(tmp_path / "run", steps=6, minutes=60.0, lr=0.05, warmup=1, save_every=2, resume=True)
    assert train_trained_tensors(resumed, again, step_loss_of(resumed)) == 6
    for changed, named in ((dict(lr=0.1), "lr: 0.05 -> 0.1"), (dict(steps=8), "steps: 6 -> 8"),
                           (dict(settings={"compressed": 0.5}), "compressed: '(unset)' -> 0.5")):
        other = TrainingRun(**{**vars(run(tmp_path / "run", resume=True)), **changed})
        with pytest.raises(ConfigError, match=re.escape(named)):
            train_trained_tensors(resumed, other, step_loss_of(resumed))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    del state["settings"]
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="older vistok"):
        train_trained_tensors(resumed, run(tmp_path / "run", resume=True), step_loss_of(resumed))


def test_the_learning_rate_warms_up_then_falls_to_a_tenth(tmp_path):
    """Step s trains at lr * min(1, (s + 1) / warmup) times a cosine from 1 at the start to 0.1 at the end of the
    run, as TrainingRun says: a warm-up from s / warmup trained its first step at rate 0, and a cosine to 0 ended
    the run at a rate that learned nothing."""
    from vistok.models.reference_vlm import TrainingRun, train_trained_tensors

    model = _Projector()
    run = TrainingRun(tmp_path, steps=8, minutes=600.0, lr=0.2, warmup=3, save_every=100)
    train_trained_tensors(model, run, lambda step: (model.multi_modal_projector(torch.ones(1, 3)).sum(), {}))
    logged = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * step / run.steps)) / 2 for step in range(run.steps)]
    assert cosine[0] == 1.0 and 0.1 + 0.9 * (1 + math.cos(math.pi)) / 2 == pytest.approx(0.1)  # 1 down to 0.1
    assert logged == pytest.approx([run.lr * min(1.0, (step + 1) / run.warmup) * cosine[step]
                                    for step in range(run.steps)], rel=1e-6)


def test_trained_tensors_that_do_not_fit_are_refused_naming_them(tmp_path):
    """A checkpoint whose trained tensors are not the model's, one more (another variant's adapter) or one fewer,
    is refused naming that tensor; an extra one was ignored, silently."""
    from vistok.models.reference import CheckpointError
    from vistok.models.reference_vlm import TrainingRun, train_trained_tensors

    model = _Projector()

    def step_loss(step):
        return model.multi_modal_projector(torch.ones(1, 3)).sum(), {}

    def run(resume=False):
        return TrainingRun(tmp_path, steps=1, minutes=60.0, lr=0.05, warmup=1, save_every=1, resume=resume)

    train_trained_tensors(model, run(), step_loss)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    extra = "model.language_model.layers.0.self_attn.q_proj.lora_a"
    for named, trained in ((extra, {**saved["trained"], extra: torch.zeros(8, 3)}),
                           ("multi_modal_projector.bias", {"multi_modal_projector.weight":
                                                           saved["trained"]["multi_modal_projector.weight"]})):
        torch.save({**saved, "trained": trained}, tmp_path / "checkpoint.pt")
        with pytest.raises(CheckpointError, match=f"does not fit .*{re.escape(named)}"):
            train_trained_tensors(model, run(resume=True), step_loss)


class _Characters:
    """A tokenizer: one id per character, and one for each of the image placeholder and the chat's markers."""

    special = ("<empty_output>", "<|im_start|>", "<|im_end|>")
    vocabulary = 128 + len(special)

    def __call__(self, text, add_special_tokens=True):
        ids = []
        while text:
            token = next((marker for marker in self.special if text.startswith(marker)), text[0])
            ids.append(self.convert_tokens_to_ids(token))
            text = text[len(token):]
        return type("Encoding", (), {"input_ids": ids})()

    def convert_tokens_to_ids(self, token):
        return 128 + self.special.index(token) if token in self.special else ord(token)


def test_the_answer_loss_scores_the_next_answer_token():
    """Training rows label the answer and its <|im_end|> only, at the row's end (labelling the prompt taught the
    model to write questions), and the loss scores the logits at i against token i + 1: a model that puts all its
    mass on each next token has no loss, one that repeats the token it reads a large one."""
    import torch.nn.functional as F

    from vistok.models.reference_vlm import IMAGE_TOKEN, answer_batch, answer_loss, build_prompt

    tokenizer = _Characters()
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == 128
    questions, answers, counts = ["Is there a bag?", "How many shoes are there?"], ["yes", "2"], [4, 9]
    rows = answer_batch(tokenizer, questions, answers, counts, pad_id=0)
    for row, (question, answer, count) in enumerate(zip(questions, answers, counts, strict=True)):
        prompt = build_prompt(tokenizer, question, count)
        reply = tokenizer(f"{answer}<|im_end|>", add_special_tokens=False).input_ids
        own = len(prompt) + len(reply)
        assert rows["input_ids"][row, -own:].tolist() == prompt + reply
        assert rows["attention_mask"][row].tolist() == [0] * (rows["input_ids"].shape[1] - own) + [1] * own
        labels = rows["labels"][row]
        assert labels[-len(reply):].tolist() == reply and bool((labels[:-len(reply)] == -100).all())

    class Predicts(torch.nn.Module):  # logits at i: all the mass on the row's token i + shift
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
            logits = 30.0 * F.one_hot(input_ids.roll(-self.shift, dims=1), tokenizer.vocabulary).float()
            return type("Output", (), {"logits": logits[:, -logits_to_keep:]})()

    assert float(answer_loss(Predicts(1), rows)) < 1e-6
    assert float(answer_loss(Predicts(0), rows)) > 1.0


def test_item_names_and_shoes_are_fashion_mnists_classes():
    """``ITEM_NAMES[c]`` names Fashion-MNIST's class ``c`` (the answers name the items the cells hold) and the
    shoes are the sandals, sneakers and ankle boots: two names swapped, or a bag counted as a shoe, kept every
    answer consistent with the module's own tables while naming the items wrongly."""
    from vistok.data import FASHION_MNIST_CLASSES

    assert len(ITEM_NAMES) == len(FASHION_MNIST_CLASSES) == 10
    for name, label in zip(ITEM_NAMES, FASHION_MNIST_CLASSES, strict=True):
        assert name == label.lower().split("/")[0].split()[-1]  # "T-shirt/top" -> t-shirt, "Ankle boot" -> boot
    assert sorted(ITEM_NAMES[c] for c in SHOES) == ["boot", "sandal", "sneaker"]


def test_questions_ask_about_every_cell_and_item_from_their_own_split():
    """The train split's items are Fashion-MNIST training images and each cell's class is its image's label;
    "where" asks about all four cells, "exists" about a present item half of the time and about every class
    when absent; an index past the end is an IndexError. Catches a split that read the other split's images, a
    label taken from another image, a cell never asked about, a question biased to "yes" or "no", a class never
    asked about, and an off-by-one bound."""
    from vistok.data import load_fashion_mnist

    data = FashionQA("train", 300, seed=5)
    examples = [data.example(i) for i in range(len(data))]
    where = {example.question for example in examples if example.kind == "where"}
    assert where == {f"What is at the {cell}?" for cell in CELLS}
    exists = [example for example in examples if example.kind == "exists"]
    assert 0.35 <= sum(example.answer == "yes" for example in exists) / len(exists) <= 0.65
    assert {example.question for example in exists if example.answer == "no"} == {
        f"Is there a {name}?" for name in ITEM_NAMES}
    images, labels = (part.numpy() for part in load_fashion_mnist("train"))
    images = images.reshape(len(images), -1)
    for example in examples[:4]:
        for cell, item in enumerate(example.cells):
            if item >= 0:
                row, col = divmod(cell, 2)
                patch = example.image[row * 28:(row + 1) * 28, col * 28:(col + 1) * 28].reshape(-1)
                assert item in labels[(images == patch).all(axis=1)]  # a training image of that class
    image, question, answer = data[7]
    assert torch.equal(image, torch.from_numpy(examples[7].image)[None] / 255)
    assert (question, answer) == (examples[7].question, examples[7].answer)
    with pytest.raises(IndexError):
        data.example(len(data))


def test_the_prompt_is_smollm2s_chat_turn_with_the_image_before_the_question():
    """build_prompt: SmolLM2's user turn (no system turn) holding the image placeholders, then a newline and the
    question, then the opened assistant turn; placeholders after the question, or a missing newline, are
    another prompt than the one the shipped VLMs learned."""
    from vistok.models.reference_vlm import IMAGE_TOKEN, build_prompt

    tokenizer = _Chat()
    prompt = build_prompt(tokenizer, "Is there a bag?", 3)
    assert tokenizer.decode(prompt) == (f"<|im_start|>user\n{IMAGE_TOKEN * 3}\nIs there a bag?<|im_end|>\n"
                                        "<|im_start|>assistant\n")


class _Chat(_Characters):
    """_Characters with a padding id (SmolLM2's) and decoding, for a whole VLM around a tiny language model."""

    pad_token_id = 2

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) if i < 128 else "" if skip_special_tokens else self.special[i - 128] for i in ids)


def tiny_reference_vlm(**kwargs):
    """The reference VLM (the shipped ViT) around a two-layer Llama over _Chat's ids: SmolLM2 takes a minute to
    load on a busy machine."""
    from vistok.models.reference_vlm import create_reference_vlm

    tokenizer = _Chat()
    language_model = tiny_llama(tokenizer.vocabulary, tokenizer.pad_token_id)
    return create_reference_vlm(language_model=(language_model, tokenizer), **kwargs)


@pytest.fixture(scope="module")
def tiny_vlm():
    return tiny_reference_vlm(lora_rank=2)


def test_prompts_are_left_padded_and_the_projector_reads_the_second_to_last_layers_patches(tiny_vlm):
    """prompt_batch: each prompt with the 6 x 6 grid's 36 placeholders, left-padded; the image's features are
    the projector over the tower's second-to-last hidden state without its class token: the logits through the
    pixels equal those through ``encoded_features`` of those tokens. Catches right padding, a placeholder for
    the class token, another feature layer, the class token kept, and the projector left out."""
    from vistok.models.reference_vlm import IMAGE_TOKEN, build_prompt, encoded_features, prompt_batch

    model, tokenizer = tiny_vlm
    questions = ["Count.", "Is there a bag?"]
    ids, mask, pad_id = prompt_batch(model, tokenizer, questions)
    assert pad_id == tokenizer.pad_token_id
    for row, question in enumerate(questions):
        prompt = build_prompt(tokenizer, question, 36)
        padding = ids.shape[1] - len(prompt)
        assert ids[row].tolist() == [pad_id] * padding + prompt
        assert mask[row].tolist() == [0] * padding + [1] * len(prompt)
    assert (ids == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum(dim=1).tolist() == [36, 36]
    ids, mask = ids[:1], mask[:1]  # the padded row
    images = torch.randn(1, 1, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model.vision_tower(images).hidden_states
        through_pixels = model(input_ids=ids, attention_mask=mask, pixel_values=images).logits
        features = encoded_features(model, [hidden[-2][0, 1:]])
        through_features = model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features).logits
        other_layer = encoded_features(model, [hidden[-1][0, 1:]])
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=other_layer).logits,
                                  through_pixels, atol=1e-5), "the test needs layers that differ"
    assert torch.allclose(through_pixels, through_features, atol=1e-5)


def test_answers_are_the_new_tokens_up_to_im_end_generated_as_asked(tiny_vlm, monkeypatch):
    """answer_questions hands generate the caller's sampling, seeds and max_new_tokens, stops at <|im_end|> and
    pads with the tokenizer's padding id; each answer is what follows the prompt up to <|im_end|> (or all of it
    without one), decoded and stripped; under a patch the visual tokens are the method's. A spy stands in for
    generate. Catches a setting replaced by its default, an answer cut one token early or late, and the tower's
    full count reported under a method."""
    from vistok.models.reference_vlm import answer_questions
    from vistok.samplers import SamplingConfig

    model, tokenizer = tiny_vlm
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = [tokenizer(" yes").input_ids + [end, ord("x"), end], tokenizer("nothing").input_ids]
    seen = {}

    def generate(self, input_ids, **kwargs):
        seen.update(kwargs)
        return torch.cat([input_ids, torch.tensor(replies)], dim=1)

    monkeypatch.setattr(type(model), "generate", generate)  # the class's: vistok.patch refuses an instance's
    hot = SamplingConfig(temperature=0.7, top_p=0.9)
    features = [torch.zeros(5, 64), torch.zeros(5, 64)]
    result = answer_questions(model, tokenizer, None, ["Is there a bag?", "What is at the top left?"], hot,
                              seeds=3, max_new_tokens=7, features=features)
    assert result.answers == ["yes", "nothing"] and result.visual_tokens == 5
    assert result.new_tokens == [tokenizer(" yes").input_ids, tokenizer("nothing").input_ids]
    assert (seen["max_new_tokens"], seen["eos_token_id"], seen["pad_token_id"]) == (7, end, tokenizer.pad_token_id)
    pipeline, seeded = seen["logits_processor"]
    assert pipeline.config == hot and (seeded.seeds, seeded.pad_token_id) == (3, tokenizer.pad_token_id)
    assert (seen["mm_encoder_outputs"]["image"].pooler_output[0]
            == model.model.multi_modal_projector(features[0])).all()
    images = torch.zeros(2, 1, 56, 56)
    with pytest.raises(InvalidConfigError, match="give images or features"):
        answer_questions(model, tokenizer, images, ["a", "b"], features=features)
    with vistok.patch(model, "pool", keep=0.25):  # a quarter of the 6 x 6 grid
        assert answer_questions(model, tokenizer, images, ["a", "b"]).visual_tokens == 9
    assert answer_questions(model, tokenizer, images, ["a", "b"]).visual_tokens == 36
    assert seen["pixel_values"] is images and seen["logits_processor"][0].config.temperature == 0.0  # greedy


def test_lora_adapts_each_layers_query_and_value_at_the_given_rank(tiny_vlm):
    """Rank-r adapters on every layer's q_proj and v_proj (only), of the rank asked for, and trainable; an
    adapter adds (alpha / rank) * x A^T B^T to its layer. Catches an adapter left off a projection, the rank
    replaced by the default, and another scale."""
    from vistok.models.reference_vlm import LoRALinear

    model, _ = tiny_vlm
    for layer in model.model.language_model.layers:
        attention = layer.self_attn
        for name in ("q_proj", "v_proj"):
            adapter = getattr(attention, name)
            assert isinstance(adapter, LoRALinear) and adapter.lora_a.shape[0] == adapter.lora_b.shape[1] == 2
            assert adapter.lora_a.requires_grad and adapter.lora_b.requires_grad
        assert not isinstance(attention.k_proj, LoRALinear) and not isinstance(attention.o_proj, LoRALinear)
    torch.manual_seed(0)
    adapter = LoRALinear(torch.nn.Linear(5, 3), rank=2, alpha=6.0)
    torch.nn.init.normal_(adapter.lora_b)
    x = torch.randn(4, 5)
    expected = adapter.base(x) + 3.0 * (x @ adapter.lora_a.T @ adapter.lora_b.T)
    assert torch.allclose(adapter(x), expected, atol=1e-6)


def test_each_variant_loads_its_own_trained_tensors(monkeypatch, tmp_path):
    """pretrained loads the shipped tensors of the variant built (the page VLM's for page=True), an explicit
    checkpoint wins; the video VLM trains its frame selector and not the grid positions (one crop per frame).
    Catches the variants' files swapped, pretrained ignored, the checkpoint replaced by the shipped file, and the
    video VLM's trained tensors wrong."""
    import vistok.models.reference_vlm as vlm_module
    from vistok.models.reference_vlm import trained_state

    loaded = []
    monkeypatch.setattr(vlm_module, "_load_trained", lambda model, path, state=None: loaded.append(path))
    page, _ = tiny_reference_vlm(page=True, pretrained=True)
    assert loaded == [vlm_module.reference_checkpoint(vlm_module.PAGE_VLM_NAME)]
    assert loaded[0].parent.name == "vistok_page_vlm_fmnist"
    assert page.model.vision_tower.token_grid == (12, 12) and page.model.vision_tower.crop_positions
    assert page.model.vision_tower.grid_position.requires_grad
    mine = tmp_path / "mine.safetensors"
    video, _ = tiny_reference_vlm(video=True, pretrained=True, checkpoint=str(mine))
    assert loaded[1:] == [mine]
    # one crop per frame: the ViT's own positions place its tokens; the frame selector learns
    assert not video.model.vision_tower.grid_position.requires_grad
    assert all(p.requires_grad for p in video.frame_selector.parameters())
    assert set(trained_state(video)) >= {f"frame_selector.{name}" for name in video.frame_selector.state_dict()}


def test_a_warm_start_loads_trained_tensors_only_and_resizes_a_fine_vlms_grid(tiny_vlm, tmp_path):
    """warm_start loads the trained tensors whose names and shapes fit, skips a full state file's frozen tensor,
    and resizes a fine VLM's 14 x 14 grid positions into the image VLM's 6 x 6 (the two grids' crops line up
    either way). Catches a frozen language-model tensor loaded, and resizing from the coarse grid only."""
    from safetensors.torch import save_file

    from vistok.models.reference_vlm import resized_grid_position, warm_start

    model, _ = tiny_vlm
    before = {name: value.clone() for name, value in model.state_dict().items()}
    frozen = "model.language_model.layers.0.mlp.down_proj.weight"  # a full state file's: skipped
    projector = "model.multi_modal_projector.linear_1.weight"
    state = {"model.vision_tower.grid_position": torch.randn(196, 64), frozen: torch.randn_like(before[frozen]),
             projector: torch.randn_like(before[projector])}
    save_file(state, str(tmp_path / "fine.safetensors"))
    try:
        summary = warm_start(model, str(tmp_path / "fine.safetensors"))
        now = model.state_dict()
        assert summary[1:] == ["resized ['model.vision_tower.grid_position']", f"skipped ['{frozen}']"]
        assert torch.equal(now[frozen], before[frozen]) and torch.equal(now[projector], state[projector])
        assert torch.equal(now["model.vision_tower.grid_position"],
                           resized_grid_position(state["model.vision_tower.grid_position"], 6))
    finally:
        model.load_state_dict(before)
