"""FLUX.1-Kontext-dev's builder (`BUILDER`): FLUX.1-dev's, plus a synthetic input image to edit.

Kontext-dev has the FLUX.1-dev architecture and components; only the pipeline differs (it VAE-encodes the
input image and appends its tokens to the image sequence), so the builder is `flux1`'s with another pipeline.
"""

from __future__ import annotations

import numpy as np
from diffusers import FluxKontextPipeline
from PIL import Image

from fluxgate.models import flux1


class Flux1KontextDev(flux1.Flux1Dev):
    """FLUX.1-Kontext-dev: `FluxKontextPipeline` around FLUX.1-dev's transformer and components.

    Calls need max_area=height * width and _auto_resize=False: by default the pipeline rescales the output to
    ~1024x1024 and resizes the input image to a preferred Kontext resolution, ~16x the work of 256 px.
    """

    pipeline_class = FluxKontextPipeline
    # Copies, so a caller editing one model's config doesn't change the other's. black-forest-labs/FLUX.1-Kontext-dev
    # transformer/config.json is FLUX.1-dev's; same VAE, scheduler and prompt inputs.
    tiny_transformer_config = dict(flux1.TINY_TRANSFORMER_CONFIG)
    full_transformer_config = dict(flux1.FULL_TRANSFORMER_CONFIG)

    def input_image(self, size_px: int, seed: int) -> Image.Image:
        """A square RGB image with a colour gradient, a few discs and rectangles, and stripes, from `seed`.

        Edges and flat regions at several scales give the VAE encoder real structure to encode (a noise or flat
        image would not); the same (size_px, seed) always gives the same pixels.
        """
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:size_px, 0:size_px].astype(np.float32) / size_px
        corners = rng.uniform(0, 255, size=(3, 3))  # background colour at the origin, along x, along y
        img = corners[0] + x[..., None] * (corners[1] - corners[0]) + y[..., None] * (corners[2] - corners[0])
        for _ in range(int(rng.integers(3, 6))):
            cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.06, 0.2)
            img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
        for _ in range(int(rng.integers(2, 4))):
            x0, y0 = rng.uniform(0, 0.7, 2)
            w, h = rng.uniform(0.1, 0.3, 2)
            img[(x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)] = rng.uniform(0, 255, 3)
        # A band of fine stripes adds high-frequency detail the other shapes lack.
        band = (y > 0.8) & (np.floor(x * 32) % 2 == 0)
        img[band] = 255 - img[band]
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


BUILDER = Flux1KontextDev()
