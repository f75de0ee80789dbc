#!/usr/bin/env bash
# The main job end to end on a fresh CPU machine, no downloads: install, write a SYNTHETIC two-source dataset with
# conflicting taxonomies, embed the label sentences with a RANDOMLY initialised CLIP text tower (no CLIP weights can
# be downloaded here: the labels are distinct vectors without meaning), train a small SegFormer-B0 from scratch on
# both sources, evaluate it on each source's validation scenes, and write overlays. It proves the pipeline, not the
# method; README.md has the real recipes.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet torch==2.13.0          # the CPU build first: a plain `torch` would pull CUDA
python -m pip install --quiet -r requirements.txt
rm -rf runs/demo
python -m tools.synthetic_data --out data/synthetic
python label_table.py --clip_random_init --out=runs/demo/label_table.pt
python train.py configs/demo_synthetic.yaml
ckpt=$(ls runs/demo/ckpt_*.pt | tail -n 1)
for dataset in synthetic-street-ids synthetic-facade-colors; do
  python evaluate.py --dataset="$dataset" --checkpoint="$ckpt" \
    --base_size=0 --sliding=false --out_dir=runs/demo/eval --save_pred="runs/demo/pred/$dataset"
done
echo "demo done: checkpoint $ckpt, results runs/demo/eval/*.md, overlays runs/demo/pred/*/*_overlay.png"
