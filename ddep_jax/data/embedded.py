"""Real photographs bundled with scikit-image: the offline default data.

They let the main job run on a fresh machine with no dataset to download or
prepare. Only images shipped inside the scikit-image wheel are used (the ones
`skimage.data` loads without fetching); greyscale photos are repeated to RGB.
Source: scikit-image `skimage.data` (licences in its docs, all permissive).
"""

from __future__ import annotations

import numpy as np

# Photographs (no drawings or synthetic patterns) bundled in the wheel.
BUNDLED_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "immunohistochemistry", "camera", "coins", "moon", "clock", "grass",
    "gravel", "brick", "page", "text",
)


class EmbeddedImages:
    """Random-access source of {'image': uint8 [H, W, 3]} (sizes vary).

    Usable directly as a grain `MapDataset.source`.
    """

    def __init__(self, names=BUNDLED_PHOTOS):
        import skimage.data

        self._images = []
        for name in names:
            image = np.asarray(getattr(skimage.data, name)())
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
            self._images.append(np.ascontiguousarray(image[..., :3], np.uint8))

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._images[index]}
