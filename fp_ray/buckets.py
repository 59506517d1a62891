"""Frame sizes when a request names none: the official demo's 640 bucket table
(diffusers_helper/bucket_tools.py), as data, scaled for other resolutions."""

from __future__ import annotations

OFFICIAL_RESOLUTION = 640
# (height, width), in the demo's order: the order decides ties (a square image -> 640 high, 608 wide).
BUCKETS_640 = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)
MULTIPLE = 16
MIN_SIDE = 32


def buckets(resolution: int) -> list[tuple[int, int]]:
    """The 640 table scaled to `resolution`, sides rounded to multiples of 16."""
    if resolution == OFFICIAL_RESOLUTION:
        return list(BUCKETS_640)
    scale = resolution / OFFICIAL_RESOLUTION
    return [tuple(max(MIN_SIDE, round(side * scale / MULTIPLE) * MULTIPLE) for side in hw) for hw in BUCKETS_640]


def nearest_bucket(image_width: int, image_height: int, resolution: int = OFFICIAL_RESOLUTION) -> tuple[int, int]:
    """(width, height) of the bucket closest to the image's aspect ratio, by the demo's
    metric |h * bucket_w - w * bucket_h|; on a tie the later bucket wins, as there."""
    best, best_metric = None, float("inf")
    for bucket_h, bucket_w in buckets(resolution):
        metric = abs(image_height * bucket_w - image_width * bucket_h)
        if metric <= best_metric:
            best, best_metric = (bucket_w, bucket_h), metric
    return best
