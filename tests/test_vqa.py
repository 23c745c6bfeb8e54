"""VQA (paper Table 7): the official VQA accuracy and answer normalisation against values
computed by hand, soft targets and the answer vocabulary, the VQAv2 reader on fixtures in the
official JSON format with COCO-named JPEGs, the shapes questions against the scene ground
truth, the fusion's padding mask, training steps that lower the loss, and `train.py task=vqa`
end to end."""

import json
import math
import re

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from flip.checkpoint import load_checkpoint
from flip.data.images import BadSample
from flip.data.shapes import COLOURS, SHAPES, plural
from flip.data.shapes_vqa import ShapesVQA
from flip.data.vqa import VQADataModule
from flip.data.vqav2 import VQAv2, read_vqav2
from flip.errors import DataPathError
from flip.metrics.vqa import (
    VQAAccuracy,
    answer_scores,
    answer_vocabulary,
    leave_one_out_score,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
)
from flip.models.fusion import AnswerClassifier, FusionTransformer
from flip.run import train
from flip.tasks.vqa import VQAModule
from tests.conftest import compose_train
from tests.test_run_config import run_train
from tests.test_transfer import pretrained_checkpoint

# -- metric -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "humans, expected",
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets hold it once (1/3), the one without it 0: 9 x 1/3 / 10
        (2, 0.6),  # 8 subsets hold both (2/3), 2 subsets one (1/3): (8 x 2/3 + 2 x 1/3) / 10
        (3, 0.9),  # 7 subsets hold all three (1), 3 subsets two (2/3): (7 + 3 x 2/3) / 10
        (4, 1.0),  # every subset holds at least 3
        (10, 1.0),
    ],
)
def test_accuracy_of_an_answer_given_by_some_of_ten_humans(humans, expected):
    answers = ["dog"] * humans + ["cat"] * (10 - humans)
    if humans == 10:
        answers = ["dog"] * 10
    assert vqa_accuracy("dog", answers) == pytest.approx(expected)
    assert leave_one_out_score(humans, 10) == pytest.approx(expected)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("two", "2"),
        ("none", "0"),
        ("Ten", "10"),  # number words (manualMap)
        ("a dog", "dog"),
        ("the Red car", "red car"),  # articles dropped, lower case
        ("dont", "don't"),
        ("isnt", "isn't"),  # contractions restored
        ("yes.", "yes"),
        ("yes!", "yes"),
        ("  yes\n", "yes"),  # punctuation, white space
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted, not spaced
        ("black/white", "black white"),  # a mark touching no space becomes a space
        ("black / white", "black white"),  # touching a space: deleted
        ("hello, world", "hello world"),
    ],
)
def test_official_answer_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_digit_comma_deletes_every_mark_of_the_answer():
    # with "1,000" in the text, "/" is deleted too instead of becoming a space
    assert process_punctuation("1,000/2") == "10002"
    assert process_punctuation("a/b") == "a b"


def test_unanimous_humans_are_compared_without_normalisation():
    """The official code normalises only when the human answers differ."""
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy(" yes ", ["yes"] * 10) == 1.0  # outer white space always stripped


def test_soft_scores_are_the_official_accuracy_of_each_answer():
    answers = ["2", "two", "2", "3", "three", "4", "a 4", "4", "4", "5"]
    assert answer_scores(answers) == pytest.approx({"2": 0.9, "3": 0.6, "4": 1.0, "5": 0.3})
    for answer, score in answer_scores(answers).items():
        assert vqa_accuracy(answer, answers) == pytest.approx(score)


def test_answer_vocabulary_is_top_k_by_frequency():
    answers = ["yes"] * 5 + ["no"] * 4 + ["two", "2", "2"] + ["red"] * 2 + ["blue"] * 2 + ["?"]
    assert answer_vocabulary(answers, 3) == ["yes", "no", "2"]  # "two" counts as "2"
    assert answer_vocabulary(answers, 5) == ["yes", "no", "2", "blue", "red"]  # ties: a-z
    assert answer_vocabulary(answers, 100) == ["yes", "no", "2", "blue", "red"]  # no "" class
    with pytest.raises(ValueError, match="size >= 1"):
        answer_vocabulary(answers, 0)


def test_accuracy_metric_per_answer_type():
    metric = VQAAccuracy()
    metric.update(
        ["yes", "2", "dog"],
        [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["cat"] * 10],
        ["yes/no", "number", "other"],
    )
    metric.update(["no"], [["no"] * 3 + ["yes"] * 7], ["yes/no"])
    got = metric.compute()
    assert got["all"].item() == pytest.approx((1 + 0.6 + 0 + 0.9) / 4)
    assert got["yes/no"].item() == pytest.approx((1 + 0.9) / 2)
    assert got["number"].item() == pytest.approx(0.6) and got["other"].item() == 0
    empty = VQAAccuracy()
    empty.update(["yes"], [["yes"] * 10], ["yes/no"])
    assert math.isnan(empty.compute()["number"].item())
    with pytest.raises(ValueError, match="answer type 'colour'"):
        empty.update(["red"], [["red"] * 10], ["colour"])


# -- VQAv2 files ------------------------------------------------------------------------
COLOUR_RGB = {"red": (220, 30, 30), "blue": (35, 70, 225), "green": (30, 160, 50)}


def _question(qid, image_id, question, answers, mc, answer_type, question_type):
    return (
        {"image_id": image_id, "question": question, "question_id": qid},
        {
            "question_id": qid,
            "image_id": image_id,
            "question_type": question_type,
            "answer_type": answer_type,
            "multiple_choice_answer": mc,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(answers)
            ],
        },
    )


def write_vqav2(root, split="train2014", images=24, first_id=1):
    """Official-format files for ``images`` single-colour COCO-named JPEGs, 3 questions each:
    its colour (8 humans right, 2 say "purple"), "is the picture red?", and "how many colors
    are there?" (7 say "1", 3 say "one")."""
    (root / split).mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for k in range(images):
        image_id = first_id + k
        colour = list(COLOUR_RGB)[k % 3]
        Image.new("RGB", (20, 16), COLOUR_RGB[colour]).save(
            root / split / f"COCO_{split}_{image_id:012d}.jpg"
        )
        red = "yes" if colour == "red" else "no"
        for j, args in enumerate(
            [
                (
                    "what color is the picture?",
                    [colour] * 8 + ["purple"] * 2,
                    colour,
                    "other",
                    "what color is the",
                ),
                ("is the picture red?", [red] * 10, red, "yes/no", "is the"),
                ("how many colors are there?", ["1"] * 7 + ["one"] * 3, "1", "number", "how many"),
            ]
        ):
            q, a = _question(image_id * 10 + j, image_id, *args)
            questions.append(q)
            annotations.append(a)
    (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(
        json.dumps(
            {
                "info": {},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": {},
                "data_subtype": split,
                "questions": questions,
            }
        )
    )
    (root / f"v2_mscoco_{split}_annotations.json").write_text(
        json.dumps(
            {
                "info": {},
                "license": {},
                "data_subtype": split,
                "data_type": "mscoco",
                "annotations": annotations,
            }
        )
    )
    return root


def vqav2_set(root, split="train2014", **kwargs):
    return VQAv2(
        root / f"v2_OpenEnded_mscoco_{split}_questions.json",
        root / f"v2_mscoco_{split}_annotations.json",
        root / split,
        **kwargs,
    )


def test_vqav2_reader_reads_the_official_files(tmp_path):
    write_vqav2(tmp_path, images=3, first_id=458752)
    records, subtype = read_vqav2(
        tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json",
        tmp_path / "v2_mscoco_train2014_annotations.json",
    )
    assert subtype == "train2014" and len(records) == 9
    r = records[0]
    assert (r.question_id, r.image_id) == (4587520, 458752)
    assert r.question == "what color is the picture?"
    assert r.answers == ("red",) * 8 + ("purple",) * 2 and r.multiple_choice_answer == "red"
    assert (r.answer_type, r.question_type) == ("other", "what color is the")
    data = vqav2_set(tmp_path, image_size=32)
    assert data.image_path(458752) == tmp_path / "train2014" / "COCO_train2014_000000458752.jpg"
    image, record = data[4]
    assert image.shape == (3, 32, 32) and record == records[4]
    assert image[0].mean() < image[2].mean()  # image 458753 is blue (normalised channels)
    test_only, _ = read_vqav2(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json")
    assert test_only[0].answers == () and test_only[0].question == r.question


def test_vqav2_reader_refusals_name_the_file(tmp_path):
    write_vqav2(tmp_path, images=2)
    with pytest.raises(DataPathError, match="annotations file not found: .*nope.json"):
        read_vqav2(
            tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", tmp_path / "nope.json"
        )
    with pytest.raises(ValueError, match="not a VQA questions file"):
        read_vqav2(tmp_path / "v2_mscoco_train2014_annotations.json")
    notes = json.loads((tmp_path / "v2_mscoco_train2014_annotations.json").read_text())
    notes["annotations"].pop(0)
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(notes))
    with pytest.raises(ValueError, match="no annotation of question 10 "):
        read_vqav2(
            tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json",
            tmp_path / "v2_mscoco_train2014_annotations.json",
        )


def test_unreadable_images_are_skipped_in_training_and_refused_in_evaluation(tmp_path):
    write_vqav2(tmp_path, images=3)
    (tmp_path / "train2014" / "COCO_train2014_000000000001.jpg").unlink()
    (tmp_path / "train2014" / "COCO_train2014_000000000002.jpg").write_bytes(b"not a jpeg")
    data = vqav2_set(tmp_path, image_size=16)
    _, record = data[0]  # questions 0-2 (image 1) and 3-5 (image 2) skipped: question 6
    assert record.image_id == 3 and data.skipped == {"missing_image": 3, "corrupt_image": 3}
    with pytest.raises(BadSample, match="missing_image: .*COCO_train2014_000000000001.jpg"):
        vqav2_set(tmp_path, image_size=16, skip_unreadable=False)[0]


def test_datamodule_targets_vocabulary_and_baseline(tmp_path):
    write_vqav2(tmp_path)
    write_vqav2(tmp_path, "val2014", images=6, first_id=100)
    dm = VQADataModule(
        vqav2_set(tmp_path, image_size=16),
        vqav2_set(tmp_path, "val2014", image_size=16),
        num_answers=5,
        image_size=16,
        context_length=8,
        batch_size=4,
    )
    # multiple_choice_answer counts over 24 images: "1" 24, "no" 16, red/blue/green/yes 8
    assert dm.answers == ["1", "no", "blue", "green", "red"]
    assert dm.task_args == {"answers": dm.answers, "baseline_answer": "1"}
    batch = dm.collate(None, [dm.val_set[i] for i in range(3)])  # image 100 (red)
    expected = torch.zeros(3, 5)
    expected[0, 4] = 1.0  # "red" by 8 of 10 ("purple" is not in the vocabulary)
    expected[1, 1] = 0.0  # "yes" is not in the top 5: no target
    expected[2, 0] = 1.0  # "1" and "one" are the same answer
    assert torch.equal(batch["targets"], expected)
    assert batch["tokens"].shape == (3, 8) and batch["images"].shape == (3, 3, 16, 16)
    assert batch["answer_types"] == ["other", "yes/no", "number"]
    assert batch["answers"][2] == ["1"] * 7 + ["one"] * 3


def test_shuffle_images_trains_each_question_on_another_questions_image(tmp_path):
    """data.shuffle_images=true (the question-only control): in a training batch every
    question gets the next one's image (none keeps its own, each image used once);
    questions, targets and the validation batches are unchanged."""
    from flip.data.quality import SharedStats

    write_vqav2(tmp_path)
    train_set = vqav2_set(tmp_path, image_size=16)
    kwargs = {"num_answers": 5, "image_size": 16, "context_length": 8, "batch_size": 4}
    items = [train_set[i] for i in range(4)]
    plain = VQADataModule(train_set, train_set, **kwargs)
    control = VQADataModule(train_set, train_set, shuffle_images=True, **kwargs)
    same, shuffled = plain.collate(SharedStats(1), items), control.collate(SharedStats(1), items)
    images = torch.stack([item[0] for item in items])
    assert torch.equal(same["images"], images)
    assert all(torch.equal(shuffled["images"][i], images[(i - 1) % 4]) for i in range(4))
    assert torch.equal(shuffled["tokens"], same["tokens"])
    assert torch.equal(shuffled["targets"], same["targets"])
    assert torch.equal(control.collate(None, items)["images"], images)  # validation


def test_vocabulary_counts_validation_answers_only_when_asked(tmp_path):
    write_vqav2(tmp_path, images=3)
    write_vqav2(tmp_path, "val2014", images=3, first_id=100)
    notes_file = tmp_path / "v2_mscoco_val2014_annotations.json"
    notes = json.loads(notes_file.read_text())
    notes["annotations"][0]["multiple_choice_answer"] = "Purple."
    notes_file.write_text(json.dumps(notes))
    train_set = vqav2_set(tmp_path, image_size=16)
    val_set = vqav2_set(tmp_path, "val2014", image_size=16)
    without = VQADataModule(train_set, val_set, image_size=16)
    with_val = VQADataModule(train_set, val_set, vocab_includes_val=True, image_size=16)
    assert "purple" not in without.answers and "purple" in with_val.answers
    assert without.baseline_answer == with_val.baseline_answer == "1"  # training answers only


# -- shapes miniature -------------------------------------------------------------------
def _truth(scene, question: str) -> str:
    """The answer recomputed from the scene, independently of the generator's code paths."""
    objs = scene.objects
    where = {
        "at the top left": (0, 0),
        "at the top": (0, 1),
        "at the top right": (0, 2),
        "on the left": (1, 0),
        "in the centre": (1, 1),
        "on the right": (1, 2),
        "at the bottom left": (2, 0),
        "at the bottom": (2, 1),
        "at the bottom right": (2, 2),
    }
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        word = m[1]
        return str(len(objs) if word == "shapes" else sum(plural(o.shape) == word for o in objs))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(o.colour == m[1] for o in objs))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"what colou?r is the shape (.+)\?", question):
        (obj,) = [o for o in objs if (o.row, o.col) == where[m[1]]]
        return obj.colour
    if m := re.fullmatch(r"what colou?r is the (\w+)\?", question):
        (obj,) = [o for o in objs if o.shape == m[1]]  # unique, or the question is ambiguous
        return obj.colour
    if m := re.fullmatch(r"what shape is the (\w+) one\?", question):
        (obj,) = [o for o in objs if o.colour == m[1]]
        return obj.shape
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        (obj,) = [o for o in objs if (o.row, o.col) == where[m[1]]]
        return obj.shape
    raise AssertionError(f"unexpected question {question!r}")


def test_shapes_answers_match_the_scene():
    data = ShapesVQA("train", size=600, image_size=32)
    kinds = set()
    for i in range(len(data)):
        scene, q = data.sample(i)
        assert q.answer == _truth(scene, q.question), q.question
        record = data.record(i)
        assert record.answers == (q.answer,) * 10 and record.answer_type == q.answer_type
        kinds.add(q.question.split()[0:2][1])
    assert kinds >= {"many", "there", "colour", "shape"}
    image, _ = data[0]
    assert image.shape == (3, 32, 32)


def test_shapes_answers_are_balanced():
    data = ShapesVQA("train", size=4000)
    answers = [data.record(i).multiple_choice_answer for i in range(len(data))]
    share = {a: answers.count(a) / len(answers) for a in set(answers)}
    assert set(share) <= {"yes", "no", "0", "1", "2", "3", *COLOURS, *SHAPES}
    assert max(share.values()) < 0.15  # most-frequent-answer baseline below 15 %
    assert abs(share["yes"] - share["no"]) < 0.03
    types = [data.record(i).answer_type for i in range(len(data))]
    assert abs(types.count("other") / len(types) - 0.5) < 0.03


def test_shapes_splits_are_independent_streams():
    train, val = ShapesVQA("train", 50), ShapesVQA("val", 50)
    assert [train.record(i) for i in range(50)] != [val.record(i) for i in range(50)]
    assert train.record(7) == ShapesVQA("train", 50).record(7)  # deterministic


# -- model ------------------------------------------------------------------------------
def test_fusion_does_not_attend_to_question_padding():
    torch.manual_seed(0)
    fusion = FusionTransformer(16, 8, width=16, depth=2, heads=2).eval()
    image, text = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    padding = torch.tensor([[False] * 3 + [True] * 3, [False] * 6])
    changed = text.clone()
    changed[0, 4] += 1.0  # a padding position of question 0
    out, out_changed = fusion(image, text, padding), fusion(image, changed, padding)
    assert out.shape == (2, 32)  # [mean image token | mean question token]
    assert torch.allclose(out, out_changed, atol=1e-6)
    changed[0, 1] += 1.0  # a real token
    assert not torch.allclose(out[0], fusion(image, changed, padding)[0], atol=1e-4)
    assert not torch.allclose(out[0], fusion(image, changed, None)[0], atol=1e-4)


def test_optimizer_groups_and_schedule(tmp_path):
    """Towers at lr, fusion at lr x fusion_lr_mult, classifier at lr x head_lr_mult; no decay
    on biases, norms and embeddings; warm-up over warmup_fraction of the steps, cosine to 0."""
    from types import SimpleNamespace

    _, model_cfg = pretrained_checkpoint(tmp_path / "p.ckpt", image_size=16)
    module = VQAModule(
        model_cfg,
        ["yes", "no"],
        fusion_width=16,
        fusion_depth=1,
        fusion_heads=1,
        lr=1e-4,
        fusion_lr_mult=5,
        head_lr_mult=50,
        weight_decay=0.01,
        warmup_fraction=0.1,
    )
    module._trainer = SimpleNamespace(estimated_stepping_batches=100)
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    norms = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert "classifier.1.weight" in norms
    assert len(group_of) == len(named)  # every parameter is trained, once
    expected_lr = {"visual": 1e-4, "text": 1e-4, "fusion": 5e-4, "classifier": 5e-3}
    for name, p in named.items():
        group = group_of[id(p)]
        # the LambdaLR already scaled the group's lr by the first step's factor (1 / 10)
        assert group["initial_lr"] == pytest.approx(expected_lr[name.split(".")[0]]), name
        spared = (
            name.endswith(".bias")
            or name in norms
            or "pos_embed" in name
            or name == "fusion.type_embed.weight"
        )
        assert group["weight_decay"] == (0.0 if spared else 0.01), name
    factors = []
    for _ in range(100):
        factors.append(optimizer.param_groups[0]["lr"] / 1e-4)
        optimizer.step()
        schedule.step()
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[54] == pytest.approx(0.5, abs=0.02) and factors[-1] < 1e-3


def test_classifier_starts_at_the_uniform_answer_prior():
    head = AnswerClassifier(8, 20)
    assert torch.allclose(torch.sigmoid(head[-1].bias), torch.full((20,), 1 / 20))


def test_training_steps_on_vqav2_files_lower_the_loss(tmp_path):
    write_vqav2(tmp_path)
    _, model_cfg = pretrained_checkpoint(tmp_path / "p.ckpt", image_size=16)
    train_set = vqav2_set(tmp_path, image_size=16)
    dm = VQADataModule(train_set, train_set, image_size=16, context_length=32, batch_size=24)
    torch.manual_seed(0)
    module = VQAModule(model_cfg, **dm.task_args, fusion_width=32, fusion_depth=1, fusion_heads=2)
    everything = dm.collate(None, [train_set[i] for i in range(len(train_set))])

    def loss() -> float:
        with torch.no_grad():
            return module.loss(
                module(everything["images"], everything["tokens"]), everything["targets"]
            ).item()

    before = loss()
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    module.train()
    for step in range(12):
        batch = dm.collate(None, [train_set[(24 * step + i) % len(train_set)] for i in range(24)])
        optimizer.zero_grad()
        module.loss(module(batch["images"], batch["tokens"]), batch["targets"]).backward()
        optimizer.step()
    module.eval()
    assert loss() < 0.75 * before


def test_vqav2_run_reports_official_accuracy_beside_the_baseline(tmp_path, capsys):
    """`task=vqa data=vqav2` on the fixture files: the baseline ("1", the most frequent
    training answer) scores 1 on the count questions (7 "1" + 3 "one" agree after
    normalisation) and 0 on the others; the checkpoint keeps the vocabulary."""
    data_root = tmp_path / "data"
    write_vqav2(data_root / "vqav2")
    write_vqav2(data_root / "vqav2", "val2014", images=6, first_id=100)
    pretrained_checkpoint(tmp_path / "p.ckpt", image_size=16)
    cfg = compose_train(
        "task=vqa",
        "data=vqav2",
        f"data_root={data_root}",
        f"init_from={tmp_path / 'p.ckpt'}",
        "data.num_workers=0",
        "batch.global=24",
        "task.epochs=2",
        "task.fusion_width=32",
        "task.fusion_depth=1",
        "task.fusion_heads=2",
        "logger=none",
        "trainer.enable_progress_bar=false",
        output_dir=tmp_path / "run",
    )
    metrics = train(cfg)
    assert cfg.data.image_size == 16  # the checkpoint's
    assert metrics["val/baseline_acc"] == pytest.approx(1 / 3)
    assert metrics["val/baseline_acc_number"] == 1.0
    assert metrics["val/baseline_acc_yes_no"] == metrics["val/baseline_acc_other"] == 0.0
    assert 0.0 <= metrics["val/vqa_acc"] <= 1.0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"VQA accuracy {metrics['val/vqa_acc']:.1%} (yes/no ")
    assert line.endswith(
        'most-frequent-answer baseline 33.3% ("1") (yes/no 0.0%, number 100.0%, other 0.0%)'
    )
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    hp = ckpt["hyper_parameters"]
    assert hp["answers"] == ["1", "no", "blue", "green", "red", "yes"]
    rebuilt = VQAModule(**{k: v for k, v in hp.items()})
    rebuilt.load_state_dict(ckpt["state_dict"])
    batch = instantiate(cfg.data, batch_size=6)
    val = batch.collate(None, [batch.val_set[i] for i in range(6)])
    rebuilt.eval()
    assert set(rebuilt.predict_answers(rebuilt(val["images"], val["tokens"]))) <= set(hp["answers"])


def test_table7_experiment_composes_with_metered_values():
    cfg = compose_train("experiment=table7_vqa", "data_root=/data", "init_from=x.ckpt")
    assert cfg.task._target_ == "flip.tasks.vqa.VQAModule"
    assert cfg.data.train._target_ == "flip.data.vqav2.VQAv2"
    assert cfg.data.train.images == "/data/vqav2/train2014"
    assert cfg.data.val.annotations == "/data/vqav2/v2_mscoco_val2014_annotations.json"
    assert cfg.data.num_answers == 3129 and cfg.data.vocab_includes_val
    assert cfg.batch["global"] == 512 and cfg.task.epochs == 10
    assert (cfg.task.lr, cfg.task.fusion_lr_mult, cfg.task.head_lr_mult) == (5e-6, 5, 50)
    assert (cfg.task.fusion_width, cfg.task.fusion_depth, cfg.task.fusion_heads) == (768, 6, 12)
    assert cfg.task.weight_decay == 0.01 and cfg.task.warmup_fraction == 0.1
    assert cfg.group == "table7"


@pytest.mark.slow
def test_train_py_task_vqa_prints_the_summary_line(tmp_path):
    pretrained_checkpoint(tmp_path / "p.ckpt", image_size=16)
    out = run_train(
        "task=vqa",
        f"init_from={tmp_path / 'p.ckpt'}",
        "task.epochs=1",
        "data.train.size=32",
        "data.val.size=16",
        "task.fusion_width=16",
        "task.fusion_depth=1",
        "task.fusion_heads=1",
        output_dir=tmp_path / "run",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"VQA accuracy \d+\.\d% \(yes/no \d+\.\d%, number \d+\.\d%, other "
        r"\d+\.\d%\); most-frequent-answer baseline \d+\.\d% \(\"\w+\"\) "
        r"\(yes/no \d+\.\d%, number \d+\.\d%, other \d+\.\d%\)",
        line,
    ), line
