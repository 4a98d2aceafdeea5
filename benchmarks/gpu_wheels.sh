#!/usr/bin/env bash
# The packages benchmarks/gpu.sh needs beyond a GPU machine's own PyTorch, as wheels in ./.whl
# (ignored by git; about 30 MB), for a machine that cannot reach a package index. Run it where
# pip can reach one.
# The versions are pyproject.toml's pins and what they import at run time, for a machine that
# has torch, torchvision, numpy, scipy, pandas, matplotlib, scikit-learn, pillow, pyyaml, tqdm
# and safetensors; the target is CPython 3.12 on x86-64 Linux (set PYVER=3.11 for another).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
  --implementation cp "${platforms[@]}" -d .whl \
  timm==1.0.31 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.11.19 \
  transformers==5.23.0 tokenizers==0.23.3 peft==0.21.2 accelerate==1.15.0 psutil==7.2.2 \
  huggingface_hub==2.4.0 hf_xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 \
  anyio==4.16.0 idna==3.20 truststore==0.10.5 click==8.5.1 \
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typer==0.29.1 shellingham==1.5.4 annotated-doc==0.0.7 rich==15.0.0 markdown-it-py==4.3.0 \
  mdurl==0.1.2 pygments==2.21.0 pydicom==3.0.2 nibabel==5.4.2 monai==1.6.1
du -sh .whl
ls .whl
