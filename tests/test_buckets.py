from __future__ import annotations

import pytest

from fp_ray import TINY_CHECKPOINT
from fp_ray.buckets import BUCKETS_640, buckets, nearest_bucket
from fp_ray.encode import frame_size
from fp_ray.request import make_request


@pytest.mark.parametrize("image,bucket", [
    ((1000, 1000), (608, 640)),   # square: the demo's tie rule picks 640 high, 608 wide
    ((1920, 1080), (832, 480)),   # 16:9
    ((1080, 1920), (480, 832)),   # 9:16
    ((4000, 1000), (960, 416)),   # wider than the table: its widest bucket
    ((1024, 768), (704, 544)),    # 4:3
])
def test_official_640_buckets(image, bucket):
    assert nearest_bucket(*image) == bucket


def test_scaled_tables_keep_sixteen_multiples_and_aspect_order():
    for resolution in (160, 320, 960):
        table = buckets(resolution)
        assert len(table) == len(BUCKETS_640)
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in table)
        ratios = [w / h for h, w in table]
        assert ratios == sorted(ratios, reverse=True)
    assert buckets(640) == list(BUCKETS_640)


def test_request_size_resolution_and_model_default():
    hub = make_request(prompt="p", model="lllyasviel/FramePackI2V_HY")
    assert frame_size(hub, 1920, 1080) == (832, 480)
    assert frame_size(make_request(prompt="p", model="lllyasviel/FramePackI2V_HY", resolution=320), 1920, 1080) == (416, 240)
    tiny = make_request(prompt="p", model=str(TINY_CHECKPOINT))  # fp_ray.json: default_resolution 160
    assert frame_size(tiny, 1920, 1080) == (208, 128)
    explicit = make_request(prompt="p", width=96, height=64)
    assert frame_size(explicit, 1920, 1080) == (96, 64)
