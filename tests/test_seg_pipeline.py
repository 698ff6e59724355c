"""Label-fraction subsets and the joint image/mask augmentation (no JAX)."""

import numpy as np
import pytest

from ddep_jax.data import label_fractions, seg_datasets, seg_pipeline

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


def test_subsets_deterministic_nested_and_seeded():
    n = 2975
    subsets = {name: label_fractions.select_subset(n, name, seed=3)
               for name in label_fractions.NAMED_FRACTIONS}
    again = {name: label_fractions.select_subset(n, name, seed=3)
             for name in label_fractions.NAMED_FRACTIONS}
    for name in subsets:
        np.testing.assert_array_equal(subsets[name], again[name])
        assert np.all(np.diff(subsets[name]) > 0)  # sorted, no repeats
    # Nested: a smaller fraction is inside every larger one (same seed).
    ordered = sorted(subsets.values(), key=len)
    for small, large in zip(ordered, ordered[1:]):
        assert set(small) <= set(large)
    assert len(subsets["100%"]) == n
    # The paper's Cityscapes counts.
    assert [len(subsets[f]) for f in ("1/30", "1/8", "1/4")] == [100, 372, 744]
    other = label_fractions.select_subset(n, "1/30", seed=4)
    assert set(other) != set(subsets["1/30"])
    assert len(label_fractions.select_subset(367, "1/30", seed=0)) == 13
    assert len(label_fractions.select_subset(367, "100", seed=0)) == 100
    assert len(label_fractions.select_subset(367, 0.5, seed=0)) == 184


def test_hosts_share_the_same_subset_disjointly():
    """Each host's stream covers its share of one global subset; together the
    hosts see exactly the subset, whatever their number."""
    n = 200
    records = [{"image": np.full((16, 16, 3), i, np.uint8),
                "segmentation_mask": np.zeros((16, 16, 1), np.uint8),
                "file_name": f"{i}.jpg".encode()} for i in range(n)]
    spec = seg_datasets.get_spec("camvid")
    subset = label_fractions.select_subset(n, "10%", seed=1)
    for hosts in (1, 2, 4):
        seen = []
        for h in range(hosts):
            source = seg_pipeline.SegmentationSource(records, spec, subset)
            ds = seg_pipeline.make_seg_train_dataset(
                source, crop_size=(16, 16), batch_size=1, seed=0,
                scale_range=(1.0, 1.0), flip=False, process_index=h,
                process_count=hosts, num_threads=1, prefetch=1)
            it = iter(ds)
            share = [int(next(it)["image"][0, 0, 0, 0])
                     for _ in range(len(range(h, len(subset), hosts)))]
            assert len(set(share)) == len(share)  # one epoch: no repeats
            seen += share
        assert sorted(seen) == subset.tolist()


@pytest.mark.parametrize("bad", ["0%", "150%", "-3", "abc", "1/0", 0, 1.5, "0"])
def test_invalid_label_fraction_named(bad):
    with pytest.raises(ValueError, match="label fraction"):
        label_fractions.select_subset(100, bad, seed=0)


def test_count_larger_than_split_rejected():
    with pytest.raises(ValueError, match="asks for 500"):
        label_fractions.select_subset(100, "500", seed=0)


def _coded_pair(h=24, w=40, seed=0):
    """An image whose colour encodes the label: image == PALETTE[label]."""
    rng = np.random.default_rng(seed)
    label = np.repeat(np.repeat(rng.integers(0, 4, (h // 4, w // 4)), 4, 0), 4, 1)
    return PALETTE[label], label.astype(np.uint8)


def test_crop_flip_and_padding_keep_image_and_mask_aligned():
    image, label = _coded_pair()
    t = seg_pipeline.RandomScaleCropFlip((32, 32), scale_range=(1.0, 1.0), flip=True)
    flips = 0
    for seed in range(20):
        out = t({"image": image, "label": label}, np.random.default_rng(seed))
        im, lb = out["image"], out["label"]
        assert im.shape == (32, 32, 3) and lb.shape == (32, 32)
        valid = lb != 255
        np.testing.assert_array_equal(im[valid], PALETTE[lb[valid]])
        # Padding (image is 24 high, crop 32): void label, mid-grey image.
        assert (~valid).sum() >= 8 * 32 and np.all(im[~valid] == 128)
        flips += not np.array_equal(lb[:24, :], label[:, :32]) and not np.array_equal(
            lb[:24, :], label[:, 8:])
    assert 0 < flips < 20


def test_random_scale_keeps_alignment():
    image, label = _coded_pair(48, 64)
    t = seg_pipeline.RandomScaleCropFlip((32, 32), scale_range=(0.6, 2.0), flip=True)
    for seed in range(10):
        out = t({"image": image, "label": label}, np.random.default_rng(seed))
        valid = out["label"] != 255
        # Bilinear image vs nearest mask: nearest palette colour agrees with the
        # label except on a thin band along region borders.
        dist = ((out["image"][:, :, None, :].astype(int)
                 - PALETTE[None, None].astype(int)) ** 2).sum(-1)
        agree = (dist.argmin(-1) == out["label"])[valid].mean()
        assert agree > 0.85, (seed, agree)


def _records(label_value=3, label_shape=(6, 8)):
    return [{"image": np.zeros((6, 8, 3), np.uint8),
             "segmentation_mask": np.full(label_shape + (1,), label_value, np.uint8),
             "file_name": b"frame_0007.jpg"}]


def test_source_maps_and_validates_records():
    spec = seg_datasets.get_spec("camvid")
    out = seg_pipeline.SegmentationSource(_records(), spec, split="train")[0]
    assert out["label"].shape == (6, 8) and out["label"].dtype == np.uint8
    with pytest.raises(ValueError, match=r"frame_0007\.jpg.*\[11\]"):
        seg_pipeline.SegmentationSource(_records(11), spec, split="train")[0]
    with pytest.raises(ValueError, match=r"size mismatch in frame_0007\.jpg"):
        seg_pipeline.SegmentationSource(_records(3, (6, 7)), spec, split="train")[0]


def test_cached_pairs_equal_the_decoded_ones_on_real_camvid(camvid_tfds):
    """Real CamVid pairs (a 6-image labelled subset): the fine-tuning stream
    is the same whether the pairs are decoded once into memory or per crop."""
    spec = seg_datasets.get_spec("camvid")
    records = seg_datasets.open_split(spec, "train", camvid_tfds)
    source = seg_pipeline.SegmentationSource(records, spec, [3, 50, 7, 200, 11, 90],
                                             split="train")

    def stream(cache):
        return iter(seg_pipeline.make_seg_train_dataset(
            source, crop_size=(32, 48), batch_size=4, seed=1, scale_range=(0.2, 0.4),
            num_threads=2, prefetch=1, cache=cache))

    plain, cached = stream("none"), stream("memory")
    for _ in range(3):
        a, b = next(plain), next(cached)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
