"""Evaluation datasets on tiny fixtures written in the real on-disk layouts: CLIP_benchmark's
builders (its webdataset export, torchvision folders, VOCdevkit, ImageNet class folders) and
our readers (ObjectNet, PM-k video sets, ImageNetV2, Karpathy captions, Hateful Memes)."""

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader
from torchvision import transforms as T

from flip.data.benchmarks import metadata, readers
from flip.data.benchmarks.datasets import (
    READ_ONLY_BUILDERS,
    class_names,
    clip_benchmark_set,
    prompt_templates,
)
from flip.data.benchmarks.readers import DatasetNotFound
from flip.data.indexed import IndexedStream
from flip.errors import ConfigError
from flip.eval.runner import build_split
from tests import eval_fixtures as fx
from tests.conftest import CONF

TO_TENSOR = T.Compose([T.Resize((8, 8)), T.ToTensor()])


def eval_cfg(*overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=unused", f"output_dir={tmp_path}", *overrides])
    cfg.image_size = 8  # what evaluate() reads from the checkpoint
    return cfg


def images(n, seed=0):
    return [fx.solid_image(seed + i) for i in range(n)]


def test_metadata_files():
    assert (
        len(metadata.imagenet_classnames()) == 1000 and metadata.imagenet_classnames()[0] == "tench"
    )
    assert len(metadata.imagenet_wnids()) == 1000 and metadata.imagenet_wnids()[0] == "n01440764"
    assert len(metadata.imagenet_templates("simple7")) == 7
    assert len(metadata.imagenet_templates("openai80")) == 80
    assert metadata.imagenet_templates("simple7")[0] == "itap of a {}."
    for space in ("imagenet_a", "imagenet_r"):
        wnids = metadata.label_space(space)
        assert len(wnids) == 200 and list(wnids) == sorted(wnids)
        assert set(wnids) <= set(metadata.imagenet_wnids())
    sizes = {
        "Food101": 101,
        "CIFAR10": 10,
        "CIFAR100": 100,
        "Birdsnap": 500,
        "SUN397": 397,
        "StanfordCars": 196,
        "FGVCAircraft": 100,
        "PascalVOC2007": 20,
        "DescribableTextures": 47,
        "OxfordPets": 37,
        "Caltech101": 102,
        "Flowers102": 102,
        "MNIST": 10,
        "STL10": 10,
        "EuroSAT": 10,
        "RESISC45": 45,
        "GTSRB": 43,
        "KITTI": 4,
        "Country211": 211,
        "PatchCamelyon": 2,
        "UCF101": 101,
        "Kinetics700": 700,
        "CLEVRCounts": 8,
        "HatefulMemes": 2,
        "SST2": 2,
    }  # the 25 datasets of Table 4
    for name, n in sizes.items():
        assert len(metadata.classnames(f"clip:{name}")) == n, name
        assert all("{}" in t for t in metadata.templates(f"clip:{name}")), name
    assert metadata.classnames("cb:pets")[:2] == ["Abyssinian", "American Bulldog"]


def test_every_paper_config_builds_by_target_with_its_metadata(tmp_path):
    cfg = eval_cfg("eval_data=paper", "data_root=/data", tmp_path=tmp_path)
    assert len(cfg.eval_data) == 25 + 1 + 2 + 7  # Table 4, ImageNet, Table 5, Table 6
    for name, entry in cfg.eval_data.items():
        assert callable(hydra.utils.get_method(entry.dataset._target_)), name
        assert entry.dataset.root.startswith("/data/"), name
        assert entry.kind in ("classification", "retrieval", "video") and entry.protocols, name
        if entry.dataset.get("builder") is not None:
            assert entry.dataset.builder in READ_ONLY_BUILDERS, name
        if entry.kind != "retrieval":
            assert metadata.templates(entry.templates), name
        if entry.get("classnames") is not None:
            assert metadata.classnames(entry.classnames), name
    table4 = eval_cfg("eval_data=table4", tmp_path=tmp_path).eval_data
    assert all(e.dataset.root.endswith(f"/{n}") for n, e in table4.items())


def test_wds_export_through_clip_benchmark(tmp_path):
    samples = [(img, i % 3) for i, img in enumerate(images(7))]
    root = fx.write_wds(tmp_path / "wds", "test", samples, ["a", "b", "c"], ["x {}"], per_shard=3)
    ds = clip_benchmark_set("fx", root, "test", TO_TENSOR)
    items = list(ds)
    assert ds.classes == ["a", "b", "c"] and ds.templates == ["x {}"]
    assert [y for _, y in items] == [i % 3 for i in range(7)]
    # webp decodes lossy; compare against the same encoding decoded by PIL directly
    assert torch.allclose(items[4][0], TO_TENSOR(samples[4][0]), atol=0.1)
    caps = [(img, [f"cap {i}", f"other {i}"]) for i, img in enumerate(images(4))]
    root = fx.write_wds(tmp_path / "ret", "test", caps, image_format="jpg")
    assert [c for _, c in clip_benchmark_set("fx", root, "test", TO_TENSOR)] == [c for _, c in caps]
    multi = [(img, np.array([i % 2, 1, 0], dtype=np.uint8)) for i, img in enumerate(images(3))]
    root = fx.write_wds(tmp_path / "voc", "test", multi, ["x", "y", "z"])
    assert [y.tolist() for _, y in clip_benchmark_set("fx", root, "test", TO_TENSOR)] == [
        [0, 1, 0],
        [1, 1, 0],
        [0, 1, 0],
    ]
    with pytest.raises(DatasetNotFound, match="nshards.txt"):
        clip_benchmark_set("fx", tmp_path / "none", "test", TO_TENSOR)


def test_streamed_share_covers_every_sample_once_over_processes_and_workers(tmp_path):
    samples = [(img, i) for i, img in enumerate(images(11))]
    root = fx.write_wds(tmp_path / "wds", "test", samples, [str(i) for i in range(11)], per_shard=2)
    seen = {}
    for rank in range(2):  # 2 processes x 2 loader workers over 6 shards
        stream = IndexedStream(clip_benchmark_set("fx", root, "test", TO_TENSOR), rank, 2)
        for index, _, label in DataLoader(stream, batch_size=None, num_workers=2):
            assert int(index) not in seen
            seen[int(index)] = int(label)
    assert sorted(seen.values()) == list(range(11))


def test_image_folder_names_and_label_numbers(tmp_path):
    fx.write_folders(tmp_path / "a" / "test", {"sea_lake": images(2), "forest": images(1)})
    ds = readers.image_folder("fx", tmp_path / "a", "test", TO_TENSOR)
    assert ds.classes == ["forest", "sea lake"] and sorted(l for _, l in ds.samples) == [0, 1, 1]
    fx.write_folders(tmp_path / "b" / "test", {"0": images(1), "2": images(1), "10": images(1)})
    ds = readers.image_folder("fx", tmp_path / "b", "test", TO_TENSOR)
    assert ds.classes is None and sorted(l for _, l in ds.samples) == [0, 2, 10]
    (tmp_path / "b" / "classnames.txt").write_text("\n".join(f"n{i}" for i in range(11)))
    assert readers.image_folder("fx", tmp_path / "b", "test", TO_TENSOR).classes[10] == "n10"


def test_imagenet_class_folders_through_clip_benchmark_and_v2(tmp_path):
    a_wnids = metadata.label_space("imagenet_a")
    fx.write_folders(tmp_path / "ina", {w: images(1, i) for i, w in enumerate(a_wnids)})
    ds = clip_benchmark_set("imagenet_a", tmp_path / "ina", "test", TO_TENSOR, builder="imagenet-a")
    inet = metadata.imagenet_wnid_index()
    names = metadata.imagenet_classnames()
    assert ds.classes == [names[inet[w]] for w in a_wnids]  # the 200 of the 1000, label order
    assert [ds[i][1] for i in (0, 5, 199)] == [0, 5, 199]
    fx.write_folders(tmp_path / "part", {w: images(1) for w in a_wnids[:3]})
    with pytest.raises(
        ConfigError,
        match=r"not the 200 WordNet ids of imagenet_a \(3 folders; "
        f"first difference: {a_wnids[3]}",
    ):  # labels would shift
        clip_benchmark_set("imagenet_a", tmp_path / "part", "test", TO_TENSOR, builder="imagenet-a")
    fx.write_folders(tmp_path / "v2", {"0": images(1), "999": images(1), "12": images(2)})
    ds = readers.imagenet_v2("imagenet_v2", tmp_path / "v2", "test", TO_TENSOR)
    assert sorted(l for _, l in ds.samples) == [0, 12, 12, 999] and len(ds.classes) == 1000


def test_builders_never_download(tmp_path):
    missing = tmp_path / "nothing_here"
    with pytest.raises(DatasetNotFound, match="no such directory"):
        clip_benchmark_set("imagenet_a", missing, "test", TO_TENSOR, builder="imagenet-a")
    assert not missing.exists()  # CLIP_benchmark would have created it and downloaded into it
    with pytest.raises(ConfigError, match="'imagenetv2' builder may download"):
        clip_benchmark_set("imagenet_v2", tmp_path, "test", TO_TENSOR, builder="imagenetv2")
    with pytest.raises(ConfigError, match="'eurosat' builder has no 'train' split"):
        clip_benchmark_set("eurosat", tmp_path, "train", TO_TENSOR, builder="eurosat")


def test_objectnet_mapping(tmp_path):
    root = fx.write_objectnet(
        tmp_path,
        {
            "alarm_clock": ("Alarm clock", [409, 530], images(2)),
            "banana": ("Banana", [954], images(1)),
        },
    )
    ds = readers.objectnet("objectnet", root, "test", TO_TENSOR)
    assert ds.labelnames == ["Alarm clock", "Banana"]
    assert ds.groups == [[409, 530], [954]]  # ImageNet labels through the 2012-id mapping
    assert sorted(l for _, l in ds.samples) == [0, 0, 1]


def test_video_pm_sets(tmp_path):
    videos = {
        "v1": [(img, [1]) for img in images(5)],
        "v2": [(img, [0, 2]) for img in images(3, 9)],
    }
    root = fx.write_video_pm(tmp_path, videos, groups=[[3], [5, 6], [7]], radius=1)
    ds = readers.video_pm("imagenet_vid", root, "test", TO_TENSOR)
    assert ds.groups == [[3], [5, 6], [7]] and len(ds) == 3 + 3  # anchors and neighbours only
    anchors = {ds.frames[a]: [ds.frames[n] for n in ns] for a, ns in ds.pmsets.items()}
    assert anchors == {
        "val/v1/000002.JPEG": ["val/v1/000001.JPEG", "val/v1/000003.JPEG"],
        "val/v2/000001.JPEG": ["val/v2/000000.JPEG", "val/v2/000002.JPEG"],
    }
    assert sorted(map(sorted, ds.pm_offsets.values())) == [[-1, 1], [-1, 1]]
    frame = ds.frames.index("val/v2/000000.JPEG")
    assert ds[frame][1].tolist() == [True, False, True]
    # the release's own class map files (misc/*_class_index.json + misc/rev_wnid_map.json)
    root = fx.write_video_pm(tmp_path / "rel", videos, groups=[[3], [5, 6], [7]], class_map="misc")
    assert readers.video_pm("imagenet_vid", root, "test", TO_TENSOR).groups == [[3], [5, 6], [7]]


def test_karpathy_json_and_caption_list(tmp_path):
    items = [(img, [f"caption {i}.{j}" for j in range(5)]) for i, img in enumerate(images(3))]
    root = fx.write_karpathy(tmp_path / "f", "dataset_flickr30k.json", "flickr30k-images", items)
    ds = readers.captions_json(
        "flickr30k", root, "test", TO_TENSOR, "dataset_flickr30k.json", "flickr30k-images"
    )
    assert len(ds) == 3 and ds[2][1] == items[2][1]  # the extra train image is skipped
    root = fx.write_caption_list(tmp_path / "c", "coco_test.json", items)
    ds = readers.captions_json("coco", root, "test", TO_TENSOR, "coco_test.json")
    assert len(ds) == 3 and ds[1][1] == items[1][1]


def test_voc_mnist_through_clip_benchmark_and_jsonl(tmp_path):
    from clip_benchmark.datasets.voc2007 import object_categories

    voc = fx.write_voc(
        tmp_path / "voc", [(images(1)[0], [0, 14]), (images(1, 5)[0], [3])], object_categories
    )
    ds = clip_benchmark_set("voc2007", voc, "test", TO_TENSOR, builder="voc2007_multilabel")
    assert ds[0][1].nonzero().flatten().tolist() == [0, 14] and ds[1][1].sum() == 1
    digits = [(np.full((28, 28), 20 * i, np.uint8), i) for i in range(10)]
    fx.write_mnist(tmp_path / "mnist", digits)
    ds = clip_benchmark_set("mnist", tmp_path / "mnist", "test", TO_TENSOR, builder="mnist")
    assert len(ds) == 10 and ds[3][1] == 3 and ds.classes == metadata.classnames("cb:mnist")
    assert ds[3][0].mean() == pytest.approx(60 / 255, abs=1e-6)  # the pixels written
    hm = fx.write_jsonl(
        tmp_path / "hm", "dev_seen", [(img, i % 2) for i, img in enumerate(images(4))]
    )
    ds = readers.jsonl("hateful_memes", hm, "dev_seen", TO_TENSOR)
    assert [ds[i][1] for i in range(4)] == [0, 1, 0, 1]


def test_missing_dataset_names_the_expected_layouts(tmp_path):
    cfg = eval_cfg("eval_data=cifar10", f"data_root={tmp_path}", tmp_path=tmp_path)
    with pytest.raises(DatasetNotFound) as err:
        build_split("cifar10", cfg.eval_data.cifar10, "test")
    msg = str(err.value)
    assert f"dataset cifar10 not found at {tmp_path}/cifar10 (no such directory)" in msg
    assert "test/nshards.txt" in msg and "CLIP_benchmark's `cifar10` builder" in msg
    assert "nothing is downloaded" in msg


def test_class_names_and_templates_from_data_or_config(tmp_path):
    fx.write_folders(tmp_path / "ucf101" / "test", {str(i): images(1, i) for i in range(101)})
    cfg = eval_cfg("eval_data=ucf101", f"data_root={tmp_path}", tmp_path=tmp_path)
    ds = build_split("ucf101", cfg.eval_data.ucf101, "test")  # folders named by label: no names
    assert ds.classes is None and ds[0][0].shape == (3, 8, 8)  # the configured transform
    assert class_names(cfg.eval_data.ucf101, ds) == metadata.classnames("clip:UCF101")
    assert prompt_templates(cfg.eval_data.ucf101, ds, "simple7") == metadata.templates(
        "clip:UCF101"
    )
    fx.write_wds(tmp_path / "imagenet", "test", [(images(1)[0], 0)], ["tench"] * 1000, ["x {}"])
    for kind, n in (("simple7", 7), ("openai80", 80)):
        cfg = eval_cfg(
            "eval_data=imagenet",
            f"data_root={tmp_path}",
            f"zeroshot.imagenet_templates={kind}",
            tmp_path=tmp_path,
        )
        ds = build_split("imagenet", cfg.eval_data.imagenet, "test")
        assert len(prompt_templates(cfg.eval_data.imagenet, ds, kind)) == n
        assert class_names(cfg.eval_data.imagenet, ds) == ["tench"] * 1000  # the export's own
