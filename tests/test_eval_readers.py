"""Evaluation-set readers on tiny fixtures written in the real on-disk layouts."""
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchvision import transforms as T

from flip.evaluation import metadata, readers, testing
from flip.evaluation.datasets import build_eval_set
from flip.evaluation.readers import DatasetNotFound
from tests.conftest import CONF

TO_TENSOR = T.Compose([T.Resize((8, 8)), T.ToTensor()])


def eval_cfg(*overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=["ckpt_path=unused", f"output_dir={tmp_path}", *overrides])


def images(n, seed=0):
    return [testing.solid_image(seed + i) for i in range(n)]


def test_metadata_files():
    assert len(metadata.imagenet_classnames()) == 1000 and metadata.imagenet_classnames()[0] == "tench"
    assert len(metadata.imagenet_wnids()) == 1000 and metadata.imagenet_wnids()[0] == "n01440764"
    assert len(metadata.imagenet_templates("simple7")) == 7
    assert len(metadata.imagenet_templates("openai80")) == 80
    assert metadata.imagenet_templates("simple7")[0] == "itap of a {}."
    for space in ("imagenet_a", "imagenet_r"):
        wnids = metadata.label_space(space)
        assert len(wnids) == 200 and list(wnids) == sorted(wnids)
        assert set(wnids) <= set(metadata.imagenet_wnids())
    sizes = {"Food101": 101, "CIFAR10": 10, "CIFAR100": 100, "Birdsnap": 500, "SUN397": 397,
             "StanfordCars": 196, "FGVCAircraft": 100, "PascalVOC2007": 20,
             "DescribableTextures": 47, "OxfordPets": 37, "Caltech101": 102, "Flowers102": 102,
             "MNIST": 10, "STL10": 10, "EuroSAT": 10, "RESISC45": 45, "GTSRB": 43, "KITTI": 4,
             "Country211": 211, "PatchCamelyon": 2, "UCF101": 101, "Kinetics700": 700,
             "CLEVRCounts": 8, "HatefulMemes": 2, "SST2": 2}  # the 25 datasets of Table 4
    for name, n in sizes.items():
        assert len(metadata.classnames(f"clip:{name}")) == n, name
        assert all("{}" in t for t in metadata.templates(f"clip:{name}")), name
    assert metadata.classnames("cb:pets")[:2] == ["Abyssinian", "American Bulldog"]


def test_every_table4_config_points_at_its_metadata(tmp_path):
    cfg = eval_cfg("eval_data=table4", tmp_path=tmp_path)
    assert len(cfg.eval_data) == 25
    for name, entry in cfg.eval_data.items():
        assert entry.kind == "classification" and entry.root.endswith(f"/{name}")
        assert metadata.classnames(entry.classnames) and metadata.templates(entry.templates)


def test_wds_export_classification_and_captions(tmp_path):
    samples = [(img, i % 3) for i, img in enumerate(images(7))]
    root = testing.write_wds(tmp_path / "wds", "test", samples, ["a", "b", "c"], ["x {}"], per_shard=3)
    ds = readers.TarShards("fx", root, "test", TO_TENSOR)
    assert len(ds) == 7 and ds.classnames == ["a", "b", "c"] and ds.templates == ["x {}"]
    assert [ds[i][1] for i in range(7)] == [i % 3 for i in range(7)]
    # webp decodes lossy; compare against the same encoding decoded by PIL directly
    want = TO_TENSOR(samples[4][0])
    assert torch.allclose(ds[4][0], want, atol=0.1)
    caps = [(img, [f"cap {i}", f"other {i}"]) for i, img in enumerate(images(4))]
    root = testing.write_wds(tmp_path / "ret", "test", caps, image_format="jpg")
    rs = readers.TarShards("fx", root, "test", TO_TENSOR, mode="txt")
    assert [rs[i][1] for i in range(4)] == [c for _, c in caps]
    multi = [(img, np.array([i % 2, 1, 0], dtype=np.uint8)) for i, img in enumerate(images(3))]
    root = testing.write_wds(tmp_path / "voc", "test", multi, ["x", "y", "z"])
    ml = readers.TarShards("fx", root, "test", TO_TENSOR)
    assert [ml[i][1].tolist() for i in range(3)] == [[False, True, False], [True, True, False],
                                                     [False, True, False]]
    with pytest.raises(DatasetNotFound, match="nshards.txt"):
        readers.TarShards("fx", tmp_path / "none", "test", TO_TENSOR)


def test_image_folder_names_and_label_numbers(tmp_path):
    testing.write_folders(tmp_path / "a" / "test", {"sea_lake": images(2), "forest": images(1)})
    ds = readers.image_folder("fx", tmp_path / "a", "test", TO_TENSOR)
    assert ds.classnames == ["forest", "sea lake"] and sorted(l for _, l in ds.samples) == [0, 1, 1]
    testing.write_folders(tmp_path / "b" / "test", {"0": images(1), "2": images(1), "10": images(1)})
    ds = readers.image_folder("fx", tmp_path / "b", "test", TO_TENSOR)
    assert ds.classnames is None and sorted(l for _, l in ds.samples) == [0, 2, 10]
    (tmp_path / "b" / "classnames.txt").write_text("\n".join(f"n{i}" for i in range(11)))
    assert readers.image_folder("fx", tmp_path / "b", "test", TO_TENSOR).classnames[10] == "n10"


def test_imagenet_variants_label_spaces(tmp_path):
    a_wnids = metadata.label_space("imagenet_a")
    testing.write_folders(tmp_path / "ina", {a_wnids[5]: images(2), a_wnids[199]: images(1)})
    ds = readers.imagenet_folder("imagenet_a", tmp_path / "ina", "test", TO_TENSOR, "imagenet_a")
    assert sorted(l for _, l in ds.samples) == [5, 5, 199]
    inet = metadata.imagenet_wnid_index()
    assert len(ds.groups) == 200 and ds.groups[5] == [inet[a_wnids[5]]]
    assert len(ds.classnames) == 1000
    testing.write_folders(tmp_path / "v2", {"0": images(1), "999": images(1)})
    ds = readers.imagenet_folder("imagenet_v2", tmp_path / "v2", "test", TO_TENSOR)
    assert sorted(l for _, l in ds.samples) == [0, 999] and ds.groups is None
    testing.write_folders(tmp_path / "val" / "val", {"n01440764": images(1)})
    ds = readers.imagenet_folder("imagenet", tmp_path / "val", "val", TO_TENSOR)
    assert [l for _, l in ds.samples] == [0]


def test_objectnet_mapping(tmp_path):
    root = testing.write_objectnet(tmp_path, {
        "alarm_clock": ("Alarm clock", [409, 530], images(2)),
        "banana": ("Banana", [954], images(1)),
    })
    ds = readers.objectnet("objectnet", root, "test", TO_TENSOR)
    assert ds.labelnames == ["Alarm clock", "Banana"]
    assert ds.groups == [[409, 530], [954]]  # ImageNet labels through the 2012-id mapping
    assert sorted(l for _, l in ds.samples) == [0, 0, 1]


def test_video_pm_sets(tmp_path):
    videos = {"v1": [(img, [1]) for img in images(5)], "v2": [(img, [0, 2]) for img in images(3, 9)]}
    root = testing.write_video_pm(tmp_path, videos, groups=[[3], [5, 6], [7]], radius=1)
    ds = readers.video_pm("imagenet_vid", root, "test", TO_TENSOR)
    assert ds.groups == [[3], [5, 6], [7]] and len(ds) == 3 + 3  # anchors and neighbours only
    anchors = {ds.frames[a]: [ds.frames[n] for n in ns] for a, ns in ds.pmsets.items()}
    assert anchors == {"val/v1/000002.JPEG": ["val/v1/000001.JPEG", "val/v1/000003.JPEG"],
                       "val/v2/000001.JPEG": ["val/v2/000000.JPEG", "val/v2/000002.JPEG"]}
    assert sorted(map(sorted, ds.pm_offsets.values())) == [[-1, 1], [-1, 1]]
    frame = ds.frames.index("val/v2/000000.JPEG")
    assert ds[frame][1].tolist() == [True, False, True]
    # the release's own class map files (misc/*_class_index.json + misc/rev_wnid_map.json)
    root = testing.write_video_pm(tmp_path / "rel", videos, groups=[[3], [5, 6], [7]],
                                  class_map="misc")
    assert readers.video_pm("imagenet_vid", root, "test", TO_TENSOR).groups == [[3], [5, 6], [7]]


def test_karpathy_json_and_caption_list(tmp_path):
    items = [(img, [f"caption {i}.{j}" for j in range(5)]) for i, img in enumerate(images(3))]
    root = testing.write_karpathy(tmp_path / "f", "dataset_flickr30k.json", "flickr30k-images", items)
    ds = readers.captions_json("flickr30k", root, "test", TO_TENSOR,
                               "dataset_flickr30k.json", "flickr30k-images")
    assert len(ds) == 3 and ds[2][1] == items[2][1]  # the extra train image is skipped
    root = testing.write_caption_list(tmp_path / "c", "coco_test.json", items)
    ds = readers.captions_json("coco", root, "test", TO_TENSOR, "coco_test.json")
    assert len(ds) == 3 and ds[1][1] == items[1][1]


def test_voc_jsonl_and_torchvision_mnist(tmp_path):
    voc = testing.write_voc(tmp_path / "voc", [(images(1)[0], [0, 14]), (images(1, 5)[0], [3])],
                            readers.VOC_CLASSES)
    ds = readers.voc2007("voc2007", voc, "test", TO_TENSOR)
    assert ds[0][1].nonzero().flatten().tolist() == [0, 14] and ds[1][1].sum() == 1
    hm = testing.write_jsonl(tmp_path / "hm", "dev_seen", [(img, i % 2) for i, img in enumerate(images(4))])
    ds = readers.jsonl("hateful_memes", hm, "dev_seen", TO_TENSOR)
    assert [ds[i][1] for i in range(4)] == [0, 1, 0, 1]
    digits = [(np.full((28, 28), 20 * i, np.uint8), i) for i in range(10)]
    testing.write_mnist(tmp_path / "mnist", digits)
    ds = readers.torchvision_dataset("mnist", tmp_path / "mnist", "test", TO_TENSOR, tv="MNIST",
                                     split_arg="train", classnames=metadata.classnames("cb:mnist"))
    assert len(ds) == 10 and ds[3][1] == 3 and ds.classnames[3] == "3"


def test_missing_dataset_names_the_expected_layouts(tmp_path):
    cfg = eval_cfg("eval_data=cifar10", f"data_root={tmp_path}", tmp_path=tmp_path)
    with pytest.raises(DatasetNotFound) as err:
        build_eval_set("cifar10", cfg.eval_data.cifar10, "test", TO_TENSOR, cfg)
    msg = str(err.value)
    assert f"dataset cifar10 not found at {tmp_path}/cifar10" in msg
    assert "test/nshards.txt" in msg and "<class>/<image>" in msg and "torchvision.datasets.CIFAR10" in msg
    assert "nothing is downloaded" in msg


def test_build_eval_set_resolves_names_and_templates(tmp_path):
    testing.write_folders(tmp_path / "mnist" / "test", {str(i): images(1, i) for i in range(10)})
    cfg = eval_cfg("eval_data=mnist", f"data_root={tmp_path}", tmp_path=tmp_path)
    es = build_eval_set("mnist", cfg.eval_data.mnist, "test", TO_TENSOR, cfg)
    assert es.classnames == metadata.classnames("clip:MNIST") and es.templates == ['a photo of the number: "{}".']
    testing.write_folders(tmp_path / "imagenet" / "val", {"n01440764": images(1)})
    for kind, n in (("simple7", 7), ("openai80", 80)):
        cfg = eval_cfg("eval_data=imagenet", f"data_root={tmp_path}",
                       f"zeroshot.imagenet_templates={kind}", tmp_path=tmp_path)
        es = build_eval_set("imagenet", cfg.eval_data.imagenet, "val", TO_TENSOR, cfg)
        assert len(es.templates) == n and len(es.classnames) == 1000
