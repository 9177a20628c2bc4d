"""Image bytes -> uint8 HWC arrays on the host, with libjpeg-turbo (simplejpeg) and OpenCV.

Records of tfds ``Image`` features are read with decoding skipped (``tfds.decode.SkipDecoding``):
the pipeline gets the encoded bytes and decodes them here, straight into numpy, without Pillow.
JPEG goes through simplejpeg (libjpeg-turbo, accurate integer IDCT, the same decoder family as
Pillow), anything else (PNG for CIFAR) through ``cv2.imdecode``. An image whose header says it
has more than ``limits.MAX_IMAGE_PIXELS`` pixels is refused before it is decoded.
"""

import io
import struct
import warnings

import numpy as np

from flax_attention.data.limits import ImageTooLargeError, check_image_pixels

JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts with the JPEG start-of-image marker."""
    return data[:2] == JPEG_MAGIC


def decode_image(data: bytes, channels: int, what: str = "image") -> np.ndarray:
    """Decode ``data`` (JPEG, PNG, ...) to uint8 (H, W, channels); channels is 1 or 3 (RGB).

    ``ImageTooLargeError`` naming ``what`` when its header says it has more pixels than
    ``limits.MAX_IMAGE_PIXELS``: nothing is decoded then."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    check_image_pixels(*image_size(data, what), what)
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


def image_size(data: bytes, what: str = "image") -> tuple[int, int]:
    """(height, width) of encoded ``data``, read from its header alone (nothing is decoded);
    ``ValueError`` naming ``what`` when no image header can be read."""
    if is_jpeg(data):
        import simplejpeg

        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return height, width
    if data[:8] == PNG_MAGIC and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    return _pillow_header_size(data, what)


def _pillow_header_size(data: bytes, what: str) -> tuple[int, int]:
    """(height, width) from the header of any format Pillow identifies."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.height, image.width
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{what}: {err}") from None
    except UnidentifiedImageError:
        raise ValueError(f"{what}: cannot decode image bytes starting with {data[:8]!r}") from None
