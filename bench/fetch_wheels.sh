#!/bin/sh
# Download the wheels bench/run_on_device.sh installs on a GPU machine that has torch and
# transformers but not diffusers, pydantic or torchao (and no network): into .whl/ at the
# repository root (ignored by git; pass it to the device call with carry: [".whl"]).
# Versions: diffusers and av (PyAV, for the tiny-checkpoint CLI renders after the bench) as this
# project pins them; pydantic (and the typing-extensions it needs) for
# fp_ray.request; torchao built for torch 2.11, the device's torch.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 torchao==0.17.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 av==18.1.0
ls -l .whl
