"""The grain input pipeline: determinism, resumable state, host sharding, crops."""

import numpy as np

from ddep_jax.data import pipeline
from ddep_jax.data.embedded import EmbeddedImages


class _Source:
    """Images whose every pixel holds the example index (to trace data order)."""

    def __init__(self, n=20):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((40 + i, 50, 3), i, np.uint8)}


def _ds(seed=0, **kw):
    return pipeline.make_train_dataset(_Source(), image_size=(16, 16), batch_size=4,
                                       seed=seed, num_threads=1, prefetch=1, **kw)


def _ids(batch):
    return batch["image"][:, 0, 0, 0].tolist()


def test_batches_shape_dtype_and_determinism():
    a, b = iter(_ds()), iter(_ds())
    for _ in range(7):  # crosses an epoch boundary (20 examples, batch 4)
        x, y = next(a), next(b)
        assert x["image"].shape == (4, 16, 16, 3) and x["image"].dtype == np.uint8
        np.testing.assert_array_equal(x["image"], y["image"])
    assert _ids(next(iter(_ds(seed=1)))) != _ids(next(iter(_ds(seed=0))))


def test_each_epoch_is_a_reshuffled_permutation():
    it = iter(_ds())
    epoch1 = sum((_ids(next(it)) for _ in range(5)), [])
    epoch2 = sum((_ids(next(it)) for _ in range(5)), [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(20))
    assert epoch1 != epoch2


def test_iterator_state_resumes_exactly():
    it = iter(_ds())
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["image"] for _ in range(4)]
    fresh = iter(_ds())
    fresh.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(fresh)["image"], e)


def test_hosts_read_disjoint_shards():
    seen = []
    for host in range(2):
        it = iter(_ds(process_index=host, process_count=2))
        seen.append(set(sum((_ids(next(it)) for _ in range(2)), [])))
    assert not seen[0] & seen[1]
    assert seen[0] <= set(range(0, 20, 2)) and seen[1] <= set(range(1, 20, 2))


def test_crop_box_inside_image_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = pipeline.sample_crop_box(rng, 30, 80)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 80
    # Impossible area range: falls back to the largest centred crop.
    assert pipeline.sample_crop_box(rng, 10, 100, area_range=(2.0, 2.0)) == (0, 43, 10, 13)


def test_flip_mirrors_the_crop():
    image = np.tile(np.arange(32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    aug = pipeline.RandomCropFlip((32, 32), (1.0, 1.0), (1.0, 1.0), flip=True)
    flipped = [aug({"image": image}, np.random.default_rng(s))["image"] for s in range(8)]
    rows = {tuple(f[0, :, 0]) for f in flipped}
    assert rows == {tuple(range(32)), tuple(range(31, -1, -1))}


def test_embedded_images_are_real_rgb_photos():
    source = EmbeddedImages()
    assert len(source) >= 10
    for i in range(len(source)):
        image = source[i]["image"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        assert min(image.shape[:2]) >= 128 and image.std() > 10


# ----------------------------------------------------------------------------
# Decoding once into memory (`data.cache`).
# ----------------------------------------------------------------------------
def test_cache_keeps_read_only_records_and_respects_the_budget():
    from ddep_jax.data.cache import cache_in_memory

    source = _Source(6)
    assert cache_in_memory(source, mode="none") is source
    assert cache_in_memory(source, mode="auto", max_mib=1e-3) is source  # too big
    cached = cache_in_memory(source, mode="auto", max_mib=1.0)
    assert len(cached) == 6
    np.testing.assert_array_equal(cached[5]["image"], source[5]["image"])
    with np.testing.assert_raises(ValueError):  # an augmentation writing in place
        cached[5]["image"][0, 0, 0] = 1
    with np.testing.assert_raises_regex(ValueError, "data.cache='disk'"):
        cache_in_memory(source, mode="disk")


def test_cached_stream_equals_the_uncached_one_on_real_images(cifar_subset):
    """Real CIFAR-10 JPEGs through TFDS: the same batches cached or not, and
    the iterator state of one resumes the other."""
    from ddep_jax.data.tfds_sources import load_data_source

    _, data_dir, _ = cifar_subset
    source = load_data_source("cifar10_jpeg", "train", data_dir)

    def stream(cache):
        return pipeline.make_train_dataset(source, image_size=(24, 24), batch_size=16,
                                           seed=3, num_threads=2, prefetch=1,
                                           keep=("label",), cache=cache)

    plain, cached = iter(stream("none")), iter(stream("memory"))
    for _ in range(6):  # 80 images: crosses an epoch boundary
        a, b = next(plain), next(cached)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    resumed = iter(stream("none"))
    resumed.set_state(cached.get_state())
    np.testing.assert_array_equal(next(resumed)["image"], next(cached)["image"])
