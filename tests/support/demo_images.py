"""Images of the demo model's synthetic shapes, as the API carries them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.model_store import synthetic

SEED = 12345  # neither the training nor the test set's seed


def demo_png(index: int, size: int = synthetic.IMAGE_SIZE) -> bytes:
    """Shape ``index`` (label ``index % 4``) as an 8-bit RGB PNG of ``size`` x ``size``."""
    image = synthetic.make_sample(SEED, index, size).image
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def demo_tensor(index: int) -> pb.Image:
    """Shape ``index`` as a raw float32 tensor, 3 x 64 x 64."""
    image = synthetic.make_sample(SEED, index).image.astype("<f4")
    return pb.Image(tensor=pb.Tensor(shape=list(image.shape), data=image.tobytes()))
