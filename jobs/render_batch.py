"""Ray Job entrypoint: render a manifest on the cluster this job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/render_batch.py s3://bucket/manifest.parquet --out s3://bucket/videos \
        --model /models/FramePackI2V_HY --generators 1-8 --decoders 1-4 --autoscaling

Flags are `fp-ray batch`'s (`fp-ray batch --help`). Inside a job, Ray connects to the
job's cluster by itself.
"""

import sys

from fp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
