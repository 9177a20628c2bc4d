"""Image bytes -> uint8 HWC arrays on the host, with libjpeg-turbo (simplejpeg) and OpenCV.

Records of tfds ``Image`` features are read with decoding skipped (``tfds.decode.SkipDecoding``):
the pipeline gets the encoded bytes and decodes them here, straight into numpy, without Pillow.
JPEG goes through simplejpeg (libjpeg-turbo, accurate integer IDCT, the same decoder family as
Pillow), anything else (PNG for CIFAR) through ``cv2.imdecode``.
"""

import numpy as np

JPEG_MAGIC = b"\xff\xd8"


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts with the JPEG start-of-image marker."""
    return data[:2] == JPEG_MAGIC


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Decode ``data`` (JPEG, PNG, ...) to uint8 (H, W, channels); channels is 1 or 3 (RGB)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if is_jpeg(data):
        import simplejpeg

        image = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB")
    else:
        import cv2

        flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        if image is None:
            raise ValueError(f"cannot decode image bytes starting with {data[:8]!r}")
        if channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image.reshape(*image.shape[:2], channels)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded ``data``: from the JPEG header alone when it is a JPEG."""
    if is_jpeg(data):
        import simplejpeg

        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return height, width
    return decode_image(data, 3).shape[:2]
